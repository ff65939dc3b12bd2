"""Dense landmark sets in the face store: written row by row, read back by convention, old stores open,
missing or damaged sets are one-line errors, ``facetool info`` lists them."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import run_facetool
from facetool.errors import FacetoolError
from facetool.io import partial_path
from facetool.prepare import build_store
from facetool.store import FaceStore, Record

H = W = 16


def _records(n: int, with_sets: bool = True) -> list[Record]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        sets = None
        if with_sets and i != 2:  # row 2 has no dense landmarks: NaN points, nothing visible
            sets = {"ibug68": (np.full((68, 2), float(i), np.float32) + np.arange(68)[:, None],
                               np.arange(68) % (i + 2) != 0)}
        out.append(Record(image=rng.integers(0, 256, (H, W, 3), dtype=np.uint8), label=i % 2,
                          landmarks=np.full((5, 2), 1.0), landmark_sets=sets))
    return out


def _kw(sets: bool = True) -> dict:
    return dict(image_size=(H, W), identities=["a", "b"], landmark_sets={"ibug68": 68} if sets else None)


def test_round_trip_by_convention_and_rows(tmp_path):
    recs = _records(6)
    path, _ = build_store(tmp_path / "s.h5", recs, lambda r: r, writer_kwargs=_kw() | {"flush_every": 4})
    with FaceStore(path) as s:
        assert s.landmark_conventions == ["ibug68"]
        pts, vis, conv = s.landmark_set()
        assert conv == "ibug68" and pts.shape == (6, 68, 2) and pts.dtype == np.float32 and vis.dtype == bool
        for i, r in enumerate(recs):
            if r.landmark_sets is None:
                assert np.isnan(pts[i]).all() and not vis[i].any()
            else:
                np.testing.assert_array_equal(pts[i], r.landmark_sets["ibug68"][0])
                np.testing.assert_array_equal(vis[i], r.landmark_sets["ibug68"][1])
        p2, v2, _ = s.landmark_set("ibug68", idx=[5, 0, 5])
        np.testing.assert_array_equal(p2, pts[[5, 0, 5]])
        np.testing.assert_array_equal(v2, vis[[5, 0, 5]])
        np.testing.assert_allclose(s.landmarks[0], np.ones((5, 2)))  # the 5 alignment points stay
        summ = s.summary()["landmark_sets"]["ibug68"]
        assert summ["points"] == 68 and summ["visible"] == pytest.approx(vis.mean(), abs=1e-4)
        with pytest.raises(FacetoolError, match=r"has no wflw98 landmarks \(has: ibug68\); .*prepare landmarks"):
            s.landmark_set("wflw98")


def test_a_store_without_landmark_sets_opens_and_says_how_to_get_them(tmp_path):
    """Stores written before landmark sets existed (no group) still open; asking for the set is one line."""
    path, _ = build_store(tmp_path / "old.h5", _records(3, with_sets=False), lambda r: r, writer_kwargs=_kw(False))
    with h5py.File(path, "r") as f:
        assert "landmark_sets" not in f
    with FaceStore(path) as s:
        assert s.landmark_conventions == [] and "landmark_sets" not in s.summary()
        for conv in (None, "ibug68"):
            with pytest.raises(FacetoolError, match="only the 5 alignment points.*prepare synthetic") as e:
                s.landmark_set(conv)
            assert "\n" not in str(e.value)


def test_writer_refuses_undeclared_or_misshapen_sets(tmp_path):
    from facetool.store import StoreWriter

    w = StoreWriter(tmp_path / "w.h5", **_kw())
    img = np.zeros((H, W, 3), np.uint8)
    with pytest.raises(ValueError, match="not declared"):
        w.append(Record(image=img, label=0, landmark_sets={"wflw98": (np.zeros((98, 2)), np.ones(98, bool))}))
    with pytest.raises(ValueError, match=r"needs points \(68, 2\)"):
        w.append(Record(image=img, label=0, landmark_sets={"ibug68": (np.zeros((5, 2)), np.ones(5, bool))}))
    w.abort(keep=False)


def test_resume_keeps_landmark_rows_in_step(tmp_path):
    recs = _records(20)
    full, _ = build_store(tmp_path / "full.h5", recs, lambda r: r, writer_kwargs=_kw())
    calls = {"n": 0}

    def flaky(r):
        calls["n"] += 1
        if calls["n"] == 11:
            raise KeyboardInterrupt
        return r

    out = tmp_path / "res.h5"
    with pytest.raises(KeyboardInterrupt):
        build_store(out, recs, flaky, writer_kwargs=_kw() | {"flush_every": 4})
    assert partial_path(out).exists()
    path, _ = build_store(out, recs, lambda r: r, resume=True, writer_kwargs=_kw() | {"flush_every": 4})
    with FaceStore(full) as a, FaceStore(path) as b:
        for x, y in zip(a.landmark_set(), b.landmark_set()):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("how,match", [("short visible", r"landmark set 'ibug68' must hold 'points' \(N, L, 2\)"),
                                       ("no points", "landmark set 'ibug68' must hold")])
def test_a_damaged_landmark_set_is_refused_on_open(tmp_path, how, match):
    path, _ = build_store(tmp_path / "s.h5", _records(4), lambda r: r, writer_kwargs=_kw())
    with h5py.File(path, "a") as f:
        g = f["landmark_sets/ibug68"]
        if how == "short visible":
            v = g["visible"][:-1]
            del g["visible"]
            g.create_dataset("visible", data=v)
        else:
            del g["points"]
    with pytest.raises(FacetoolError, match=match) as e:
        FaceStore(path)
    assert str(path) in str(e.value)


def test_info_lists_the_landmark_sets(tmp_path):
    path, _ = build_store(tmp_path / "s.h5", _records(4), lambda r: r, writer_kwargs=_kw())
    r = run_facetool("info", path)
    assert r.returncode == 0, r.stderr
    assert "landmark sets" in r.stdout and "ibug68" in r.stdout and "68 points" in r.stdout
