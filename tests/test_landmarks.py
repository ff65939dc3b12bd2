"""Landmark conventions (iBUG 68, WFLW 98), flip permutations and the 300W / WFLW readers."""

from __future__ import annotations

import numpy as np
import pytest

from facetool.data.landmarks import (CONVENTIONS, WFLW98_TO_IBUG68, flip_landmarks, parse_wflw_line, read_pts,
                                     to_ibug68)
from facetool.errors import FacetoolError

W = 101  # image width: the face's axis of symmetry is x = (W - 1) / 2 = 50
CX = (W - 1) / 2


def _ring(cx: float, cy: float, rx: float, ry: float, n: int) -> list[tuple[float, float]]:
    """n points clockwise on screen (y down) from the left corner: over the top, then the bottom."""
    phi = np.pi - 2 * np.pi * np.arange(n) / n
    return [(cx + rx * np.cos(p), cy - ry * np.sin(p)) for p in phi]


def _line(x0: float, x1: float, y: float, n: int) -> list[tuple[float, float]]:
    return [(x, y) for x in np.linspace(x0, x1, n)]


def _jaw(n: int) -> list[tuple[float, float]]:
    t = np.linspace(np.pi, 0, n)  # left temple -> chin -> right temple
    return [(CX + 40 * np.cos(a), 40 + 50 * np.sin(a)) for a in t]


def symmetric_face(name: str) -> np.ndarray:
    """A left/right-symmetric face traced in each convention's point order (as the annotation guides
    describe it: contours left to right, eyes and lips clockwise from their left corner), independent of
    the mirror tables under test."""
    if name == "ibug68":
        pts = _jaw(17)
        pts += _line(CX - 35, CX - 5, 30, 5) + _line(CX + 5, CX + 35, 30, 5)       # brows
        pts += [(CX, 35 + 5 * k) for k in range(4)]                               # bridge
        pts += [(CX - 8 + 4 * k, 58 - 2 * (2 - abs(k - 2))) for k in range(5)]   # nostrils
        pts += _ring(CX - 20, 40, 8, 3, 6) + _ring(CX + 20, 40, 8, 3, 6)          # eyes
        pts += _ring(CX, 72, 15, 6, 12) + _ring(CX, 72, 10, 2, 8)                 # lips
    else:
        pts = _jaw(33)
        for x0 in (CX - 35, CX + 5):                                              # brows: upper L->R, lower R->L
            pts += _line(x0, x0 + 30, 28, 5) + _line(x0 + 26, x0 + 4, 31, 4)
        pts += [(CX, 35 + 5 * k) for k in range(4)]
        pts += [(CX - 8 + 4 * k, 58 - 2 * (2 - abs(k - 2))) for k in range(5)]
        pts += _ring(CX - 20, 40, 8, 3, 8) + _ring(CX + 20, 40, 8, 3, 8)
        pts += _ring(CX, 72, 15, 6, 12) + _ring(CX, 72, 10, 2, 8)
        pts += [(CX - 20, 40), (CX + 20, 40)]                                     # pupils
    return np.asarray(pts, dtype=np.float64)


@pytest.mark.parametrize("name", ["ibug68", "wflw98"])
def test_convention_tables(name):
    conv = CONVENTIONS[name]
    assert conv.num_points == {"ibug68": 68, "wflw98": 98}[name]
    perm = np.asarray(conv.flip_permutation)
    assert sorted(perm) == list(range(conv.num_points))
    assert (perm[perm] == np.arange(conv.num_points)).all()  # an involution
    every = sorted(i for idx in conv.groups.values() for i in idx)
    assert every == list(range(conv.num_points))  # the groups partition the points
    a, b = conv.inter_ocular
    assert perm[a] == b and conv.group_of(a) == conv.group_of(b) == "eyes"


def test_ibug68_ranges_and_known_pairs():
    g = CONVENTIONS["ibug68"].groups
    assert g["jaw"] == tuple(range(17)) and g["brows"] == tuple(range(17, 27))
    assert g["nose"] == tuple(range(27, 36)) and g["eyes"] == tuple(range(36, 48))
    assert g["lips"] == tuple(range(48, 68))
    perm = CONVENTIONS["ibug68"].flip_permutation
    # the iBUG mirror table (face-alignment's shuffle_lr): a few entries checked by hand
    assert [perm[i] for i in (0, 8, 17, 21, 27, 31, 33, 36, 39, 40, 41, 48, 51, 55, 57, 60, 65, 66)] == \
        [16, 8, 26, 22, 27, 35, 33, 45, 42, 47, 46, 54, 51, 59, 57, 64, 67, 66]
    w = CONVENTIONS["wflw98"].flip_permutation
    assert [w[i] for i in (0, 16, 33, 38, 41, 51, 55, 60, 64, 65, 76, 79, 83, 88, 93, 96)] == \
        [32, 16, 46, 50, 47, 51, 59, 72, 68, 75, 82, 79, 87, 92, 95, 97]


@pytest.mark.parametrize("name", ["ibug68", "wflw98"])
def test_flip_of_a_symmetric_face_is_the_face(name):
    face = symmetric_face(name)
    assert face.shape == (CONVENTIONS[name].num_points, 2)
    flipped = flip_landmarks(face, W, name)
    np.testing.assert_allclose(flipped, face, atol=1e-9)
    # without the permutation the mirrored points would sit on the other side of the face
    side = np.sign(np.round(face[:, 0] - CX, 6))
    mirrored_side = np.sign(np.round((W - 1 - face[:, 0]) - CX, 6))
    assert (side != 0).sum() > CONVENTIONS[name].num_points // 2
    assert (mirrored_side == -side).all()
    perm = np.asarray(CONVENTIONS[name].flip_permutation)
    assert (side[perm] == -side).all()  # every pair swaps sides; midline points map to the midline


@pytest.mark.parametrize("name", ["ibug68", "wflw98"])
def test_flip_twice_is_identity_and_batches(name):
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 111, size=(3, CONVENTIONS[name].num_points, 2)).astype(np.float32)
    np.testing.assert_allclose(flip_landmarks(flip_landmarks(pts, 112, name), 112, name), pts, atol=1e-5)
    one = flip_landmarks(pts[1], 112, name)
    np.testing.assert_array_equal(flip_landmarks(pts, 112, name)[1], one)
    assert one[CONVENTIONS[name].inter_ocular[0], 0] == pytest.approx(111 - pts[1, CONVENTIONS[name].inter_ocular[1], 0])
    with pytest.raises(FacetoolError, match="do not fit"):
        flip_landmarks(pts[:, :5], 112, name)


def test_wflw_to_ibug68_commutes_with_flip():
    assert len(WFLW98_TO_IBUG68) == 68 and len(set(WFLW98_TO_IBUG68)) == 68
    assert WFLW98_TO_IBUG68[36] == 60 and WFLW98_TO_IBUG68[45] == 72 and WFLW98_TO_IBUG68[8] == 16
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 99, size=(98, 2))
    np.testing.assert_allclose(to_ibug68(flip_landmarks(p, 100, "wflw98")), flip_landmarks(to_ibug68(p), 100, "ibug68"))
    # the symmetric WFLW face reduces to a symmetric iBUG face
    np.testing.assert_allclose(flip_landmarks(to_ibug68(symmetric_face("wflw98")), W, "ibug68"),
                               to_ibug68(symmetric_face("wflw98")), atol=1e-9)


def _pts_text(points, n_points=None) -> str:
    n = len(points) if n_points is None else n_points
    body = "\n".join(f"{x} {y}" for x, y in points)
    return f"version: 1\nn_points:  {n}\n{{\n{body}\n}}\n"


def test_read_pts_subtracts_one(tmp_path):
    pts = [(1.0, 1.0), (10.5, 20.0)] + [(float(k + 2), 3.25) for k in range(66)]
    f = tmp_path / "a.pts"
    f.write_text(_pts_text(pts))
    got = read_pts(f, 68)
    assert got.shape == (68, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got[:2], [[0.0, 0.0], [9.5, 19.0]])
    np.testing.assert_allclose(got[2:], np.asarray(pts[2:]) - 1)


@pytest.mark.parametrize("text,match", [
    (_pts_text([(1, 2)] * 67, 68), "n_points says 68 but the file lists 67"),
    (_pts_text([(1, 2)] * 67), "67 points, expected 68"),
    ("version: 1\nn_points: 68\n{\n1 2\n1 x\n}\n", r"b\.pts:5: expected two numbers"),
    ("version: 1\nn_points: 2\n{\n1 2\n1 2\n", "not closed"),
    ("hello\n", r"b\.pts:1: expected"),
    ("version: 1\nn_points: sixty\n{\n}\n", "not an integer"),
])
def test_read_pts_bad_input(tmp_path, text, match):
    f = tmp_path / "b.pts"
    f.write_text(text)
    with pytest.raises(FacetoolError, match=match) as e:
        read_pts(f, 68)
    assert "\n" not in str(e.value)
    with pytest.raises(FacetoolError, match="cannot read"):
        read_pts(tmp_path / "missing.pts")


def wflw_line(points: np.ndarray, box=(1, 2, 3, 4), flags=(0, 1, 0, 0, 1, 0), path="a/b.jpg") -> str:
    nums = [f"{v:.3f}" for v in np.asarray(points).reshape(-1)] + [str(b) for b in box] + [str(f) for f in flags]
    return " ".join(nums + [path])


def test_parse_wflw_line():
    p = np.arange(196, dtype=np.float32).reshape(98, 2) / 4
    rec = parse_wflw_line(wflw_line(p) + "\n")
    np.testing.assert_allclose(rec.points, p)
    np.testing.assert_allclose(rec.box, [1, 2, 3, 4])
    assert rec.flags == {"pose": 0, "expression": 1, "illumination": 0, "make-up": 0, "occlusion": 1, "blur": 0}
    assert rec.path == "a/b.jpg"
    with pytest.raises(FacetoolError, match=r"list\.txt:7: expected 207 fields .* got 206"):
        parse_wflw_line(" ".join(wflw_line(p).split()[1:]), where="list.txt:7")
    with pytest.raises(FacetoolError, match="must be numbers"):
        parse_wflw_line(wflw_line(p).replace("0.250", "x", 1))
