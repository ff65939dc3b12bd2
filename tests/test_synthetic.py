"""Synthetic faces: determinism, geometry, attribute correlates, planted bias, store round trip, resume, CLI."""

from __future__ import annotations


import cv2
import h5py
import numpy as np
import pytest

from facetool.data import synthetic as syn
from facetool.data.synthetic import (
    ACCESSORIES,
    ATTRIBUTES,
    PARTS,
    make_identities,
    parse_bias,
    prepare_synthetic,
    render_face,
    save_grid,
)
from facetool.errors import FacetoolError
from facetool.store import FaceStore

BIAS = "accessory=glasses,attribute=gender,value=male,p=0.9"


def _arrays(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        out = {k: f[k][:] for k in ("images", "labels", "split", "landmarks", "part_masks")}
        out.update({f"meta/{k}": f[f"meta/{k}"][:] for k in f["meta"]})
        out.update({f"attributes/{k}": f[f"attributes/{k}"][:] for k in f["attributes"]})
    return out


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    """24 identities x 8 images with glasses planted on males (p = 0.9)."""
    out = tmp_path_factory.mktemp("syn") / "biased.h5"
    path, summary = prepare_synthetic(out, identities=24, per_identity=8, seed=1, bias=BIAS)
    return path, summary


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def _per_image_mean(s: FaceStore, part: str, fn) -> np.ndarray:
    """fn(pixels (k,3)) averaged over the pixels of ``part`` in each image (NaN where absent)."""
    imgs = s.images()
    masks = s.part_masks(np.arange(len(s)), part)
    return np.array([fn(im[m]) if m.any() else np.nan for im, m in zip(imgs, masks)])


def test_same_seed_bit_identical_other_seed_differs(tmp_path):
    a, _ = prepare_synthetic(tmp_path / "a.h5", identities=3, per_identity=4, seed=5)
    b, _ = prepare_synthetic(tmp_path / "b.h5", identities=3, per_identity=4, seed=5, workers=2)
    c, _ = prepare_synthetic(tmp_path / "c.h5", identities=3, per_identity=4, seed=6)
    A, B, C = _arrays(a), _arrays(b), _arrays(c)
    for k in A:
        np.testing.assert_array_equal(A[k], B[k], err_msg=k)
    assert not np.array_equal(A["images"], C["images"])
    # every image of an identity differs (pose/lighting/background vary per image)
    assert len({A["images"][i].tobytes() for i in range(12)}) == 12


def test_render_face_outputs_and_landmarks_match_features():
    people = make_identities(12, 0)
    eyes, nose, mouth = (1 << PARTS.index(p) for p in ("eyes", "nose", "mouth"))
    for k in range(120):
        rng = np.random.default_rng(k)
        img, lm, mask, pose = render_face(people[k % 12], rng, 112)
        assert img.shape == (112, 112, 3) and img.dtype == np.uint8
        assert lm.shape == (5, 2) and lm.dtype == np.float32
        assert mask.shape == (112, 112) and mask.dtype == np.uint16
        assert pose.shape == (3,) and np.all(np.abs(pose) <= 40)
        assert np.all((lm >= 0) & (lm <= 111))
        x, y = np.round(lm).astype(int).T
        assert mask[y[0], x[0]] & eyes and mask[y[1], x[1]] & eyes, k
        assert mask[y[2], x[2]] & nose, k
        for j in (3, 4):  # mouth corners lie on the lip outline (within one pixel)
            assert (mask[y[j] - 1 : y[j] + 2, x[j] - 1 : x[j] + 2] & mouth).any(), k
        # arcface order: image-left eye/mouth first, eyes above nose above mouth (|roll| <= 22 deg)
        assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]
        assert lm[:2, 1].mean() < lm[2, 1] < lm[3:, 1].mean()
    # size is honoured and the geometry scales with it
    img, lm, mask, _ = render_face(people[0], np.random.default_rng(0), 224)
    img2, lm2, _, _ = render_face(people[0], np.random.default_rng(0), 112)
    assert img.shape == (224, 224, 3) and mask.shape == (224, 224)
    np.testing.assert_allclose(lm, 2 * lm2, atol=1e-3)


def test_yaw_moves_features_sideways_and_foreshortens():
    p = make_identities(1, 0)[0]
    base = dict(pitch=0, roll=0, scale=1.0, tx=0, ty=0, smile=0, mouth_open=0, brow_raise=0, eye_open=1,
                light_angle=0, light_amp=0, gain=1, colour_cast=[1, 1, 1], background=0, noise=0, blur=0)
    lms = {y: syn.draw_face(p, syn.View(yaw=y, **base), 112, np.random.default_rng(0))[1] for y in (0, 30)}
    d0, d30 = (lms[y][1, 0] - lms[y][0, 0] for y in (0, 30))
    assert d30 < 0.95 * d0  # eye distance foreshortened
    assert lms[30][2, 0] - lms[0][2, 0] > 5  # nose tip moves sideways (it sticks out the most)


def test_store_round_trip(synthetic_store):
    with FaceStore(synthetic_store) as s:
        assert len(s) == 96 and s.num_classes == 8
        assert s.identities == [f"synth_{i:04d}" for i in range(8)]
        assert np.bincount(s.labels).tolist() == [12] * 8
        md = s.metadata
        assert md["source"] == "synthetic" and md["preprocessing"]["seed"] == 0
        assert np.array(md["template"]).shape == (5, 2)
        # per identity 12 * 0.2 -> 2 test images (seeded), the rest train
        for lab in range(8):
            assert (s.split[s.labels == lab] == 1).sum() == 2
        for name, values in ATTRIBUTES.items():
            codes, vals = s.attribute(name, per_image=False)
            assert vals == values and codes.shape == (8,) and codes.min() >= 0
        assert s.attribute_names("image") == []  # no accessory attribute without --bias
        assert s.parts == PARTS[:-1]
        assert s.meta("pose").shape == (96, 3) and s.meta("expression").shape == (96, 4)
        lm = s.landmarks
        assert np.isfinite(lm).all()
        # the template is the mean landmark layout (pose is zero-mean)
        np.testing.assert_allclose(lm.mean(0), np.array(md["template"]), atol=4.0)
        masks = s.part_masks(np.arange(len(s)), "skin")
        assert masks.mean() > 0.2


def test_attribute_correlates_are_visible(biased):
    path, _ = biased
    with FaceStore(path) as s:
        skin, _ = s.attribute("skin")
        lum = _per_image_mean(s, "skin", lambda px: _luma(px).mean())
        m = [np.nanmean(lum[skin == v]) for v in range(3)]
        assert m[0] > m[1] + 20 and m[1] > m[2] + 20, m
        eye, _ = s.attribute("eye_colour")
        blue_minus_red = _per_image_mean(s, "eyes", lambda px: float(px[:, 2].mean() - px[:, 0].mean()))
        assert np.nanmean(blue_minus_red[eye == 1]) > np.nanmean(blue_minus_red[eye == 0]) + 5
        gender, _ = s.attribute("gender")
        n = np.arange(len(s))
        brows = s.part_masks(n, "brows").sum((1, 2))
        hair = s.part_masks(n, "hair").sum((1, 2))
        assert brows[gender == 1].mean() > 1.2 * brows[gender == 0].mean()
        assert hair[gender == 0].mean() > 1.2 * hair[gender == 1].mean()
        beard, _ = s.attribute("facial_hair")
        has_beard = s.part_masks(n, "beard").any((1, 2))
        assert np.array_equal(has_beard, beard == 1)
        age, _ = s.attribute("age")
        hair_luma = _per_image_mean(s, "hair", lambda px: _luma(px).mean())
        assert np.nanmean(hair_luma[age == 3]) > np.nanmean(hair_luma[age == 0]) + 60  # grey hair
        grey = cv2.cvtColor(np.concatenate(list(s.images())), cv2.COLOR_RGB2GRAY).astype(np.float32)
        detail = (grey - cv2.GaussianBlur(grey, (0, 0), 1.5)).reshape(len(s), *s.image_size)
        skin_mask = [cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0 for m in s.part_masks(n, "skin")]
        tex = np.array([d[m].std() for d, m in zip(detail, skin_mask)])
        assert tex[age == 3].mean() > 1.3 * tex[age == 0].mean()  # wrinkles and skin texture
        group, _ = s.attribute("group")
        face = s.part_masks(n, "skin") | s.part_masks(n, "beard")
        ys, xs = face.any(2), face.any(1)
        aspect = ys.sum(1) / np.maximum(xs.sum(1), 1)
        assert aspect[group == 1].mean() > aspect[group == 2].mean() + 0.05  # B long, C broad


def test_bias_plants_the_correlation(biased):
    path, summary = biased
    with FaceStore(path) as s:
        acc, vals = s.attribute("accessory")
        assert vals == ACCESSORIES and "accessory" in s.parts
        gender, _ = s.attribute("gender")
        p_male = (acc[gender == 1] == 1).mean()
        p_female = (acc[gender == 0] == 1).mean()
        assert abs(p_male - 0.9) < 0.1 and abs(p_female - 0.1) < 0.1, (p_male, p_female)
        glasses = s.part_masks(np.arange(len(s)), "accessory").any((1, 2))
        assert np.array_equal(glasses, acc == 1)
        assert s.metadata["preprocessing"]["bias"] == BIAS
    assert summary["attributes"]["accessory"]["glasses"] == int((acc == 1).sum())


def test_accessory_plan_is_stratified_per_identity():
    """p = 0.5: exactly half of every identity's images wear glasses (so glasses are independent of
    gender in the set itself); p = 0.9 with 10 images: 9 for the chosen value, 1 for the others;
    fractional counts round up with probability frac(q), so the mean stays p."""
    from facetool.data.synthetic import accessory_plan, make_identities

    people = make_identities(40, 2)
    male = np.array([p.attributes["gender"] for p in people]) == 1
    half = accessory_plan(people, 4, parse_bias("attribute=gender,value=male,p=0.5"), 2)
    assert (half.sum(1) == 2).all() and set(np.unique(half)) == {0, 1}
    assert half[male].mean() == half[~male].mean() == 0.5
    ten = accessory_plan(people, 10, parse_bias("attribute=gender,value=male,p=0.9"), 2)
    assert (ten[male].sum(1) == 9).all() and (ten[~male].sum(1) == 1).all()
    frac = accessory_plan(make_identities(400, 2), 4, parse_bias("attribute=gender,value=male,p=0.9"), 2)
    assert set(np.unique(frac.sum(1))) == {0, 1, 3, 4}  # 3.6 -> 3 or 4, 0.4 -> 0 or 1
    assert abs(frac.mean() - 0.5) < 0.03  # balanced genders: (0.9 + 0.1) / 2
    assert np.array_equal(accessory_plan(people, 4, None, 2), np.zeros((40, 4), np.int64))
    assert np.array_equal(half, accessory_plan(people, 4, parse_bias("attribute=gender,value=male,p=0.5"), 2))


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("accessory=glasses,attribute=gender,value=robot", "value for gender"),
        ("accessory=hat,attribute=gender,value=male", "accessory must be"),
        ("attribute=height,value=tall", "attribute must be"),
        ("accessory=glasses,attribute=age,value=60+,p=1.5", "p must be in"),
        ("glasses", "key=value"),
    ],
)
def test_parse_bias_errors(spec, msg):
    with pytest.raises(FacetoolError, match=msg):
        parse_bias(spec)


def test_parse_bias_ok():
    b = parse_bias("attribute=age, value=60+")
    assert (b.accessory, b.attribute, b.value, b.p) == ("glasses", "age", "60+", 0.9)
    assert b.probability({"age": 3}) == 0.9 and b.probability({"age": 0}) == pytest.approx(0.1)


def test_resume_after_interruption_gives_same_store(tmp_path, monkeypatch):
    ref, _ = prepare_synthetic(tmp_path / "ref.h5", identities=4, per_identity=10, seed=3, bias=BIAS)
    out = tmp_path / "run.h5"
    real = syn.draw_face
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > 17:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(syn, "draw_face", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_synthetic(out, identities=4, per_identity=10, seed=3, bias=BIAS)
    assert not out.exists() and (tmp_path / "run.h5.partial").exists()
    monkeypatch.setattr(syn, "draw_face", real)
    with pytest.raises(FacetoolError, match="other settings"):
        prepare_synthetic(out, identities=4, per_identity=10, seed=4, bias=BIAS, resume=True)
    prepare_synthetic(out, identities=4, per_identity=10, seed=3, bias=BIAS, resume=True)
    A, B = _arrays(ref), _arrays(out)
    for k in A:
        np.testing.assert_array_equal(A[k], B[k], err_msg=k)


def test_save_grid(synthetic_store, tmp_path):
    png = save_grid(synthetic_store, tmp_path / "g.png", n_identities=3, per_identity=4)
    img = cv2.imread(str(png))
    assert img.shape == (3 * 112, 4 * 112, 3)
    with FaceStore(synthetic_store) as s:
        first = s.images([0])[0]
    np.testing.assert_array_equal(img[:112, :112, ::-1], first)


def test_cli_prepare_synthetic(cli, tmp_path):
    out = tmp_path / "s.h5"
    res = cli("prepare", "synthetic", "--identities", "3", "--per-identity", "4", "--out", out, "--bias", BIAS)
    assert res.exit_code == 0, res.output
    assert out.is_file() and (tmp_path / "s.h5.grid.png").is_file()
    assert "identities" in res.output and "accessory" in res.output
    with FaceStore(out) as s:
        assert len(s) == 12
    res = cli("prepare", "synthetic", "--identities", "3", "--per-identity", "4", "--out", out)
    assert res.exit_code != 0 and "--overwrite" in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    res = cli("prepare", "synthetic", "--out", tmp_path / "x.h5", "--bias", "accessory=glasses,attribute=mood")
    assert res.exit_code != 0 and "bad --bias" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "x.h5").exists()


# -- issue 17: sizes that cannot fit are refused with the estimate; the <out stem>.json report ---------------
def test_a_size_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, cli, monkeypatch):
    """`--identities 2 --per-identity 100000000` started writing and grew past 20 GB of memory."""
    import shutil
    from collections import namedtuple

    from conftest import run_facetool

    out = tmp_path / "o" / "x.h5"
    r = run_facetool("prepare", "synthetic", "--identities", "2", "--per-identity", "100000000", "--out", out,
                     timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "--identities 2 x --per-identity 100000000 = 200,000,000 images" in r.stderr and "12.7 TB" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()
    # within the image limit but not within the free space of the output's folder
    assert syn.estimate_bytes(100, 100, 112) == 10_000 * (112 * 112 * 5 + 128) + (1 << 20)
    assert syn.estimate_bytes(100, 100, 112, 68) == 10_000 * (112 * 112 * 5 + 128 + 9 * 68) + (1 << 20)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 40, 1 << 39, 10_000_000))
    r = cli("prepare", "synthetic", "--identities", "100", "--per-identity", "100", "--out", out)
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "(about 635.6 MB) does not fit: only 10.0 MB free in" in r.output and str(tmp_path) in r.output
    assert not (tmp_path / "o").exists()
    with pytest.raises(FacetoolError, match="more than 1,000,000 identities"):
        prepare_synthetic(out, identities=1_000_001, per_identity=1)


def test_prepare_synthetic_writes_its_report_like_the_other_prepare_commands(tmp_path, cli):
    """The README promised a report beside the store; prepare synthetic wrote none."""
    import json

    out = tmp_path / "s.h5"
    argv = ["prepare", "synthetic", "--identities", "3", "--per-identity", "4", "--size", "32", "--out", out]
    assert cli(*argv).exit_code == 0
    rep = json.loads((tmp_path / "s.json").read_text())
    assert {k: rep[k] for k in ("store", "identities", "images", "train", "test", "dropped")} == {
        "store": str(out), "identities": 3, "images": 12, "train": 9, "test": 3, "dropped": {}}
    assert rep["settings"]["per_identity"] == 4 and rep["settings"]["size"] == 32 and rep["settings"]["seed"] == 0
    r = cli(*argv, "--overwrite")  # a rerun refreshes its own report
    assert r.exit_code == 0, r.output
    (tmp_path / "t.json").write_text("mine")  # someone else's file where the report goes: not replaced
    r = cli(*argv[:-1], tmp_path / "t.h5")
    assert r.exit_code == 2 and "t.json" in r.output and "--overwrite" in r.output
    assert (tmp_path / "t.json").read_text() == "mine" and not (tmp_path / "t.h5").exists()


def test_pose_wide_varies_the_cohort_pose_bins_and_default_images_are_unchanged(tmp_path):
    """--pose default renders today's images bit for bit (the hash of main's generator before --pose existed);
    --pose wide draws the same random numbers, so only yaw and pitch change, and both leave the cohort code's
    middle bin (|angle| <= 30) often (wide: about 45 % of yaws, 30 % of pitches; default: never for pitch)."""
    import hashlib

    a, _ = prepare_synthetic(tmp_path / "a.h5", identities=2, per_identity=3, size=32, seed=3)
    with FaceStore(a) as s:
        assert hashlib.sha256(s.images().tobytes()).hexdigest() == (
            "a96c798d7107181c6d746dad3d95b79d11196c2a8f173e640235736a101d95d7")
    d, _ = prepare_synthetic(tmp_path / "d.h5", identities=4, per_identity=25, size=32, seed=0)
    w, _ = prepare_synthetic(tmp_path / "w.h5", identities=4, per_identity=25, size=32, seed=0, pose="wide")
    with FaceStore(d) as sd, FaceStore(w) as sw:
        pd, pw = sd.meta("pose"), sw.meta("pose")
        assert sw.metadata["preprocessing"]["pose_range"] == "wide" and "pose_range" not in sd.metadata["preprocessing"]
    np.testing.assert_array_equal(pd[:, 2], pw[:, 2])  # roll: the same draws
    assert np.abs(pd[:, 1]).max() <= 25 and (np.abs(pw[:, 1]) > 30).mean() > 0.15
    assert (np.abs(pd[:, 0]) > 30).mean() < 0.15 < 0.3 < (np.abs(pw[:, 0]) > 30).mean()
    with pytest.raises(FacetoolError, match="--pose must be one of default, wide"):
        prepare_synthetic(tmp_path / "x.h5", identities=1, per_identity=1, size=32, pose="side")
