"""`facetool prepare landmarks`: 300W (.pts, 1-based) and WFLW (98-point list lines) into a face store, on
fixtures written here in the exact formats; bad annotation files are one-line errors naming file and line."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from conftest import run_facetool
from facetool.data.landmarks import WFLW98_TO_IBUG68
from facetool.store import FaceStore
from test_landmarks import symmetric_face, wflw_line


def _image(h: int, w: int, dots: list[tuple[int, int]]) -> np.ndarray:
    img = np.full((h, w, 3), 30, np.uint8)
    for x, y in dots:
        img[y, x] = 255
    return img


def _write_pts(path, points: np.ndarray, n_points: int | None = None) -> None:
    body = "\n".join(f"{x + 1:.3f} {y + 1:.3f}" for x, y in points)  # the file is 1-based
    path.write_text(f"version: 1\nn_points:  {n_points or len(points)}\n{{\n{body}\n}}\n")


@pytest.fixture
def w300(tmp_path):
    """Three 300W-style faces in two folders: image + .pts; a single bright pixel at landmark 30."""
    root = tmp_path / "300W"
    face = symmetric_face("ibug68")  # x in [10, 90], y in [30, 90]; point 30 at (50, 50)
    for k, (folder, shift) in enumerate([("afw", (0, 0)), ("afw", (7, 3)), ("helen/trainset", (12, 9))]):
        (root / folder).mkdir(parents=True, exist_ok=True)
        pts = face + np.array(shift, float)
        x30, y30 = (int(v) for v in pts[30])
        cv2.imwrite(str(root / folder / f"img{k}.png"), _image(120, 115, [(x30, y30)]))
        _write_pts(root / folder / f"img{k}.pts", pts)
    return root


def test_300w_import_crops_and_moves_the_points(tmp_path, w300):
    out = tmp_path / "300w.h5"
    r = run_facetool("prepare", "landmarks", "--format", "300w", "--root", w300, "--out", out, "--size", "256",
                     "--test-fraction", "0.34")
    assert r.returncode == 0, r.stderr
    assert "ibug68" in r.stdout
    with FaceStore(out) as s:
        assert len(s) == 3 and s.num_classes == 3 and s.image_size == (256, 256)
        assert sorted(s.sources) == ["afw/img0.png", "afw/img1.png", "helen/trainset/img2.png"]
        assert (s.split == 1).sum() == 1
        pts, vis, conv = s.landmark_set()
        assert conv == "ibug68" and vis.all()
        imgs = s.images()
        for i in range(3):
            # the crop is the square around the landmarks' box, 1.5 x its longer side (margin 0.25), centred
            face = symmetric_face("ibug68")
            lo, hi = face.min(0), face.max(0)
            scale = 256 / (1.5 * max(hi - lo))
            np.testing.assert_allclose((pts[i].min(0) + pts[i].max(0)) / 2, [127.5, 127.5], atol=1e-3)
            np.testing.assert_allclose(pts[i] - pts[i][30], (face - face[30]) * scale, atol=5e-3)  # .pts: 3 decimals
            # the image moved with the points: the bright pixel (landmark 30, 0-based) lands on stored point 30.
            # Without subtracting 1 from the .pts coordinates it would be 1 x scale = 2.1 px away.
            g = imgs[i].astype(float).mean(2)
            w = np.clip(g - 60, 0, None)
            ys, xs = np.mgrid[0:256, 0:256]
            centroid = np.array([(w * xs).sum(), (w * ys).sum()]) / w.sum()
            assert np.linalg.norm(centroid - pts[i][30]) < 0.3, (centroid, pts[i][30])
        # the 5 alignment points come from the 68 (eye centres, nose tip, mouth corners)
        np.testing.assert_allclose(s.landmarks[:, 2], pts[:, 30])
        np.testing.assert_allclose(s.landmarks[:, 0], pts[:, 36:42].mean(1), atol=1e-4)
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["images"] == 3 and rep["settings"]["identities"] == "image"
    r = run_facetool("info", out)  # a command on the file the import wrote
    assert r.returncode == 0 and "68 points, 100.0% visible" in r.stdout, r.stdout + r.stderr


def test_300w_identities_from_folders_and_a_list(tmp_path, w300):
    lst = tmp_path / "list.txt"
    lst.write_text("afw/img1.png\nhelen/trainset/img2.png\n")
    out = tmp_path / "f.h5"
    r = run_facetool("prepare", "landmarks", "--format", "300w", "--root", w300, "--list", lst, "--out", out,
                     "--size", "32", "--identities", "folder")
    assert r.returncode == 0, r.stderr
    with FaceStore(out) as s:
        assert s.identities == ["afw", "helen/trainset"] and len(s) == 2


def test_wflw_import_stores_98_points_their_68_reduction_and_the_flags(tmp_path):
    root = tmp_path / "WFLW_images"
    face = symmetric_face("wflw98")
    lines = []
    for k, (folder, flags) in enumerate([("0--Parade", (1, 0, 0, 0, 1, 0)), ("0--Parade", (0, 0, 1, 0, 0, 0)),
                                         ("1--Handshaking", (0, 1, 0, 1, 0, 1))]):
        (root / folder).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / folder / f"f{k}.jpg"), _image(110, 105, []))
        pts = face + k
        lines.append(wflw_line(pts, box=(5 + k, 20 + k, 95 + k, 98 + k), flags=flags, path=f"{folder}/f{k}.jpg"))
    lst = tmp_path / "list_98pt_rect_attr_test.txt"
    lst.write_text("\n".join(lines) + "\n")
    out = tmp_path / "wflw.h5"
    r = run_facetool("prepare", "landmarks", "--format", "wflw", "--root", root, "--list", lst, "--out", out,
                     "--size", "64", "--identities", "folder", "--test-fraction", "0.5")
    assert r.returncode == 0, r.stderr
    with FaceStore(out) as s:
        assert s.landmark_conventions == ["ibug68", "wflw98"]
        p98, v98, _ = s.landmark_set("wflw98")
        p68, v68, _ = s.landmark_set("ibug68")
        assert p98.shape == (3, 98, 2) and p68.shape == (3, 68, 2)
        np.testing.assert_array_equal(p68, p98[:, list(WFLW98_TO_IBUG68)])
        np.testing.assert_allclose(s.bboxes[2], [7, 22, 97, 100])
        codes, vals = s.attribute("occlusion")
        assert vals == ["no", "yes"] and list(codes) == [1, 0, 0]
        assert list(s.attribute("blur")[0]) == [0, 0, 1]
        assert s.identities == ["0--Parade", "1--Handshaking"] and (s.split == 1).sum() in (1, 2)
        # the scale: 64 px over 1.5 x the longer side of the 98 points' box
        lo, hi = face.min(0), face.max(0)
        np.testing.assert_allclose(p98[0, 16] - p98[0, 0], (face[16] - face[0]) * 64 / (1.5 * max(hi - lo)),
                                   atol=1e-3)


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def test_bad_annotation_files_are_one_line_errors(tmp_path, w300):
    out = tmp_path / "x.h5"
    args = ("prepare", "landmarks", "--format", "300w", "--root", w300, "--out", out)
    (w300 / "afw" / "img1.pts").unlink()  # an image without its .pts
    _one_line_error(run_facetool(*args), "img1.png has no landmarks file img1.pts")
    _write_pts(w300 / "afw" / "img1.pts", symmetric_face("ibug68")[:60], n_points=68)  # wrong n_points
    _one_line_error(run_facetool(*args), "img1.pts: n_points says 68 but the file lists 60 points")
    _write_pts(w300 / "afw" / "img1.pts", symmetric_face("ibug68")[:60])  # a consistent 60-point file
    _one_line_error(run_facetool(*args), "img1.pts: 60 points, expected 68")
    (w300 / "afw" / "img1.pts").write_text("version: 1\nn_points: 68\n{\n1 2\n3 oops\n}\n")
    _one_line_error(run_facetool(*args), "img1.pts:5: expected two numbers")
    assert not out.exists()

    root = tmp_path / "W"
    (root / "a").mkdir(parents=True)
    cv2.imwrite(str(root / "a" / "f.jpg"), _image(100, 100, []))
    good = wflw_line(symmetric_face("wflw98"), path="a/f.jpg")
    lst = tmp_path / "list.txt"
    lst.write_text(good + "\n" + " ".join(good.split()[2:]) + "\n")  # line 2 lacks two coordinates
    wargs = ("prepare", "landmarks", "--format", "wflw", "--root", root, "--out", out)
    _one_line_error(run_facetool(*wargs, "--list", lst), f"{lst}:2: expected 207 fields", "got 205")
    lst.write_text(good.replace("a/f.jpg", "a/missing.jpg") + "\n")
    _one_line_error(run_facetool(*wargs, "--list", lst), f"{lst}:1: image not found")
    _one_line_error(run_facetool(*wargs), "--format wflw needs --list")
    _one_line_error(run_facetool(*args[:3], "wflx", *args[4:]), "unknown --format 'wflx'")
    assert not out.exists()
