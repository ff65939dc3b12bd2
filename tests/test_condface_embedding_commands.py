"""A CondFace checkpoint written by `facetool train condface` in the embedding commands (issue 18): `dissect
relevance` (LRP through the per-sample kernels, routing held), `eval lfw` and `eval ijbc`, each run as a
subprocess on the file the training command wrote."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from conftest import run_facetool
from fixtures_ijb import make_ijb, write_bin


@pytest.fixture(scope="module")
def condface_run(tmp_path_factory) -> tuple[Path, Path]:
    """(model.pt, store): a tiny CondFace (DGConv, IR-18 at width 4, 32 px) trained two steps on a synthetic store."""
    from facetool.data.synthetic import prepare_synthetic

    d = tmp_path_factory.mktemp("cf_embed")
    store, _ = prepare_synthetic(d / "s.h5", identities=4, per_identity=6, size=32, seed=0)
    r = run_facetool("train", "condface", "--store", store, "--out", d / "run", "--variant", "dgconv", "--width", "4",
                     "--input-size", "32", "--embedding-size", "8", "--epochs", "1", "--max-steps", "2",
                     "--batch-size", "8", cwd=d)
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "run" / "model.pt", Path(store)


def test_dissect_relevance_lrp_on_a_trained_condface_checkpoint(condface_run, tmp_path):
    """Was refused ("LRP cannot canonize module layer2.0 of type DynamicBlock"); now writes every map."""
    model, store = condface_run
    method = "lrp"
    out = tmp_path / "rel"
    r = run_facetool("dissect", "relevance", "--model", model, "--store", store, "--out", out, "--method", method,
                     "--target", "cosine", "--reference", "self", "--limit", 4, "--steps", 2, "--grid", 4,
                     "--patch", 4, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("overlay.png", "mean_maps.png", "curves.csv", "parts.csv", "maps.h5", "metrics.json"):
        assert (out / f).stat().st_size > 0, f
    met = json.loads((out / "metrics.json").read_text())
    assert met["images"] == 4 and met["method"] == method and np.isfinite(met["aopc_morf"])
    with h5py.File(out / "maps.h5") as f:
        maps = f["maps"][:]
    assert maps.shape == (4, 32, 32) and np.isfinite(maps).all()
    assert all(np.abs(m).max() > 0 for m in maps)  # every image has a map, not zeros


def test_eval_lfw_on_a_trained_condface_checkpoint(condface_run, tmp_path):
    from facetool.store import FaceStore

    model, store = condface_run
    with FaceStore(store) as s:
        labels = np.asarray(s.labels)
        rows = {(c, k): int(np.flatnonzero(labels == c)[k]) for c in range(4) for k in range(5)}
        imgs = dict(zip(rows.values(), s.images(list(rows.values()))))
    genuine = [((c, 0), (c, 1)) for c in range(4)] + [((0, 2), (0, 3))]
    impostor = [((c, 4), ((c + 1) % 4, 4)) for c in range(4)] + [((1, 2), (3, 2))]
    bins, issame = [], []
    for pair in genuine + impostor:  # 10 pairs (10 folds need 10)
        for i in pair:
            bins.append(cv2.imencode(".png", cv2.cvtColor(imgs[rows[i]], cv2.COLOR_RGB2BGR))[1].tobytes())
        issame.append(pair[0][0] == pair[1][0])
    pack = write_bin(tmp_path / "lfw.bin", bins, issame)
    r = run_facetool("eval", "lfw", "--bin", pack, "--model", model, "--out", tmp_path / "o", "--workers", "0",
                     cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lfw verification" in r.stdout
    res = json.loads(next(q for q in (tmp_path / "o").glob("*.json") if not q.name.startswith(".")).read_text())
    assert res["pairs"] == 10 and 0.0 <= res["accuracy"] <= 1.0 and res["xnorm"] > 0


def test_eval_ijbc_on_a_trained_condface_checkpoint(condface_run, tmp_path):
    model, _ = condface_run
    root = tmp_path / "IJB"
    make_ijb(root, identities=2, templates_per_id=2, seed=0)
    r = run_facetool("eval", "ijbc", "--root", root, "--model", model, "--out", tmp_path / "o", "--workers", "0",
                     "--batch-size", "8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "IJB-C 1:1" in r.stdout
    res = json.loads(next(q for q in (tmp_path / "o").glob("*.json") if not q.name.startswith(".")).read_text())
    assert res["images_extracted"] == res["images"] > 0 and res["input_size"] == 32
    assert all(np.isfinite(v["closest"]) for v in res["tar_at_far"].values())
