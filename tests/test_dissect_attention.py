"""`facetool dissect attention`: part shares by hand, landmark parts, mean maps per value, the CLI on a
real store and checkpoint, bad input, and learning tests of ABN on the synthetic set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import learning_seeds, run_facetool
from facetool.errors import FacetoolError
from facetool.explainers.attention import dissect_attention, landmark_part_masks, part_shares, upsample_maps
from facetool.models import create_model, save_checkpoint
from facetool.store import FaceStore, Record, StoreWriter
from facetool.tasks import resolve_task


def test_part_shares_by_hand():
    maps = np.array([[[[1.0, 0.0], [0.0, 1.0]], [[0.2, 0.2], [0.2, 0.4]]]], np.float32)  # (1, 2, 2, 2)
    mask = np.array([[[True, True], [False, False]]])
    share, area, present = part_shares(maps, mask)
    assert share[0].tolist() == pytest.approx([0.5, 0.4 / 1.0])
    assert area.tolist() == [0.5] and present.tolist() == [True]
    _, _, present = part_shares(maps, np.zeros_like(mask))
    assert present.tolist() == [False]


def test_upsample_maps_puts_cells_on_receptive_field_centres():
    m = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])  # (1, 1, 2, 2) map of a stride-4 model on an 8x8 input
    up = upsample_maps(m, (8, 8))[0, 0]
    assert [float(up[0, 0]), float(up[0, 4]), float(up[4, 0]), float(up[4, 4])] == [0, 1, 2, 3]  # cell j at pixel 4j
    assert float(up[0, 2]) == pytest.approx(0.5) and float(up[2, 2]) == pytest.approx(1.5)
    assert float(up[7, 7]) == 3 and float(up[6, 0]) == 2  # past the last centre: the border value
    # the image is twice the model input: image pixel 8 (centre 8.5) = input coordinate 8.5 / 2 - 0.5 = 3.75
    up2 = upsample_maps(m, (16, 16), (8, 8))[0, 0]
    assert float(up2[0, 8]) == pytest.approx(3.75 / 4) and float(up2[8, 0]) == pytest.approx(2 * 3.75 / 4)
    # interpolate(align_corners=False) is the same map shifted by (s - 1) / 2 px: 1 px for stride 3
    m3 = torch.rand(1, 2, 3, 3)
    ours = upsample_maps(m3, (9, 9))
    theirs = torch.nn.functional.interpolate(m3, size=(9, 9), mode="bilinear", align_corners=False)
    torch.testing.assert_close(theirs[..., 2:8, 2:8], ours[..., 1:7, 1:7])


@pytest.mark.parametrize("name", ["abn_resnet18", "abn_iresnet18"])
def test_abn_map_cell_is_centred_on_stride_times_index(name):
    """The input pixels a map cell depends on (|d cell / d x|, all weights made positive) are centred
    on pixel s*j, the convention of :func:`upsample_maps`, not on s*(j + 0.5) - 0.5."""
    torch.manual_seed(0)
    m = create_model(name, num_classes=2, input_size=128, width=4).eval()
    for c in m.modules():
        if isinstance(c, torch.nn.Conv2d):
            c.weight.data.abs_()
    s = m.attention_stride
    assert s == (8 if "iresnet" in name else 16)
    x = torch.rand(2, 3, 128, 128, requires_grad=True)
    g = m.layer3(m.layer2(m.layer1(m.stem(x))))
    assert g.shape[-1] == 128 // s
    j = 4
    g[:, :, j, j].sum().backward()
    w = x.grad.abs().sum((0, 1))
    pix = torch.arange(128.0)
    cy, cx = float((w.sum(1) * pix).sum() / w.sum()), float((w.sum(0) * pix).sum() / w.sum())
    assert abs(cy - s * j) < 1.5 and abs(cx - s * j) < 1.5, (cy, cx)  # measured 63.5/64.6 (16), 32.3/32.1 (8)


def test_landmark_parts():
    lm = np.array([[[10, 10], [30, 10], [20, 20], [12, 30], [28, 30]]], np.float32)
    m = landmark_part_masks(lm, (40, 40))
    assert m["left_eye"][0, 10, 10] and not m["left_eye"][0, 10, 30] and m["right_eye"][0, 10, 30]
    assert m["nose"][0, 20, 20] and m["mouth"][0, 30, 20] and not m["mouth"][0, 10, 20]
    # lower face: ellipse 0.9d x 0.55d (d = 20) centred 0.3d = 6 px below the mouth centre (20, 30)
    assert m["lower_face"][0, 36, 20] and m["lower_face"][0, 36, 37] and not m["lower_face"][0, 36, 39]
    assert m["lower_face"][0, 26, 20] and not m["lower_face"][0, 24, 20]
    r = 0.3 * 20  # radius 0.3 x inter-ocular distance
    assert m["nose"][0].sum() == pytest.approx(np.pi * r * r, rel=0.15)
    nan = landmark_part_masks(np.full((1, 5, 2), np.nan, np.float32), (8, 8))
    assert not any(v.any() for v in nan.values())


def _abn_checkpoint(store: Path, path: Path, spec: str = "attributes") -> Path:
    task = resolve_task(spec, store)
    torch.manual_seed(0)
    with FaceStore(store) as s:
        size = s.image_size[0]
    m = create_model("abn_resnet18", num_classes=task.num_outputs, heads=task.classes, input_size=size, width=4)
    for b in m.modules():  # non-trivial maps
        if isinstance(b, torch.nn.BatchNorm2d):
            b.running_mean.uniform_(-0.5, 0.5)
    m.config["task"] = task.to_json()
    save_checkpoint(path, m)
    return path


def test_dissect_attention_cli_on_synthetic_store(tmp_path):
    from facetool.data.synthetic import prepare_synthetic
    from facetool.models import load_model

    store, _ = prepare_synthetic(tmp_path / "s.h5", identities=4, per_identity=5, size=48, seed=0)
    ck = _abn_checkpoint(store, tmp_path / "abn.pt", "attributes:gender,facial_hair")
    out = tmp_path / "att"
    r = run_facetool("dissect", "attention", "--model", ck, "--store", store, "--out", out, "--images", "3")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "attention.json").read_text())
    assert res["maps"] == 2 and res["heads"] == ["gender", "facial_hair"] and res["part_source"] == "part_masks"
    for f in ("overlays.png", "mean_maps.png", "mean_maps.npz", "part_shares.csv"):
        assert (out / f).is_file(), f
    import cv2

    grid = cv2.imread(str(out / "overlays.png"))
    assert grid.shape[0] > 3 * 48 and grid.shape[1] > 3 * 48  # 3 images x (face + 2 maps), labels, colour bar
    shares = {(x["head"], x["part"]): x for x in res["part_shares"]}
    assert ("facial_hair", "beard") in shares and ("gender", "eyes") in shares
    assert all(0 <= x["attention_share"] <= 1 and 0 < x["area_share"] <= 1 for x in shares.values())
    # the mean map of gender=male equals the average of the upsampled maps of the male test images
    model = load_model(ck)
    with FaceStore(store) as s:
        idx = s.indices("test")
        codes, vocab = s.attribute("gender")
        x = torch.from_numpy(s.images(idx)).permute(0, 3, 1, 2).float()
    x = (x - 127.5) / 127.5
    with torch.no_grad():
        _, it = model(x, return_internals=True)
    up = upsample_maps(it["attention"], (48, 48), stride=16)
    male = codes[idx] == vocab.index("male")
    npz = np.load(out / "mean_maps.npz")
    np.testing.assert_allclose(npz["gender=male"], up[torch.from_numpy(male), 0].mean(0).numpy(), atol=1e-5)
    # existing output folder: refused without --overwrite
    r = run_facetool("dissect", "attention", "--model", ck, "--store", store, "--out", out)
    assert r.returncode == 2 and "--overwrite" in r.stderr


def test_dissect_attention_landmarks_and_bad_input(tmp_path, cli):
    # a store without part masks but with landmarks (e.g. CelebA): parts from the 5 points
    w = StoreWriter(tmp_path / "lm.h5", image_size=(32, 32), identities=["a", "b"],
                    attribute_values={"gender": ["f", "m"]})
    rng = np.random.default_rng(0)
    lm = np.array([[11, 13], [21, 13], [16, 18], [12, 24], [20, 24]], np.float32)
    for i in range(6):
        w.append(Record(image=rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), label=i % 2, split=i % 2,
                        landmarks=lm, attributes={"gender": (i // 2) % 2}))
    store = w.finalize()
    ck = _abn_checkpoint(store, tmp_path / "abn.pt", "attribute:gender")
    res = dissect_attention(ck, store, tmp_path / "o", split="all", images=0)
    assert res["part_source"] == "landmarks" and {x["part"] for x in res["part_shares"]} == {
        "left_eye", "right_eye", "nose", "mouth", "lower_face"}
    assert "overlays.png" not in res["files"]
    # a model without an attention map: one line naming the models that have one, nothing written
    plain = create_model("resnet18", num_classes=2, input_size=32, width=4)
    save_checkpoint(tmp_path / "plain.pt", plain)
    r = cli("dissect", "attention", "--model", tmp_path / "plain.pt", "--store", store, "--out", tmp_path / "p")
    assert r.exit_code == 2 and "has no attention map" in r.output and "abn_resnet50" in r.output
    assert not (tmp_path / "p").exists()
    with pytest.raises(FacetoolError, match="is also an input"):
        dissect_attention(ck, store, store, overwrite=True)


def _figure_texts(fig) -> tuple[set[str], list[str]]:
    """(titles and y labels of the image axes, labels of the colour bars) of a matplotlib figure."""
    texts, bars = set(), []
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            bars.append(ax.get_ylabel() or ax.get_xlabel())
        else:
            texts |= {ax.get_title(), ax.get_ylabel()} - {""}
    return texts, bars


def test_attention_figures_have_labels_and_a_colour_bar(tmp_path, monkeypatch):
    """overlays.png and mean_maps.png were bare pixel grids: now rows name the image (store row and
    identity) or the head, columns the attribute head or value (with its image count), and a colour
    bar gives the scale."""
    from matplotlib.figure import Figure

    from facetool.data.synthetic import prepare_synthetic

    saved = []
    savefig = Figure.savefig

    def capture(self, *a, **k):
        saved.append(self)
        return savefig(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", capture)
    store, _ = prepare_synthetic(tmp_path / "s.h5", identities=4, per_identity=5, size=48, seed=0)
    ck = _abn_checkpoint(store, tmp_path / "abn.pt", "attributes:gender,facial_hair")
    res = dissect_attention(ck, store, tmp_path / "att", images=3)
    assert {"overlays.png", "mean_maps.png"} <= set(res["files"]) and len(saved) == 2
    with FaceStore(store) as s:
        rows = s.indices("test")[:3]
        who = [s.identities[s.labels[r]] for r in rows]
        codes, vocab = s.attribute("gender")
        n_male = int((codes[s.indices("test")] == vocab.index("male")).sum())
    texts, bars = _figure_texts(saved[0])
    assert {"face", "gender", "facial_hair"} <= texts and bars == ["attention"]
    assert {f"#{r}\n{w}" for r, w in zip(rows, who)} <= texts, texts
    texts, bars = _figure_texts(saved[1])
    assert {"gender", "facial_hair", f"male ({n_male})"} <= texts and bars == ["mean attention / map maximum"]


def test_attention_arch_and_device_options(tmp_path, cli):
    """--arch and --device were missing on `dissect attention`; both are checked before any work."""
    from facetool.data.synthetic import prepare_synthetic

    store, _ = prepare_synthetic(tmp_path / "s.h5", identities=2, per_identity=3, size=32, seed=0)
    ck = _abn_checkpoint(store, tmp_path / "abn.pt", "attribute:gender")
    out = tmp_path / "o"
    r = cli("dissect", "attention", "--model", ck, "--store", store, "--out", out, "--arch", "iresnet34")
    assert r.exit_code == 2 and "abn_resnet18; --arch iresnet34 contradicts it" in r.output and not out.exists()
    r = cli("dissect", "attention", "--model", ck, "--store", store, "--out", out, "--device", "tpu")
    assert r.exit_code == 2 and "--device 'tpu' is not a device" in r.output and not out.exists()
    r = cli("dissect", "attention", "--model", ck, "--store", store, "--out", out, "--arch", "abn_resnet18",
            "--device", "cpu", "--images", 1)
    assert r.exit_code == 0, r.output


# -- learning tests on the synthetic set -------------------------------------------------------------
def _train_abn(tmp_path: Path, seed: int, spec: str, *, ids: int, per: int, epochs: int, mechanism: str,
               size: int = 64, bias: str | None = None, test_fraction: float = 0.2, att_channels: int | None = None,
               lr: float = 0.05):
    from facetool.data.synthetic import prepare_synthetic
    from facetool.engine import TrainConfig
    from facetool.trainers.classify import train_on_store
    from facetool.trainers.abn import ABNMethod

    store, _ = prepare_synthetic(tmp_path / f"s{seed}.h5", identities=ids, per_identity=per, size=size, seed=seed,
                                 bias=bias, test_fraction=test_fraction)
    task = resolve_task(spec, store)
    cfg = TrainConfig(out=tmp_path / f"abn{seed}", epochs=epochs, batch_size=16, lr=lr, seed=seed, verbose=False)
    kw = {"width": 8, "heads": task.classes, "mechanism": mechanism}
    if att_channels:
        kw["att_channels"] = att_channels
    res = train_on_store(store, "abn_resnet18", lambda m: ABNMethod(), cfg, task=task, model_kwargs=kw)
    return store, tmp_path / f"abn{seed}" / "model.pt", res["metrics"]


@pytest.mark.slow
def test_abn_multitask_beats_majority_baseline(tmp_path):
    """ABN-ResNet-18 (width 8, 64 px), all 6 synthetic attributes in one batched pass, 16 ids x 12 images,
    15 epochs. Measured mean val attribute accuracy: seeds 0/1/100/200 = 0.85/0.82/0.82/0.77 vs majority
    0.44 (margin ~0.38); asserted: mean margin over learning_seeds(2) > 0.2."""
    gaps = []
    for seed in learning_seeds(2):
        _, _, m = _train_abn(tmp_path, seed, "attributes", ids=16, per=12, epochs=15, mechanism="residual")
        gaps.append(m["val_attr_acc"] - m["val_attr_base"])
        print(f"seed {seed}: ABN mean attribute acc {m['val_attr_acc']:.3f} majority {m['val_attr_base']:.3f}")
    assert np.mean(gaps) > 0.2, gaps


@pytest.mark.slow
def test_abn_attention_mass_on_the_glasses_frame_exceeds_its_area(tmp_path):
    """ABN-ResNet-18 (width 8, 128 px -> 8x8 maps; --mechanism multiply; att_channels 16; lr 0.02, 15
    epochs) trained on `accessory` of a store where every image wears glasses with p = 0.5 independently
    of identity and of every other attribute (16 ids x 12 images, a third held out): the glasses are the
    only cue, and their frame is the store's `accessory` part mask (~3.2 % of the image). Metric: `dissect
    attention`'s `ratio` = mean share of the RAW map's mass on the frame / the frame's mean area share,
    over the held-out images with glasses (maps placed on receptive-field centres). A perfect 8x8 map
    (the frame's pooled mask) would reach several times 1; ABN's map reaches ~1.3 on average: real but modest.

    Why not facial_hair/beard: with the paper's K = C = 2 attention bottleneck the branch died on
    bearded faces (all channels zero -> constant map -> ratio exactly 1.000, attention accuracy =
    majority); alive (K = 16) the ratio stayed 0.96-1.04 at 64 and 128 px (facial_hair is per identity
    and male-only: identity and gender cues predict it). Residual mechanism / lr 0.05 / longer training
    gave less stable ratios (0.83-1.76 per seed; 25 epochs: 1.11-1.12).

    MEASURED with the bold frames of generator version 2 (frame ~3.2 % of the image; 1 and 2 threads
    give the same numbers): seeds 0-3 = 1.64/1.12/1.19/1.47 -> mean 1.36; 100-103 = 1.16/1.28/1.28/1.34
    -> 1.27; 200-203 = 0.86/0.98/1.34/1.53 -> 1.18. Glasses accuracy 0.94-1.00
    vs majority 0.41-0.48. Per seed the ratio scatters (sd ~0.2 over 12 runs, mean 1.27), so the test
    averages learning_seeds(4) and asserts what the issue asks, that the mean exceeds 1 (the frame's
    area share); the expected mean sits ~2.7 standard errors above it."""
    ratios = []
    for seed in learning_seeds(4):
        store, model, m = _train_abn(tmp_path, seed, "attribute:accessory", ids=16, per=12, epochs=15,
                                     mechanism="multiply", size=128, test_fraction=1 / 3, att_channels=16, lr=0.02,
                                     bias="accessory=glasses,attribute=gender,value=male,p=0.5")
        res = dissect_attention(model, store, tmp_path / f"att{seed}", images=0)
        row = next(r for r in res["part_shares"] if r["head"] == "accessory" and r["part"] == "accessory")
        ratios.append(row["ratio"])
        print(f"seed {seed}: glasses acc {m['val_attr_acc']:.3f} (majority {m['val_attr_base']:.3f}), "
              f"attention share on the frame {row['attention_share']:.4f} vs area {row['area_share']:.4f}: "
              f"ratio {row['ratio']:.2f} over {row['images']} images")
    assert np.mean(ratios) > 1.0, ratios
