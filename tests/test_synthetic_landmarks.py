"""The synthetic generator's iBUG 68-point landmarks: on the painted features, consistent with the 5 alignment
points and the flip table, and without changing a pixel of the images."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from facetool.data import synthetic as syn
from facetool.data.landmarks import CONVENTIONS, flip_landmarks
from facetool.data.synthetic import PARTS, dense_landmarks, make_identities, prepare_synthetic
from facetool.store import FaceStore

G = CONVENTIONS["ibug68"].groups


def _renders(n: int = 60, size: int = 112):
    people = make_identities(12, 0)
    for k in range(n):
        rng = np.random.default_rng([9, k])
        p = people[k % 12]
        v = syn.sample_view(rng, accessory=k % 2)
        img, lm, mask = syn.draw_face(p, v, size, rng)
        pts, vis = dense_landmarks(p, v, size, mask)
        yield p, v, img, lm, mask, pts, vis


def _centroid(mask: np.ndarray, part: str, region: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero((mask & np.uint16(1 << PARTS.index(part))).astype(bool) & region)
    return np.array([xs.mean(), ys.mean()])


def test_68_points_agree_with_the_5_point_landmarks():
    """The nose tip (30) and the mouth corners (48, 54) are the 5-point landmarks; each eye's 6 points
    surround the 5-point eye centre (measured: at most 0.28 px away at 112 px)."""
    worst = 0.0
    for _, _, _, lm, _, pts, _ in _renders():
        assert pts.shape == (68, 2) and pts.dtype == np.float32
        np.testing.assert_allclose(pts[[30, 48, 54]], lm[[2, 3, 4]], atol=1e-3)
        for k, eye in ((0, G["eyes"][:6]), (1, G["eyes"][6:])):
            worst = max(worst, float(np.linalg.norm(pts[list(eye)].mean(0) - lm[k])))
    assert worst < 1.0, worst


def test_68_points_lie_on_the_painted_features():
    """Each group's points sit on the pixels the generator paints for it (60 random views, 112 px, half with
    glasses): the mean of the eye / brow / outer-lip points is near the centroid of that part's mask pixels
    (per side for eyes and brows; measured median / 95th percentile: eyes 0.13 / 0.30 px, brows 0.25 / 1.10,
    lips 0.35 / 0.76), and the visible jaw points lie on the edge of the face's skin (distance to the nearest
    edge pixel: median 0.47, 90th percentile 0.76 px; a jaw traced on the head surface instead of the drawn
    outline gives 0.52 / 1.38)."""
    size = 112
    xx = np.arange(size)[None, :].repeat(size, 0)
    dists: dict[str, list[float]] = {"eyes": [], "brows": [], "mouth": []}
    jaw: list[float] = []
    for _, _, _, lm, mask, pts, vis in _renders():
        mid = 0.5 * (lm[0, 0] + lm[1, 0])
        for part, idx in (("eyes", G["eyes"]), ("brows", G["brows"])):
            half = len(idx) // 2
            for side, sel in ((xx < mid, idx[:half]), (xx >= mid, idx[half:])):
                if vis[list(sel)].all():
                    dists[part].append(np.linalg.norm(pts[list(sel)].mean(0) - _centroid(mask, part, side)))
        outer = list(range(48, 60))
        if vis[outer].all():
            dists["mouth"].append(np.linalg.norm(pts[outer].mean(0) - _centroid(mask, "mouth", xx >= 0)))
        skin = (mask & np.uint16((1 << PARTS.index("skin")) | (1 << PARTS.index("beard")))) > 0
        pad = np.pad(skin, 1)
        interior = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
        edge = np.stack(np.nonzero(skin & ~interior)[::-1], 1).astype(float)  # (x, y) of the skin's edge
        jaw += [float(np.sqrt(((edge - pts[i]) ** 2).sum(1)).min()) for i in G["jaw"] if vis[i]]
    for part, d in dists.items():
        assert len(d) > 50 and np.median(d) < 1.0 and np.percentile(d, 95) < 2.0, (part, np.median(d))
    assert len(jaw) > 500 and np.median(jaw) < 0.7 and np.percentile(jaw, 90) < 1.1, (np.median(jaw),
                                                                                       np.percentile(jaw, 90))


def test_points_outside_the_crop_or_covered_are_not_visible():
    seen_hidden = 0
    for _, _, _, _, mask, pts, vis in _renders():
        inside = (pts >= 0).all(1) & (pts <= 111).all(1)
        assert not vis[~inside].any()
        seen_hidden += int((~vis).sum())
    # without a mask only the crop bounds decide
    p, v = make_identities(1, 0)[0], syn.sample_view(np.random.default_rng(0))
    pts, vis = dense_landmarks(p, v, 112)
    np.testing.assert_array_equal(vis, (pts >= 0).all(1) & (pts <= 111).all(1))
    assert seen_hidden > 0  # some views push the chin out of the crop


def test_a_frontal_symmetric_face_is_its_own_mirror_under_the_flip_table():
    """Frontal, centred, symmetric brows: flipping the points (x -> W - 1 - x, iBUG mirror table) gives
    the same face, one pixel to the left (the generator's face axis is x = W / 2, the flip's (W - 1) / 2)."""
    p = dataclasses.replace(make_identities(3, 0)[1], brow_slope=0.0)
    base = dict(yaw=0, pitch=0, roll=0, scale=1.0, tx=0, ty=0, brow_raise=0.3, eye_open=0.9, light_angle=0,
                light_amp=0, gain=1, colour_cast=[1, 1, 1], background=0, noise=0, blur=0)
    for smile, mouth_open in ((0.0, 0.0), (0.7, 0.5)):
        pts, _ = dense_landmarks(p, syn.View(smile=smile, mouth_open=mouth_open, **base), 112)
        np.testing.assert_allclose(flip_landmarks(pts, 112, "ibug68") + [1.0, 0.0], pts, atol=1e-3)
    # a yawed face is not symmetric: the check is not vacuous
    pts, _ = dense_landmarks(p, syn.View(smile=0, mouth_open=0, **(base | {"yaw": 20})), 112)
    assert np.abs(flip_landmarks(pts, 112, "ibug68") + [1.0, 0.0] - pts).max() > 3


def test_the_store_holds_them_and_the_images_do_not_change(tmp_path):
    a, _ = prepare_synthetic(tmp_path / "a.h5", identities=3, per_identity=3, size=48, seed=2)
    b, _ = prepare_synthetic(tmp_path / "b.h5", identities=3, per_identity=3, size=48, seed=2, landmarks=False)
    with FaceStore(a) as sa, FaceStore(b) as sb:
        np.testing.assert_array_equal(sa.images(), sb.images())
        np.testing.assert_array_equal(sa.landmarks, sb.landmarks)
        np.testing.assert_array_equal(sa.part_masks(range(9), "eyes"), sb.part_masks(range(9), "eyes"))
        assert sa.landmark_conventions == ["ibug68"] and sb.landmark_conventions == []
        pts, vis, conv = sa.landmark_set()
        assert pts.shape == (9, 68, 2) and vis.mean() > 0.8
        # the stored points are the generator's for the same view, scaled to the crop
        np.testing.assert_allclose(pts[:, 30], sa.landmarks[:, 2], atol=1e-3)


def test_cli_prepare_synthetic_stores_68_points_and_info_shows_them(tmp_path):
    from conftest import run_facetool

    out = tmp_path / "s.h5"
    r = run_facetool("prepare", "synthetic", "--identities", "2", "--per-identity", "2", "--size", "32",
                     "--out", out)
    assert r.returncode == 0, r.stderr
    assert "ibug68: 68 points" in r.stdout
    r = run_facetool("info", out, "--json")
    assert r.returncode == 0, r.stderr
    import json

    assert json.loads(r.stdout)["landmark_sets"]["ibug68"]["points"] == 68
    r = run_facetool("prepare", "synthetic", "--identities", "2", "--per-identity", "2", "--size", "32",
                     "--out", tmp_path / "n.h5", "--no-landmarks")
    assert r.returncode == 0, r.stderr
    with FaceStore(tmp_path / "n.h5") as s:
        assert s.landmark_conventions == []


@pytest.mark.parametrize("size", [64, 224])
def test_points_scale_with_the_crop(size):
    p, v = make_identities(1, 0)[0], syn.sample_view(np.random.default_rng(1))
    a, _ = dense_landmarks(p, v, 112)
    b, _ = dense_landmarks(p, v, size)
    np.testing.assert_allclose(b, a * size / 112, atol=1e-3)
