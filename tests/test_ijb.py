"""IJB-B/C: meta parsing and errors, aggregation by hand, pair scoring, feature cache, CLI end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from facetool.errors import FacetoolError
from facetool.eval import ijb
from facetool.eval.embed import FeatureCache, ImageArray
from facetool.eval.roc import FARS, tar_at_far
from facetool.io import run_name
from facetool.models import create_model, save_checkpoint
from fixtures_ijb import PixelEmbed, make_ijb


@pytest.fixture(scope="module")
def ijbc(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("ijb") / "IJB_C"
    return root, make_ijb(root, "ijbc")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("m") / "pix.pt", create_model("test_pixel_embed"))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_template_aggregation_by_hand():
    feats = np.array([[1.0, 0], [3, 0], [0, 1], [0, -2]], np.float32)
    templates = np.array([7, 7, 7, 9])
    medias = np.array([50, 50, 51, 52])
    tids, t = ijb.template_features(feats, templates, medias)
    # template 7: media 50 -> mean([1,0],[3,0]) = [2,0]; + media 51 [0,1] -> [2,1] / sqrt(5); template 9: [0,-1]
    assert tids.tolist() == [7, 9]
    np.testing.assert_allclose(t, [[2 / 5**0.5, 1 / 5**0.5], [0, -1]], atol=1e-12)
    s = ijb.pair_scores(t, np.array([0]), np.array([1]))
    assert s[0] == pytest.approx(-1 / 5**0.5)


def test_image_feature_switches_by_hand():
    f, ff, score = np.array([[3.0, 4.0]]), np.array([[1.0, 0.0]]), np.array([0.5])
    np.testing.assert_allclose(ijb.image_features(f, ff, score), [[2.0, 2.0]])  # (f + flip) * .5
    np.testing.assert_allclose(ijb.image_features(f, ff, score, norm=False), [[0.5**1.5, 0.5**1.5]], rtol=1e-6)
    np.testing.assert_allclose(ijb.image_features(f, ff, score, det_score=False, flip=False), [[3.0, 4.0]])
    np.testing.assert_allclose(ijb.image_features(f, None, score, norm=False, det_score=False, flip=False),
                               [[0.6, 0.8]])


@pytest.mark.parametrize("dense", [True, False])
def test_pair_scores_match_naive_dot(dense):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((600, 16))
    if dense:  # gallery x probe pattern: the block matrix-product path
        i1, i2 = np.nonzero(rng.random((500, 100)) < 0.3)
        i1 = i1 + 100
    else:  # scattered pairs: the gather path
        i1, i2 = rng.integers(0, 600, 700), rng.integers(0, 600, 700)
    s = ijb.pair_scores(feats, i1, i2, max_block=4096)
    np.testing.assert_allclose(s, (feats[i1] * feats[i2]).sum(1), rtol=1e-12, atol=1e-12)


def test_read_meta_matches_the_written_layout(ijbc):
    root, gt = ijbc
    m = ijb.read_meta(root, "ijbc")
    assert m.files == gt["names"] and (m.templates == gt["templates"]).all() and (m.medias == gt["medias"]).all()
    np.testing.assert_allclose(m.landmarks, gt["landmarks"], atol=0.006)
    np.testing.assert_allclose(m.faceness, gt["faceness"], atol=1e-4)
    assert (m.pairs == gt["pairs"][:, :2]).all() and (m.labels == gt["pairs"][:, 2]).all()


def test_meta_errors_are_one_line(ijbc, tmp_path):
    root, _ = ijbc
    r = _copy(root, tmp_path / "a")
    (r / "meta" / "ijbc_template_pair_label.txt").unlink()
    with pytest.raises(FacetoolError, match="missing IJB meta file .*ijbc_template_pair_label.txt"):
        ijb.read_meta(r)
    r = _copy(root, tmp_path / "b")
    (r / "loose_crop" / "3.jpg").unlink()
    with pytest.raises(FacetoolError, match="1 image.* absent .* e.g. 3.jpg"):
        ijb.read_meta(r)
    r = _copy(root, tmp_path / "c")
    with open(r / "meta" / "ijbc_template_pair_label.txt", "a") as f:
        f.write("100 424242 0\n")
    with pytest.raises(FacetoolError, match="1 template.* without images.* 424242"):
        ijb.read_meta(r)
    r = _copy(root, tmp_path / "d")
    with open(r / "meta" / "ijbc_face_tid_mid.txt", "a") as f:
        f.write("99.jpg 5\n")
    with pytest.raises(FacetoolError, match="expected 3 fields"):
        ijb.read_meta(r)
    r = _copy(root, tmp_path / "f")
    with open(r / "meta" / "ijbc_template_pair_label.txt", "a") as f:
        f.write("100 x 0\n")
    with pytest.raises(FacetoolError, match="expected 3 integers per line"):
        ijb.read_meta(r)


def test_unknown_template_in_1n_csv(ijbc, tmp_path):
    root, _ = ijbc
    r = _copy(root, tmp_path / "e")
    with open(r / "meta" / "ijbc_1N_probe_mixed.csv", "a") as f:
        f.write("777777,1,img/0.jpg,1,0,0,1,1\n")
    m = ijb.read_meta(r)
    tids = np.unique(m.templates)
    with pytest.raises(FacetoolError, match="probe list names 1 unknown template.* 777777"):
        ijb.identify(r, "ijbc", tids, np.eye(len(tids)))


def _naive_reference(root: Path, gt: dict, feats: np.ndarray, flips: np.ndarray) -> dict:
    """insightface's loops, written out naively over the ground truth (norm on, det score on, flip on)."""
    x = (feats + flips) * gt["faceness"][:, None]
    tfeat = {}
    for t in np.unique(gt["templates"]):
        idx = np.flatnonzero(gt["templates"] == t)
        media = [x[idx][gt["medias"][idx] == m].mean(0) for m in np.unique(gt["medias"][idx])]
        v = np.sum(media, 0)
        tfeat[t] = v / np.linalg.norm(v)
    p = gt["pairs"]
    scores = np.array([tfeat[a] @ tfeat[b] for a, b, _ in p])
    fpr, tpr, _ = roc_curve(p[:, 2], scores)
    return tar_at_far(fpr, tpr, FARS)


@pytest.mark.slow
def test_cli_end_to_end_with_cache(ijbc, model_file, tmp_path, cli):
    root, gt = ijbc
    cache, out = tmp_path / "feats.h5", tmp_path / "out"
    before = PixelEmbed.images_seen
    r = cli("eval", "ijbc", "--root", root, "--model", model_file, "--cache", cache, "--out", out,
            "--workers", "0", "--batch-size", "16", "--one-to-n")
    assert r.exit_code == 0, r.output
    n = len(gt["names"])
    assert PixelEmbed.images_seen - before == 2 * n  # crops + flipped crops
    stem = run_name(model_file)  # results are named after the run: <folder>_<file>
    res = json.loads((out / f"{stem}_N1D1F1.json").read_text())
    assert res["images"] == n and res["images_extracted"] == n and res["pairs"] == len(gt["pairs"])
    assert (out / f"{stem}_N1D1F1_roc.png").read_bytes()[:4] == b"\x89PNG"
    # the whole pipeline (alignment -> features -> aggregation -> scores -> TAR) equals the naive loops
    meta = ijb.read_meta(root)
    feats, flips = FeatureCache(cache).get(next(iter(_keys(cache))))
    ref = _naive_reference(root, gt, feats, flips)
    for k, v in ref.items():
        assert res["tar_at_far"][k]["closest"] == pytest.approx(v["closest"])
    assert res["tar_at_far"]["1e-01"]["closest"] > 0.4  # the pixel embedder tells synthetic identities apart
    one = res["one_to_n"]
    assert set(one) == {"G1", "G2", "mean"} and one["G1"]["probes"] == 12 and one["G1"]["mated_probes"] == 6
    assert 0.5 <= one["mean"]["rank1"] <= one["mean"]["rank5"] <= 1.0
    # an aligned crop puts the landmarks on the arcface template: check one image's features directly
    from facetool.detect.align import align_5pt
    from facetool.detect.retinaface import read_rgb

    crop, _ = align_5pt(read_rgb(root / "loose_crop" / gt["names"][0]), meta.landmarks[0])
    m = create_model("test_pixel_embed")
    with torch.no_grad():
        direct = m(torch.from_numpy((crop.astype(np.float32) - 127.5) / 127.5).permute(2, 0, 1)[None])[0].numpy()
    np.testing.assert_allclose(feats[0], direct, rtol=1e-4, atol=1e-5)

    # second run, other switches: every feature comes from the cache
    seen = PixelEmbed.images_seen
    r = cli("eval", "ijbc", "--root", root, "--model", model_file, "--cache", cache, "--out", out,
            "--workers", "0", "--no-det-score", "--no-norm")
    assert r.exit_code == 0, r.output
    assert PixelEmbed.images_seen == seen
    res2 = json.loads((out / f"{stem}_N0D0F1.json").read_text())
    assert res2["images_extracted"] == 0 and res2["switches"] == {"norm": False, "det_score": False, "flip": True}


def _keys(cache: Path):
    import h5py

    with h5py.File(cache, "r") as f:
        return list(f.keys())


def test_cli_errors_are_one_line(ijbc, model_file, tmp_path, cli):
    r = cli("eval", "ijbb", "--root", ijbc[0], "--model", model_file, "--out", tmp_path)
    assert r.exit_code != 0 and "missing IJB meta file" in r.output and "ijbb_face_tid_mid.txt" in r.output
    assert "Traceback" not in r.output
    r = cli("eval", "ijbc", "--root", ijbc[0], "--model", tmp_path / "nope.pt")
    assert r.exit_code != 0 and "model not found" in r.output


class _Interrupting(torch.nn.Module):
    """Embeds like a fixed projection and raises Ctrl-C at its ``fail_at``-th batch."""

    def __init__(self, fail_at: int | None) -> None:
        super().__init__()
        self.fail_at, self.batches, self.images = fail_at, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_at is not None and self.batches == self.fail_at:
            raise KeyboardInterrupt
        self.batches += 1
        self.images += x.shape[0]
        return x.mean((2, 3))


def test_feature_cache_resumes_after_interrupt(tmp_path):
    rng = np.random.default_rng(0)
    images = ImageArray(rng.integers(0, 255, (40, 8, 8, 3), dtype=np.uint8))
    cache = FeatureCache(tmp_path / "c.h5")
    m = _Interrupting(fail_at=6)  # flip doubles the calls: 3 batches of 4 images done
    with pytest.raises(KeyboardInterrupt):
        cache.extract("k", m, images, batch_size=4, chunk_rows=8)
    assert not cache.path.exists() and cache.partial.exists()
    m2 = _Interrupting(None)
    feats, flips, n_new = cache.extract("k", m2, images, batch_size=4, chunk_rows=8)
    assert n_new == 28 and m2.images == 2 * 28  # resumed after the 12 flushed rows
    full = _Interrupting(None)
    x = (torch.from_numpy(images.images).permute(0, 3, 1, 2).float() - 127.5) / 127.5
    np.testing.assert_allclose(feats, full(x).numpy(), rtol=1e-6)
    np.testing.assert_allclose(flips, full(x.flip(-1)).numpy(), rtol=1e-6)
    assert cache.path.exists() and not cache.partial.exists()
    m3 = _Interrupting(None)
    assert cache.extract("k", m3, images)[2] == 0 and m3.images == 0  # a hit
    cache.extract("other", m3, images, flip=False)  # a second entry joins the file
    assert sorted(_keys(cache.path)) == ["k", "other"] and cache.get("other", flip=True) is None
