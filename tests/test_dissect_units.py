"""`facetool dissect units`: Hierarchical Network Dissection against known answers.

A hand-built model reads a synthetic store whose mouths are painted pure magenta and whose pixel
(0, 0) marks the gender: unit 0 is a magenta detector (it must pair with the mouth at IoU ~ 1 and
with nothing else), unit 1 fires everywhere on male faces (it must be global, not local). The pairing
formulas are checked against hand computations; the streaming quantile against numpy."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_facetool
from facetool.errors import FacetoolError
from facetool.explainers.units.dissect import (
    TopQuantile,
    average_ranks,
    compare_dissections,
    concept_probabilities,
    dissect_units,
    global_threshold,
    group_probabilities,
    kept,
    rank_activation_weights,
)
from facetool.explainers.units.dictionary import CsvDictionary, load_dictionary
from facetool.models import FaceModel, create_model, register_model, save_checkpoint

MAGENTA = (255, 0, 255)


class _Detectors(nn.Module):
    """unit 0: magenta-ness (1 on pure magenta, 0 on anything with min(R,B) - G < 200);
    unit 1: male marker (pixel (0,0) red = 255) times 1 + 0.1 * fixed spatial noise."""

    def forward(self, x):
        rgb = x * 127.5 + 127.5
        r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
        mag = ((torch.minimum(r, b) - g - 200.0) / 55.0).clamp(0, 1)
        H, W = x.shape[-2:]
        yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
        noise = torch.frac(torch.sin(12.9898 * xx + 78.233 * yy) * 43758.5453)
        male = (r[:, 0, 0] > 127).float()[:, None, None]
        return torch.stack([mag, male * (1 + 0.1 * noise)], 1)


class HandUnits(FaceModel):
    layer_names = ("full", "pooled")
    cam_layer = "pooled"

    def __init__(self, input_size: int = 64, num_classes: int = 0) -> None:
        super().__init__()
        self.full = _Detectors()
        self.pooled = nn.AvgPool2d(4)
        self.output_kind = "embedding"

    def forward_features(self, x, internals=None):
        return self.pooled(self.full(x))

    def forward_head(self, f):
        return f.mean((2, 3))


@register_model("test_hand_units")
def _hand(**kw):
    return HandUnits(**kw)


@pytest.fixture(scope="module")
def painted_store(tmp_path_factory) -> Path:
    """A synthetic store (with glasses at random) whose mouths are magenta and pixel (0,0) marks males."""
    from facetool.data.synthetic import prepare_synthetic
    from facetool.store import FaceStore

    out = tmp_path_factory.mktemp("units") / "painted.h5"
    prepare_synthetic(out, identities=6, per_identity=6, size=64, seed=3,
                      bias="accessory=glasses,attribute=gender,value=male,p=0.5")
    with FaceStore(out) as s:
        gender, vals = s.attribute("gender")
        parts = s.parts
    bit = np.uint16(1 << parts.index("mouth"))
    with h5py.File(out, "a") as f:
        imgs = f["images"][:]
        pm = f["part_masks"][:]
        mouth = (pm & bit) > 0
        imgs[mouth] = MAGENTA
        imgs[:, 0, 0] = [[255 if gender[i] == vals.index("male") else 0, 128, 128] for i in range(len(imgs))]
        f["images"][:] = imgs
    return out


def _names(d):
    return [c.name for c in d.concepts]


# ------------------------------------------------------------------------------------- known answers
def test_mouth_unit_pairs_with_the_mouth_only_and_male_unit_is_global(painted_store):
    d = load_dictionary(painted_store)
    model = HandUnits()
    x = torch.randn(2, 3, 64, 64)
    before = model(x)
    res = dissect_units(model, d, ["full", "pooled"], batch_size=16, device="cpu")  # default quantile 0.005
    assert torch.equal(model(x), before) and not model.full._forward_hooks  # hooks removed, model untouched
    full = res.layers["full"]
    mouth = full.units[0]
    k = _names(d).index("mouth")
    assert mouth.best_concept == "mouth" and mouth.best_iou > 0.97, mouth
    assert mouth.kind == "local" and mouth.region == "mouth" and mouth.concepts == ["mouth"]
    assert mouth.probs == {"mouth": 1.0}
    assert np.delete(full.iou[0], k).max() < 0.05  # no other concept overlaps it
    assert not mouth.biased  # the same max activation on every face: no subgroup preferred
    # unit 1 fires all over male faces: its top 0.5 % is scattered, so no concept reaches IoU 0.04;
    # it prefers gender=male with P = 1 -> a global unit, at full and at pooled resolution
    for layer in ("full", "pooled"):
        g = res.layers[layer].units[1]
        assert g.best_iou < 0.04 and g.kind == "global" and "gender=male" in g.biased, (layer, g)
        assert g.globals["gender"]["male"] > 0.99 and not g.concepts


def test_pooled_map_is_upsampled_onto_the_mouth(painted_store):
    """The 4x average-pooled magenta map, upsampled bilinearly, still pairs with the mouth (a top slice
    about the size of the mouth: quantile 0.02)."""
    d = load_dictionary(painted_store)
    res = dissect_units(HandUnits(), d, ["pooled"], quantile=0.02, batch_size=64, device="cpu")
    u = res.layers["pooled"].units[0]
    assert u.best_concept == "mouth" and u.best_iou > 0.5 and u.concepts == ["mouth"], u


# ------------------------------------------------------------------------------------- formulas
def test_pairing_probabilities_equal_the_hand_computed_formulas():
    # 4 region images, max activations; unit range over all images [0, 2]
    maxima = np.array([[0.5], [2.0], [1.0], [0.0]])
    w = rank_activation_weights(maxima, 0.0, 2.0)[:, 0]
    # ascending order: img3 (0.0) r=1/4, img0 (0.5) r=2/4, img2 (1.0) r=3/4, img1 (2.0) r=4/4
    # s = max/2: 0.25, 1, 0.5, 0
    np.testing.assert_allclose(w, [2 / 4 * 0.25, 1.0 * 1.0, 3 / 4 * 0.5, 1 / 4 * 0.0])
    carry = np.array([[1, 0], [1, 1], [0, 1], [1, 0]], bool)  # concept a: imgs 0,1,3; b: imgs 1,2
    iou = np.array([0.2, 0.1])
    sa = (0.125 + 1.0 + 0.0) / 3 * 0.2
    sb = (1.0 + 0.375) / 2 * 0.1
    p = concept_probabilities(w, carry, iou)
    np.testing.assert_allclose(p, [sa / (sa + sb), sb / (sa + sb)])
    assert sa / (sa + sb) == pytest.approx(0.075 / 0.14375)  # 0.522
    assert list(kept(p)) == [False, False]  # two concepts: held only above 1.5/2 = 0.75
    assert list(kept(np.array([0.8, 0.2]))) == [True, False]
    assert list(kept(np.array([1.0]))) == [True]  # a one-concept region holds its concept
    assert list(kept(np.array([0.6, 0.2, 0.1, 0.1]))) == [True, False, False, False]  # > 1.5/4
    # global group: two values, 4 images
    codes = np.array([1, 1, 0, 0])
    g = group_probabilities(w, codes, 2)
    s1, s0 = (0.125 + 1.0) / 2, (0.375 + 0.0) / 2
    np.testing.assert_allclose(g, [s0 / (s0 + s1), s1 / (s0 + s1)])
    assert global_threshold(2) == pytest.approx(0.55) and global_threshold(4) == pytest.approx(0.3)
    # ties share their mean rank
    np.testing.assert_allclose(average_ranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1, 3.5, 2])


def test_streaming_quantile_matches_numpy_within_a_bin():
    rng = np.random.default_rng(0)
    sk = TopQuantile(3, bins=256)
    chunks = [rng.normal(0, 1, (3, 500)) * np.array([[1], [3], [0.1]]) for _ in range(3)]
    chunks.append(rng.normal(5, 1, (3, 500)))  # later values far above the first batch's range
    for c in chunks:
        sk.update(torch.from_numpy(c))
    allv = np.concatenate(chunks, 1)
    for q in (0.005, 0.05, 0.2):
        est = sk.quantile(q).numpy()
        ref = np.quantile(allv, 1 - q, axis=1)
        assert np.all(np.abs(est - ref) <= sk.width.numpy() * 1.01 + 1e-6), (q, est, ref)


# ------------------------------------------------------------------------------------- dictionaries
def test_landmark_dictionary_without_masks(tmp_path):
    """A store with only landmarks gets geometric parts, each inside the face crop and non-empty."""
    from facetool.store import Record, StoreWriter

    w = StoreWriter(tmp_path / "lm.h5", image_size=(64, 64), identities=["a", "b"],
                    attribute_values={"Eyeglasses": ["no", "yes"]},
                    identity_attributes={"gender": (["female", "male"], [0, 1])})
    lm = np.array([[22, 26], [42, 26], [32, 36], [24, 46], [40, 46]], np.float32)
    for i in range(4):
        w.append(Record(image=np.full((64, 64, 3), 100, np.uint8), label=i % 2, landmarks=lm + i,
                        attributes={"Eyeglasses": i % 2}))
    w.checkpoint(4, force=True)
    w.finalize()
    d = load_dictionary(tmp_path / "lm.h5")
    names = _names(d)
    for p in ("left_eye", "right_eye", "left_brow", "right_brow", "nose", "mouth", "left_cheek", "right_cheek", "chin"):
        assert p in names and d.scan_carry()[:, names.index(p)].all()
    assert "Eyeglasses" in names and list(d.carry[:, names.index("Eyeglasses")]) == [False, True, False, True]
    assert d.concepts[names.index("Eyeglasses")].region == "eye"
    assert [g.name for g in d.groups] == ["gender"]
    m = d.batch(np.array([0])).masks[0]
    le, re = m[names.index("left_eye")], m[names.index("right_eye")]
    ys, xs = np.nonzero(le)
    assert abs(xs.mean() - 22) < 1.5 and abs(ys.mean() - 26) < 1.5 and not (le & re).any()
    d.close()


def test_store_without_masks_or_landmarks_is_refused(tmp_path):
    from facetool.store import Record, StoreWriter

    w = StoreWriter(tmp_path / "bare.h5", image_size=(32, 32), identities=["a"])
    w.append(Record(image=np.zeros((32, 32, 3), np.uint8), label=0))
    w.checkpoint(1, force=True)
    w.finalize()
    with pytest.raises(FacetoolError, match="neither part masks nor 5-point landmarks"):
        load_dictionary(tmp_path / "bare.h5")


def _write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), arr)


def make_csv_dictionary(root: Path) -> Path:
    """HND layout: 3 images, masks mouth/nose; one mask missing, one of another size."""
    rows = []
    for i in range(3):
        img = np.full((32, 32, 3), 90, np.uint8)
        img[20:24, 10:22] = (255, 0, 255)[::-1]  # BGR on disk: magenta mouth
        _write_png(root / f"parts/{i}/original.png", img)
        mouth = np.zeros((32, 32), np.uint8)
        mouth[20:24, 10:22] = 255
        _write_png(root / f"parts/{i}/mouth.png", mouth)
        nose = np.zeros((32, 32) if i != 2 else (16, 16), np.uint8)
        nose[8:16, 13:19] = 255
        _write_png(root / f"parts/{i}/nose.png", nose)
        labels = [f"parts/{i}/mouth.png", f"parts/{i}/nose.png"] + ([f"parts/{i}/left_eye.png"] if i == 0 else [])
        rows.append([f"parts/{i}/original.png", ";".join(labels)])
    p = root / "Parts.csv"
    with open(p, "w", newline="") as f:
        csv.writer(f).writerows([["image", "labels"], *rows])
    return p


def test_user_csv_dictionary_counts_skips(tmp_path):
    d = CsvDictionary(make_csv_dictionary(tmp_path))
    assert _names(d) == ["nose", "mouth"]
    assert d.skipped == {"missing mask": 1, "mask of another size": 1}
    assert d.scan_carry().sum(0).tolist() == [2, 3]
    res = dissect_units(HandUnits(input_size=32), d, ["full"], quantile=0.05, device="cpu")
    u = res.layers["full"].units[0]
    assert u.best_concept == "mouth" and u.best_iou > 0.95 and u.concepts == ["mouth"]


def test_unknown_layer_lists_the_model_layers(painted_store):
    d = load_dictionary(painted_store)
    with pytest.raises(FacetoolError, match="has no layer 'layer9'; it has: full, pooled"):
        dissect_units(HandUnits(), d, ["layer9"])


def test_compare_ranks_links_that_differ():
    from facetool.explainers.units.dissect import Dissection, LayerResult, UnitResult

    def diss(n_link):
        units = [UnitResult(i, "glasses", 0.1, "local", "eye", concepts=["glasses"],
                            biased=["gender=male"] if i < n_link else []) for i in range(4)]
        units.append(UnitResult(4, "mouth", 0.1, "local", "mouth", concepts=["mouth"], biased=["age=0-20"]))
        return Dissection({"l": LayerResult("l", units, (5, 1, 1), np.zeros((5, 1)))}, {}, {}, {})

    rows = compare_dissections(diss(3), diss(0), ("biased", "clean"))
    top = rows[0]
    assert (top["concept"], top["subgroup"], top["units biased"], top["units clean"]) == ("glasses", "gender=male", 3, 0)
    assert top["difference"] == pytest.approx(0.6)
    assert rows[-1]["difference"] == 0


# ------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def small_resnet(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    m = create_model("resnet18", num_classes=2, input_size=64, width=8)
    p = tmp_path_factory.mktemp("ck") / "r18.pt"
    save_checkpoint(p, m.eval())
    return p


def test_cli_writes_report_tally_and_json(painted_store, small_resnet, tmp_path):
    out = tmp_path / "dis"
    r = run_facetool("dissect", "units", "--model", small_resnet, "--store", painted_store, "--layers", "layer2,layer3",
                     "--out", out, "--quantile", "0.05", "--batch-size", "16")
    assert r.returncode == 0, r.stderr
    for f in ("report.html", "tally.csv", "dissection.json"):
        assert (out / f).is_file()
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page.split("<body>")[1].split("data:")[0]
    js = json.loads((out / "dissection.json").read_text())
    assert set(js["counts"]["r18"]) == {"layer2", "layer3"}
    assert js["counts"]["r18"]["layer3"]["units"] == 32  # width 8: layer3 has 4 x 8 channels
    rows = list(csv.DictReader(open(out / "tally.csv")))
    assert len(rows) == 16 + 32
    # same folder again: refused without --overwrite, nothing replaced
    r2 = run_facetool("dissect", "units", "--model", small_resnet, "--store", painted_store, "--layers", "layer3",
                      "--out", out)
    assert r2.returncode == 2 and "--overwrite" in r2.stderr and "Traceback" not in r2.stderr


def test_cli_bad_input(painted_store, small_resnet, tmp_path):
    r = run_facetool("dissect", "units", "--model", small_resnet, "--store", painted_store, "--layers", "layer3,conv9",
                     "--out", tmp_path / "x")
    assert r.returncode == 2 and "layer1, layer2, layer3, layer4" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x" / "report.html").exists()
    r = run_facetool("dissect", "units", "--model", small_resnet, "--store", painted_store, "--layers", "layer3",
                     "--out", tmp_path / "y", "--quantile", "2")
    assert r.returncode == 2 and "--quantile" in r.stderr
    r = run_facetool("dissect", "units", "--compare", small_resnet, "--store", painted_store, "--layers", "layer3",
                     "--out", tmp_path / "z")
    assert r.returncode == 2 and "two checkpoints" in r.stderr


def test_cli_csv_dictionary_and_compare(tmp_path, small_resnet):
    csv_p = make_csv_dictionary(tmp_path / "dict")
    out = tmp_path / "cmp"
    r = run_facetool("dissect", "units", "--compare", small_resnet, small_resnet, "--dictionary", csv_p,
                     "--layers", "layer1", "--out", out, "--quantile", "0.05")
    assert r.returncode == 0, r.stderr
    assert "missing mask: 1" in r.stdout and (out / "compare.csv").is_file()


# ------------------------------------------------------------------------------------- bias discovery
@pytest.mark.slow
def test_bias_discovery_flags_the_planted_glasses_gender_link(tmp_path, gender_bias_models):
    """Gender classifiers trained where males wear glasses in 90 % of their images (females 10 %) and
    where everybody does in 50 % (the session fixture ``gender_bias_models``), dissected on a third set
    (other identities, glasses on exactly half of each identity's images): the biased model's glasses
    units are tied to its 'male' predictions, the clean model's not. Averaged over two seeds; the
    measured numbers are in the comment at the end."""
    from conftest import learning_seeds
    from facetool.explainers.units.dissect import link_strength
    from facetool.explainers.units.report import dissect_to_folder

    stores, models = gender_bias_models["stores"], gender_bias_models["models"]
    link = ("glasses", "gender (predicted)=male")
    got = {"biased": [], "clean": []}
    share = {"biased": [], "clean": []}
    for seed in learning_seeds(2):
        res = dissect_to_folder(tmp_path / f"dissect_{seed}", models=[models["biased", seed], models["clean", seed]],
                                layers="layer2,layer3", store=stores["dict"], quantile=0.05, compare=True,
                                max_units=4, batch_size=64)
        for name, d in zip(("biased", "clean"), res["results"].values()):
            ls = link_strength(d, *link)
            got[name].append(round(ls["excess"], 3))
            share[name].append(round(ls["share"], 3))
        page = (tmp_path / f"dissect_{seed}" / "report.html").read_text()
        assert "Bias discovery" in page and "glasses" in page
    b, c = np.mean(got["biased"]), np.mean(got["clean"])
    print(f"glasses -> predicted male, excess P per seed: {got}, share of linked units {share}; "
          f"mean biased {b:.3f} clean {c:.3f}")
    # Excess P(predicted male) of the units holding glasses (layer2 + layer3), measured per seed
    # (biased / clean): FACETOOL_TEST_SEED=0: 0.238, 0.195 / 0.002, -0.051 (means 0.216 / -0.024);
    # =100: 0.228, 0.189 / 0.065, -0.410 (0.209 / -0.172); =200: 0.184, 0.233 / -0.005, -0.034
    # (0.209 / -0.019). Share of units linking glasses to 'male': biased 0.23-0.32, clean 0-0.28.
    assert b > 0.1 and b - c > 0.1, got


class _StrideTwo(FaceModel):
    """``down``: a stride-2, "same"-padded 3x3 convolution whose kernel picks the centre pixel of the red
    channel, so cell (j, k) IS input pixel (2j, 2k): its receptive-field centre."""

    layer_names = ("down",)
    cam_layer = "down"

    def __init__(self, input_size: int = 64, num_classes: int = 0) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 1, 3, stride=2, padding=1, bias=False)
        with torch.no_grad():
            self.down.weight.zero_()
            self.down.weight[0, 0, 1, 1] = 1.0
        self.output_kind = "embedding"

    def forward_features(self, x, internals=None):
        return self.down(x)

    def forward_head(self, f):
        return f.mean((2, 3))


def test_unit_maps_put_cells_on_their_receptive_field_centres(painted_store):
    """Upsampled unit maps take cell (j, k)'s value exactly at pixel (2j, 2k) for a stride-2 layer
    (interpolate(align_corners=False) put it at (2j + 0.5, 2k + 0.5), half a cell off)."""
    from facetool.data.transforms import normalize
    from facetool.explainers.units.report import unit_maps

    d = load_dictionary(painted_store)
    maps = unit_maps(_StrideTwo(), d, "down", [0, 1])
    for r in (0, 1):
        red = normalize(d.batch(np.array([r])).images)[0, 0]
        assert maps[r].shape == (1, 64, 64)
        torch.testing.assert_close(maps[r][0, ::2, ::2], red[::2, ::2], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------- issue 17
class _RedUnit(FaceModel):
    """One unit: the (normalised) red channel; on a flat image its maximum is the image's red level."""

    layer_names = ("red",)
    cam_layer = "red"

    def __init__(self) -> None:
        super().__init__()
        self.red = nn.Identity()
        self.task = "embedding"

    def forward_features(self, x, internals=None):
        return self.red(x[:, :1])

    def forward_head(self, f):
        return f.mean((2, 3))


def _age_store(path: Path) -> Path:
    """4 identities x 2 flat 32-px faces; age has a vocabulary of 4 values of which only 20-40 (ids 0, 1)
    and 60+ (ids 2, 3) are present; gender has only 'female'. Red levels 20-40: 40, 100, 150, 190;
    60+: 60, 140, 180, 220."""
    from facetool.store import Record, StoreWriter

    w = StoreWriter(path, image_size=(32, 32), identities=["a", "b", "c", "d"],
                    identity_attributes={"age": (["0-20", "20-40", "40-60", "60+"], [1, 1, 3, 3]),
                                         "gender": (["female", "male"], [0, 0, 0, 0])})
    lm = np.array([[11, 13], [21, 13], [16, 18], [12, 24], [20, 24]], np.float32)
    for i, red in enumerate([40, 100, 150, 190, 60, 140, 180, 220]):
        img = np.full((32, 32, 3), 128, np.uint8)
        img[..., 0] = red
        w.append(Record(image=img, label=i // 2, landmarks=lm))
    w.checkpoint(8, force=True)
    w.finalize()
    return path


def test_global_threshold_counts_the_values_present_in_the_dictionary(tmp_path):
    """W1: by hand, the red unit's P(age) over the values present is 20-40: 0.396, 60+: 0.604 (absent
    values 0). With k = the vocabulary (4) the threshold 0.3 made it 'biased' to both ages at once;
    with k = the 2 values present it is 0.55: biased to 60+ only. A group with one value present is
    dropped with a note."""
    d = load_dictionary(_age_store(tmp_path / "age.h5"))
    res = dissect_units(_RedUnit(), d, ["red"], quantile=0.05, device="cpu")
    u = res.layers["red"].units[0]
    p = u.globals["age"]
    assert p["0-20"] == 0 and p["40-60"] == 0
    assert p["20-40"] == pytest.approx(0.3956, abs=1e-3) and p["60+"] == pytest.approx(0.6044, abs=1e-3)
    assert u.biased == ["age=60+"], u.biased
    assert "gender" not in u.globals
    assert res.notes == ["global group 'gender' dropped: only one value (female) is present among the 8 "
                         "dictionary images, so no unit can be biased within it"]
    assert "values present" in res.settings["global_threshold"]
    d.close()


def test_limit_takes_a_fixed_sample_stratified_by_identity(painted_store):
    """W1: --limit N took the first N images (two of the six identities); now every identity gives N/6,
    the same images on every run, in store order."""
    from facetool.store import FaceStore

    with FaceStore(painted_store) as s:
        labels = s.labels
    d = load_dictionary(painted_store, limit=12)
    idx = d.index
    assert len(idx) == 12 and list(idx) == sorted(idx)
    assert sorted(np.bincount(labels[idx], minlength=6)) == [2] * 6
    assert list(load_dictionary(painted_store, limit=12).index) == list(idx)  # deterministic
    assert any("stratified by identity" in n for n in d.notes)
    # uneven identities: the small one gives all it has, the others share the rest (+-1)
    from facetool.explainers.units.dictionary import stratified_sample

    lab = np.array([0] * 10 + [1] * 2 + [2] * 5)
    pick = stratified_sample(np.arange(17) + 100, lab, 9)
    counts = np.bincount(lab[pick - 100], minlength=3)
    assert counts[1] == 2 and sorted(counts[[0, 2]]) == [3, 4] and len(set(pick)) == 9
    # and --help says so
    import typer

    from facetool.cli import app

    root = typer.main.get_command(app)
    dissect = root.get_command(root.context_class(root), "dissect")
    units = dissect.get_command(dissect.context_class(dissect), "units")
    limit = next(p for p in units.params if p.name == "limit")
    assert "stratified by identity" in limit.help


def test_report_html_shows_a_dash_not_an_escaped_entity(painted_store):
    """units/report.html showed a literal '&ndash;' for a unit holding no local concept (escaped twice)."""
    from html.parser import HTMLParser

    from facetool.explainers.units.report import render_report

    d = load_dictionary(painted_store)
    model = HandUnits()
    res = dissect_units(model, d, ["full"], batch_size=16, device="cpu")
    assert res.layers["full"].units[1].kind == "global"  # shown, with no concept held
    page = render_report({"hand": res}, {"hand": model}, d, max_units=4)

    class Text(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.parts = []

        def handle_data(self, data):
            self.parts.append(data)

    t = Text()
    t.feed(page)
    text = "".join(t.parts)
    assert "&ndash;" not in text and "&amp;" not in page
    assert "holds: \u2013" in text
    d.close()


def _one_value_gender_model(path: Path) -> Path:
    """A 32-px gender classifier that predicts 'female' for every face (a large bias on class 0)."""
    torch.manual_seed(0)
    m = create_model("resnet18", num_classes=2, input_size=32, width=8)
    m.config["task"] = {"kind": "attribute", "names": ["gender"], "classes": [2], "vocab": [["female", "male"]]}
    with torch.no_grad():
        m.fc.bias.copy_(torch.tensor([50.0, -50.0]))
    return save_checkpoint(path, m.eval())


def test_cli_compare_says_why_its_table_is_empty(tmp_path):
    """`--compare` printed an empty table without a word: the model predicts one gender on the whole
    dictionary, so 'gender (predicted)' is dropped and nothing is left to link concepts to."""
    csv_p = make_csv_dictionary(tmp_path / "dict")
    g = _one_value_gender_model(tmp_path / "g.pt")
    out = tmp_path / "cmp"
    r = run_facetool("dissect", "units", "--compare", g, g, "--dictionary", csv_p, "--layers", "layer1",
                     "--out", out, "--quantile", "0.05")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines and all(ln.startswith("note: ") for ln in lines), r.stderr
    assert any("global group 'gender (predicted)' dropped: the model predicts one value (female) on all 3 "
               "dictionary images" in ln for ln in lines), r.stderr
    assert "note: bias discovery: no concept-subgroup link to compare: no global group with two values" in r.stderr
    assert "concept-subgroup links that differ" not in r.stdout
    js = json.loads((out / "dissection.json").read_text())
    assert all("gender (predicted)" in res["notes"][0] for res in js["results"].values())


def test_cli_device_and_arch_are_checked_before_any_work(painted_store, small_resnet, tmp_path, cli):
    """I11: --device tpu (and cuda without a GPU) ended in 'internal error'; --arch was missing."""
    out = tmp_path / "dev"
    args = ["dissect", "units", "--model", small_resnet, "--store", painted_store, "--layers", "layer3", "--out", out]
    r = run_facetool(*args, "--device", "tpu")
    assert r.returncode == 2 and r.stderr.startswith("error: --device 'tpu' is not a device; use auto, cpu")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr and not out.exists()
    if not torch.cuda.is_available():
        r = run_facetool(*args, "--device", "cuda")
        assert r.returncode == 2 and r.stderr.startswith("error: --device cuda: no CUDA device here; use --device cpu")
        assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    r = cli(*args, "--arch", "iresnet34")
    assert r.exit_code == 2 and "resnet18; --arch iresnet34 contradicts it" in r.output and not out.exists()
    r = cli(*args, "--arch", "resnet18", "--device", "cpu", "--quantile", "0.05")
    assert r.exit_code == 0, r.output


# ------------------------------------------------------------------------ identical to the reference
def _same_dissection(new, ref) -> None:
    assert list(new.layers) == list(ref.layers)
    for name in ref.layers:
        a, b = new.layers[name], ref.layers[name]
        assert a.shape == b.shape and np.array_equal(a.iou, b.iou), name  # bit-identical IoU sums
        assert [u.to_dict() for u in a.units] == [u.to_dict() for u in b.units], name
    assert new.tally(None) == ref.tally(None)
    assert new.notes == ref.notes and new.dictionary == ref.dictionary and new.settings == ref.settings


@pytest.mark.parametrize("quantile", [0.005, 0.05, 0.2])
def test_hand_units_dissection_equals_the_reference_implementation(painted_store, quantile):
    """Tallies, IoUs, probabilities, biases and top images equal the frozen pre-vectorisation code
    (tests/dissect_reference.py) exactly, at full (64x64) and pooled (16x16) resolution, with a batch
    size that does not divide the 36 images."""
    import dissect_reference

    out = []
    for fn in (dissect_units, dissect_reference.dissect_units):
        d = load_dictionary(painted_store)
        out.append(fn(HandUnits(), d, ["full", "pooled"], quantile=quantile, batch_size=7, device="cpu"))
        d.close()
    _same_dissection(*out)


@pytest.mark.parametrize("quantile,input_size", [(0.005, 64), (0.05, 64), (0.05, 96)])
def test_resnet_dissection_equals_the_reference_implementation(painted_store, quantile, input_size):
    """A random ResNet-18 (2 classes: a predicted group too) on layer2..layer4, at the store's size and
    at another input size (maps resized): identical to the reference code."""
    import dissect_reference

    torch.manual_seed(1)
    model = create_model("resnet18", num_classes=2, input_size=input_size, width=8).eval()
    out = []
    for fn in (dissect_units, dissect_reference.dissect_units):
        d = load_dictionary(painted_store)
        out.append(fn(model, d, ["layer2", "layer3", "layer4"], quantile=quantile, batch_size=16, device="cpu"))
        d.close()
    _same_dissection(*out)


def test_unit_concept_counts_equal_hand_counts_on_a_two_by_two_map():
    """A 2x2 map with a single 1 at (row 0, col 1), upsampled onto 4x4 (stride 2: rows/cols read cells
    [0], [0, 1] half-half, [1], [1]) is [[0, .5, 1, 1], [0, .25, .5, .5], 0, 0]; above 0.5: pixels (0, 2),
    (0, 3). Mask 0 = left half, mask 1 = top row, mask 2 = nothing (image does not carry it)."""
    from facetool.explainers.units.dissect import unit_concept_counts

    maps = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])
    masks = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
    masks[0, 0, :, :2] = True
    masks[0, 1, 0] = True
    inter, covered, area = unit_concept_counts(maps, masks, torch.tensor([0.5]), (4, 4))
    assert inter.tolist() == [[0, 2, 0]] and covered.tolist() == [[2, 2, 0]] and area.tolist() == [8, 4, 0]


@pytest.mark.parametrize("h,size,input_size,quantile", [(7, (112, 112), None, 0.005), (4, (112, 112), None, 0.05),
                                                       (16, (64, 64), None, 0.2), (5, (50, 50), (96, 96), 0.05),
                                                       (64, (64, 64), None, 0.01)])
def test_unit_concept_counts_equal_the_reference_sums_and_add_over_shards(h, size, input_size, quantile):
    """Random maps (ReLU'd, so many ties at 0) and random blob masks, coarse and fine maps, a size the map does
    not divide, a model input of another size: the counts equal the reference's dense sums exactly, and
    the counts of two shards of the batch add up to the whole batch's."""
    import dissect_reference
    from facetool.explainers.units.dissect import unit_concept_counts

    g = torch.Generator().manual_seed(h)
    B, U, K = 6, 40, 5
    maps = torch.relu(torch.randn(B, U, h, h, generator=g))
    thr = torch.quantile(maps.transpose(0, 1).reshape(U, -1), 1 - quantile, dim=1)
    yy, xx = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    c = torch.rand(B, K, 2, generator=g) * torch.tensor(size)
    masks = ((yy - c[..., :1, None]) ** 2 + (xx - c[..., 1:, None]) ** 2) < (size[0] / 5) ** 2  # (B, K, H, W)
    masks[0, 2] = False
    inter, covered, area = unit_concept_counts(maps, masks, thr, size, input_size)
    ri, rc, ra = dissect_reference.iou_counts(maps, masks, thr, size, input_size)
    assert inter.sum() > 0 and torch.equal(inter.double(), ri) and torch.equal(covered.double(), rc)
    assert torch.equal(area.double(), ra)
    halves = [unit_concept_counts(maps[s], masks[s], thr, size, input_size) for s in (slice(0, 2), slice(2, None))]
    for whole, a, b in zip((inter, covered, area), *halves):
        assert torch.equal(whole, a + b)


def test_vectorised_ranks_and_group_probabilities_equal_the_per_unit_code():
    """All units at once give bit-identical ranks (ties, NaNs) and group probabilities (2, 4 and 9 values:
    numpy sums 8 or more values pairwise) to the reference's one unit at a time."""
    import dissect_reference
    from facetool.explainers.units.dissect import average_ranks as ranks2
    from facetool.explainers.units.dissect import group_probabilities as probs2

    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=(300, 20)), 1)  # many ties
    x[5, 3] = x[9, 3] = np.nan
    r = ranks2(x)
    for j in range(x.shape[1]):
        assert np.array_equal(r[:, j], dissect_reference.average_ranks(x[:, j]))
    w = rng.random((300, 20)) * (rng.random((300, 20)) > 0.3)
    w[:, 4] = 0.0  # a unit with no score: P = 0
    for k in (2, 4, 9):
        codes = rng.integers(0, k, 300)
        p = probs2(w, codes, k)
        for j in range(w.shape[1]):
            assert np.array_equal(p[:, j], dissect_reference.group_probabilities(w[:, j], codes, k)), (k, j)
