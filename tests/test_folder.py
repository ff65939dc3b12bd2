"""`prepare folder`: real faces (cut out of insightface's t1.jpg) in identity folders."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from facetool.data.folder import prepare_folder
from facetool.data.imdbface import report_path
from facetool.detect import ARCFACE_DST, RetinaFace, read_rgb
from facetool.errors import FacetoolError
from facetool.store import FaceStore


@pytest.fixture(scope="module")
def faces_dir(tmp_path_factory) -> Path:
    """id_a: faces 0-2, id_b: faces 3-5 + one picture without a face, id_c: one face (for --min-images)."""
    spec = importlib.util.find_spec("insightface")
    t1 = read_rgb(Path(spec.origin).parent / "data" / "images" / "t1.jpg")
    det = RetinaFace().detect(t1)
    boxes = det.boxes[np.argsort(det.boxes[:, 0])]
    root = tmp_path_factory.mktemp("folder") / "faces"
    for i, b in enumerate(boxes):
        w, h = b[2] - b[0], b[3] - b[1]
        x0, y0 = int(max(0, b[0] - w / 2)), int(max(0, b[1] - h / 2))
        crop = t1[y0 : int(b[3] + h / 2), x0 : int(b[2] + w / 2)]
        d = root / ("id_a" if i < 3 else "id_b")
        d.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(d / f"{i:04d}_01.jpg"), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    sky = np.tile(np.linspace(60, 200, 160, dtype=np.uint8)[:, None, None], (1, 200, 3))
    cv2.imwrite(str(root / "id_b" / "0099_01.jpg"), sky)  # a gradient: no face
    (root / "id_c").mkdir()
    cv2.imwrite(str(root / "id_c" / "0001_01.png"), cv2.cvtColor(t1[250:420, 40:190], cv2.COLOR_RGB2BGR))
    (root / "id_b" / "notes.txt").write_text("not an image")
    return root


def test_detect_align_and_counts(faces_dir, tmp_path):
    out = tmp_path / "f.h5"
    _, rep = prepare_folder(faces_dir, out, min_images=2, test_fraction=0.0)
    assert (rep["identities"], rep["images"]) == (2, 6)
    assert rep["dropped"] == {"no face": 1, "too few images": 1}
    assert json.loads(report_path(out).read_text())["images"] == 6
    with FaceStore(out) as s:
        assert s.identities == ["id_a", "id_b"] and s.image_size == (112, 112)
        assert np.bincount(s.labels).tolist() == [3, 3]
        err = np.linalg.norm(s.landmarks - ARCFACE_DST, axis=2).mean(1)
        assert (err < 8).all()  # detected points sit on the template after alignment
        assert not np.isnan(s.bboxes).any()
        imgs = s.images()
    # an aligned face is bright in the middle (skin), the black border is at most a corner
    assert imgs[:, 40:80, 40:80].mean() > 60


def test_aligned_mode_resizes_everything(faces_dir, tmp_path):
    out = tmp_path / "a.h5"
    _, rep = prepare_folder(faces_dir, out, aligned=True, size=64, test_fraction=0.5)
    assert rep["images"] == 8 and rep["identities"] == 3 and rep["dropped"] == {}
    assert (rep["train"], rep["test"]) == (4, 4)  # round(3·.5)=2 (id_a), round(4·.5)=2 (id_b), round(.5)=0 (id_c)
    with FaceStore(out) as s:
        assert s.image_size == (64, 64)
        k = s.sources.index("id_c/0001_01.png")
        src = read_rgb(faces_dir / "id_c" / "0001_01.png")
        np.testing.assert_allclose(s.images([k])[0], cv2.resize(src, (64, 64), interpolation=cv2.INTER_AREA), atol=1)


def test_per_identity_replaces_unreadable_files(faces_dir, tmp_path, cli):
    """An identity of 5 files, 2 of them corrupt, --per-identity 3: the corrupt files are replaced by
    the identity's other files before the split, so it keeps 3 images; the report counts both."""
    root = tmp_path / "faces"
    src = faces_dir / "id_a" / "0000_01.jpg"
    for name, n in (("id_a", 5), ("id_b", 4)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{i}.jpg").write_bytes(src.read_bytes())
    for i in (1, 3):
        (root / "id_a" / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    out = tmp_path / "p.h5"
    _, rep = prepare_folder(root, out, aligned=True, size=32, per_identity=3, test_fraction=1 / 3, seed=0)
    assert (rep["identities"], rep["images"], rep["train"], rep["test"]) == (2, 6, 4, 2)
    assert rep["dropped"] == {"unreadable": 2, "not sampled": 1}  # id_b: 1 of 4 not sampled; id_a: none left
    assert json.loads(report_path(out).read_text())["dropped"]["unreadable"] == 2
    with FaceStore(out) as s:
        assert np.bincount(s.labels).tolist() == [3, 3]
        assert sorted(x for x in s.sources if x.startswith("id_a")) == ["id_a/0.jpg", "id_a/2.jpg", "id_a/4.jpg"]
        layout = (list(s.sources), s.labels.tolist(), s.split.tolist())
    _, rep2 = prepare_folder(root, tmp_path / "w.h5", aligned=True, size=32, per_identity=3, test_fraction=1 / 3,
                             seed=0, workers=3)  # files decoded on a thread pool: the same store
    with FaceStore(tmp_path / "w.h5") as s:
        assert (list(s.sources), s.labels.tolist(), s.split.tolist()) == layout
    # too few readable images: with --min-images 4, id_a (5 files, 3 readable) is dropped
    _, rep = prepare_folder(root, tmp_path / "q.h5", aligned=True, size=32, per_identity=3, min_images=4)
    assert rep["identities"] == 1 and rep["dropped"] == {"unreadable": 2, "too few readable images": 3,
                                                         "not sampled": 1}
    r = cli("prepare", "folder", root, "--out", tmp_path / "c.h5", "--aligned", "--size", "32", "--per-identity", "3")
    assert r.exit_code == 0, r.output
    assert json.loads(report_path(tmp_path / "c.h5").read_text())["images"] == 6


def test_folder_cli_and_errors(faces_dir, tmp_path, cli):
    out = tmp_path / "c.h5"
    r = cli("prepare", "folder", faces_dir, "--out", out, "--min-images", 2)
    assert r.exit_code == 0, r.output
    assert "no face" in r.output and out.exists()
    r = cli("prepare", "folder", tmp_path / "missing", "--out", tmp_path / "m.h5")
    assert r.exit_code != 0 and "dataset folder not found" in r.output
    with pytest.raises(FacetoolError, match="no images left"):
        prepare_folder(faces_dir, tmp_path / "x.h5", min_images=50)
