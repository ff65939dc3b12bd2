"""`prepare imdb-face` on a fixture in the exact distributed CSV format."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from facetool.data.imdbface import prepare_imdbface, report_path
from facetool.detect import ARCFACE_DST, RetinaFace, read_rgb
from facetool.errors import FacetoolError
from facetool.io import partial_path
from facetool.store import FaceStore

HEADER = "name,index,image,rect,height width,url"
RECT = "80 60 240 220"  # in the 320x400 (h w) frame: a 160x160 box; the files are 160x200 -> (40, 30, 120, 110)
FRAME = "320 400"


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    return cv2.resize(small, (200, 160), interpolation=cv2.INTER_CUBIC)  # smooth: survives JPEG


def _write(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(_image(seed), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])


def make_imdb(root: Path) -> Path:
    """Alice (nm001/): 6 valid + 1 bad aspect; Bob (Bob_nm002/): 5 valid + 1 corrupt + 1 missing (with
    5 per identity he keeps 5: the corrupt file, when drawn, is replaced by his remaining valid one);
    Carol (Carol/): 2 valid (too few at min_images=3); Gus (nm005/): 2 valid + 1 corrupt (3 rows, but
    only 2 readable: dropped after reading); two unparsable rows. 21 rows."""
    rows = [HEADER]
    for i in range(6):
        _write(root / "nm001" / f"a{i}.jpg", i)
        rows.append(f"Alice,nm001,a{i}.jpg,{RECT},{FRAME},http://example.com/a{i}.jpg")
    _write(root / "nm001" / "wide.jpg", 50)
    rows.append(f"Alice,nm001,wide.jpg,0 0 300 100,{FRAME},http://x/wide.jpg")  # aspect 3
    for i in range(5):
        _write(root / "Bob_nm002" / f"b{i}.jpg", 10 + i)
        rows.append(f"Bob,nm002,b{i}.jpg,{RECT},{FRAME},http://x/b{i}.jpg")
        if i == 1:
            (root / "Bob_nm002" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
            rows.append(f"Bob,nm002,corrupt.jpg,{RECT},{FRAME},http://x/c.jpg")
    rows.append(f"Bob,nm002,missing.jpg,{RECT},{FRAME},http://x/m.jpg")
    for i in range(2):
        _write(root / "Carol" / f"c{i}.jpg", 20 + i)
        rows.append(f"Carol,nm003,c{i}.jpg,{RECT},{FRAME},http://x/c{i}.jpg")
    rows.append("Dan,nm004,d.jpg,abc,320 400,http://x/d.jpg")
    rows.append(f"Eve,nm001,../nm001/a0.jpg,{RECT},{FRAME},http://x/e.jpg")  # no paths outside the folder
    _write(root / "nm005" / "g0.jpg", 30)
    (root / "nm005" / "g1.jpg").write_bytes(b"")  # an empty download
    _write(root / "nm005" / "g2.jpg", 32)
    rows += [f"Gus,nm005,g{i}.jpg,{RECT},{FRAME},http://x/g{i}.jpg" for i in range(3)]
    csv = root / "IMDb-Face.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


OPTS = dict(min_images=3, per_identity=5, test_fraction=0.2, seed=0)
ROWS = 21
# seed 0 draws Bob's corrupt file among his first 5 (-> unreadable, replaced by b4); Alice: 1 of 6 not sampled;
# Gus: 1 unreadable, so his 2 readable rows are dropped too
EXPECTED_DROPS = {"aspect": 1, "bad row": 2, "missing file": 1, "not sampled": 1, "too few images": 2,
                  "too few readable images": 2, "unreadable": 2}


@pytest.fixture
def imdb(tmp_path) -> Path:
    root = tmp_path / "images"
    make_imdb(root)
    return root


def test_counts_crops_and_report(imdb, tmp_path):
    out = tmp_path / "imdb.h5"
    path, rep = prepare_imdbface(None, imdb, out, **OPTS)  # CSV defaults to <root>/IMDb-Face.csv
    assert path == out and not partial_path(out).exists()
    assert rep["dropped"] == EXPECTED_DROPS
    # 5 asked -> 5 kept for Bob although his corrupt file was drawn: split 4/1 like Alice's
    assert (rep["identities"], rep["images"], rep["train"], rep["test"]) == (2, 10, 8, 2)
    assert rep["images"] + sum(rep["dropped"].values()) == ROWS  # every row is accounted for once
    assert json.loads(report_path(out).read_text())["dropped"] == EXPECTED_DROPS
    with FaceStore(out) as s:
        assert s.identities == ["Alice_nm001", "Bob_nm002"]
        assert s.image_size == (128, 128)
        labels, split, sources = s.labels, s.split, s.sources
        assert np.bincount(labels).tolist() == [5, 5]
        assert [int(split[labels == k].sum()) for k in (0, 1)] == [1, 1]  # round(5 · 0.2) test images each
        assert sorted(x for x in sources if x.startswith("Bob")) == [f"Bob_nm002/b{i}.jpg" for i in range(5)]
        assert all(x.startswith(("nm001/", "Bob_nm002/")) for x in sources)
        np.testing.assert_allclose(s.bboxes, np.tile([40, 30, 120, 110], (10, 1)))  # rect rescaled to the file
        assert np.isnan(s.landmarks).all()
        k = sources.index("nm001/a2.jpg")
        crop = s.images([k])[0]
    img = read_rgb(imdb / "nm001" / "a2.jpg")
    expected = cv2.resize(img[30:110, 40:120], (128, 128), interpolation=cv2.INTER_LINEAR)
    # inside its 1-px border (where resizing the cut-out replicates edges) the crop is the resized box
    assert np.abs(crop.astype(int) - expected)[1:-1, 1:-1].max() <= 2
    # the crop is not some other region of the picture
    assert np.abs(crop.astype(int) - cv2.resize(img[0:80, 0:80], (128, 128))).mean() > 10


def test_same_seed_same_store_other_seed_other_sample(imdb, tmp_path):
    prepare_imdbface(None, imdb, tmp_path / "a.h5", **OPTS)
    prepare_imdbface(None, imdb, tmp_path / "b.h5", **OPTS, workers=3)  # rows decoded by 3 threads
    with FaceStore(tmp_path / "a.h5") as a, FaceStore(tmp_path / "b.h5") as b:
        assert a.sources == b.sources and (a.split == b.split).all() and (a.images() == b.images()).all()
    srcs, unreadable = set(), []
    for seed in range(6):  # 5 of Alice's 6 images are sampled: seeds pick different ones
        _, rep = prepare_imdbface(None, imdb, tmp_path / f"s{seed}.h5", **{**OPTS, "seed": seed})
        with FaceStore(tmp_path / f"s{seed}.h5") as s:
            srcs.add(tuple(x for x in s.sources if x.startswith("nm001")))
            # whether or not Bob's corrupt file is drawn, he keeps his 5 readable images, split 4/1
            bob = np.array([x.startswith("Bob") for x in s.sources])
            assert bob.sum() == 5 and s.split[bob].sum() == 1
        assert rep["images"] + sum(rep["dropped"].values()) == ROWS
        # Bob's corrupt row is either drawn (unreadable, replaced) or not (not sampled); Gus's always read
        assert rep["dropped"]["unreadable"] + rep["dropped"]["not sampled"] == 1 + 1 + 1
        unreadable.append(rep["dropped"]["unreadable"])
    assert len(srcs) > 1
    assert 2 in unreadable  # seeds that drew the corrupt file replaced it (seed 0 does)


def test_min_images_is_checked_even_when_fewer_are_sampled(imdb, tmp_path):
    """--per-identity 2 < --min-images 3: 3 readable images are still required (Gus has 2 of 3 rows)."""
    _, rep = prepare_imdbface(None, imdb, tmp_path / "s.h5", **{**OPTS, "per_identity": 2})
    assert (rep["identities"], rep["images"]) == (2, 4)
    assert rep["dropped"]["too few readable images"] == 2 and rep["images"] + sum(rep["dropped"].values()) == ROWS


def test_cli_table_json_and_errors(imdb, tmp_path, cli):
    out = tmp_path / "cli.h5"
    r = cli("prepare", "imdb-face", "--csv", imdb / "IMDb-Face.csv", "--root", imdb, "--out", out,
            "--min-images", 3, "--per-identity", 5)
    assert r.exit_code == 0, r.output
    assert "unreadable" in r.output and "too few images" in r.output and report_path(out).exists()
    assert "too few readable images" in r.output
    # existing output
    r = cli("prepare", "imdb-face", "--root", imdb, "--out", out, "--min-images", 3)
    assert r.exit_code == 2 and " exists" in r.output and "Traceback" not in r.output
    # nothing left after filtering
    r = cli("prepare", "imdb-face", "--root", imdb, "--out", tmp_path / "none.h5", "--min-images", 100)
    assert r.exit_code != 0 and "no images left" in r.output and "too few images: 17" in r.output
    assert not (tmp_path / "none.h5").exists()


def test_missing_columns_and_files(imdb, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("name,index,image,box,url\nAlice,nm001,a0.jpg,1 2 3 4,http://x\n")
    with pytest.raises(FacetoolError, match=r"missing column\(s\) 'rect', 'height width'"):
        prepare_imdbface(bad, imdb, tmp_path / "x.h5", **OPTS)
    with pytest.raises(FacetoolError, match="IMDb-Face CSV not found"):
        prepare_imdbface(tmp_path / "nope.csv", imdb, tmp_path / "x.h5", **OPTS)
    with pytest.raises(FacetoolError, match="image root not found"):
        prepare_imdbface(None, tmp_path / "nowhere", tmp_path / "x.h5", **OPTS)
    with pytest.raises(FacetoolError, match="unknown --align"):
        prepare_imdbface(None, imdb, tmp_path / "x.h5", align="mtcnn")


def test_ctrl_c_then_resume_gives_the_same_store(imdb, tmp_path, monkeypatch):
    import facetool.detect.retinaface as rf

    real, calls = rf.read_rgb, {"n": 0}

    def counting(path):
        calls["n"] += 1
        return real(path)

    monkeypatch.setattr(rf, "read_rgb", counting)
    prepare_imdbface(None, imdb, tmp_path / "ref.h5", **OPTS)
    total = calls["n"]
    assert total == 5 + 6 + 3  # Alice: 5 drawn; Bob: 5 + the replacement of the corrupt file; Gus: 3

    def flaky(path):
        calls["n"] += 1
        if calls["n"] == 8:  # inside Bob, the second identity: Alice is done
            raise KeyboardInterrupt
        return real(path)

    out = tmp_path / "run.h5"
    calls["n"] = 0
    monkeypatch.setattr(rf, "read_rgb", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_imdbface(None, imdb, out, **OPTS)
    monkeypatch.setattr(rf, "read_rgb", counting)
    assert not out.exists() and partial_path(out).exists()
    with pytest.raises(FacetoolError, match="other settings"):
        prepare_imdbface(None, imdb, out, **{**OPTS, "seed": 1}, resume=True)
    calls["n"] = 0
    _, rep = prepare_imdbface(None, imdb, out, **OPTS, resume=True)
    assert calls["n"] == total - 5  # only the identities after the interruption were read again
    assert rep["dropped"] == EXPECTED_DROPS
    with FaceStore(tmp_path / "ref.h5") as a, FaceStore(out) as b:
        assert a.sources == b.sources and (a.labels == b.labels).all() and (a.images() == b.images()).all()
        assert (a.split == b.split).all()


def _t1() -> np.ndarray:
    spec = importlib.util.find_spec("insightface")
    return read_rgb(Path(spec.origin).parent / "data" / "images" / "t1.jpg")


def test_retinaface_alignment_mode(tmp_path):
    root = tmp_path / "imdb"
    (root / "nm009").mkdir(parents=True)
    t1 = _t1()
    cv2.imwrite(str(root / "nm009" / "t1.jpg"), cv2.cvtColor(t1, cv2.COLOR_RGB2BGR))
    faces = RetinaFace().detect(t1)
    h, w = t1.shape[:2]
    rows = [HEADER]
    for i, b in enumerate(faces.boxes):  # square boxes around each face, written in a 2x frame
        cx, cy, r = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, 70
        rows.append(f"Six,nm009,t1.jpg,{2*(cx-r):.1f} {2*(cy-r):.1f} {2*(cx+r):.1f} {2*(cy+r):.1f},{2*h} {2*w},u{i}")
    rows.append(f"Six,nm009,t1.jpg,{2*600} {2*20} {2*680} {2*100},{2*h} {2*w},background")  # no face there
    (root / "IMDb-Face.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "aligned.h5"
    _, rep = prepare_imdbface(None, root, out, min_images=1, per_identity=None, align="retinaface", test_fraction=0.0)
    assert rep["images"] == 6 and rep["dropped"] == {"no face": 1}
    with FaceStore(out) as s:
        assert s.image_size == (112, 112)
        err = np.linalg.norm(s.landmarks - ARCFACE_DST, axis=2).mean(1)
        assert (err < 8).all()
        # each stored box is the detection of the face the row pointed at
        centres = (s.bboxes[:, :2] + s.bboxes[:, 2:]) / 2
        want = (faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2
        assert np.abs(centres - want).max() < 6
