"""dissect relevance: targets, Grad-CAM/LRP/random maps, perturbation curves and part masses (unit
tests with hand-computed values) and the command on the real store format."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_facetool
from facetool.errors import FacetoolError
from facetool.explainers.relevance import (Explained, Target, check_target, explain, part_mass, perturbation_curves,
                                        region_scores, removal_masks)
from facetool.models import create_model


def _clf(seed=0):
    torch.manual_seed(seed)
    return create_model("resnet18", width=8, num_classes=5, input_size=64).eval()


def _emb(seed=0):
    torch.manual_seed(seed)
    return create_model("iresnet18", width=8, embedding_size=16, input_size=64).eval()


def test_region_scores_and_masks_by_hand():
    m = torch.tensor([[[1.0, 2, 0, 0], [3, 4, 0, 1], [0, 0, 9, 9], [0, 0, 9, 9]]])
    r = region_scores(m, 2)  # 2x2 cell means: [[2.5, 0.25], [0, 9]]
    assert torch.allclose(r, torch.tensor([[2.5, 0.25, 0.0, 9.0]]))
    order = torch.sort(r, dim=1, descending=True, stable=True).indices  # 3, 0, 1, 2
    masks = removal_masks(order, [0, 1, 2], (2, 2), 2, (4, 4))
    assert masks.shape == (3, 1, 1, 4, 4)
    assert masks[0].sum() == 0
    assert masks[1, 0, 0, 2:, 2:].sum() == 4 and masks[1].sum() == 4  # the 9s first
    assert masks[2, 0, 0, :2, :2].sum() == 4 and masks[2].sum() == 8  # then the top-left cell


class _PixelModel(nn.Module):
    """logits [w . x, 0]: the probability of class 0 is sigmoid(w . x)."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w, requires_grad=False)

    def forward(self, x):
        s = (x * self.w).sum((1, 2, 3))
        return torch.stack([s, torch.zeros_like(s)], 1)


def test_perturbation_curves_and_aopc_by_hand():
    w = torch.zeros(1, 1, 2, 2)
    w[0, 0, 0, 0] = 3.0
    w[0, 0, 1, 1] = 1.0
    model = _PixelModel(w)
    x = torch.ones(1, 1, 2, 2)
    what = Explained(classes=torch.tensor([0]))
    res = perturbation_curves(model, x, w[:, 0].numpy(), what, steps=2, max_fraction=0.5, patch=1, fill="black")
    sig = torch.sigmoid
    # black = -1 after normalisation; removing pixel (0,0) (weight 3): s = 4 - 3 - 3 = -2; then (1,1): -4
    morf = np.array([sig(torch.tensor(4.0)), sig(torch.tensor(-2.0)), sig(torch.tensor(-4.0))])
    # LeRF removes zero-weight pixels first: no change
    np.testing.assert_allclose(res["morf"][0], morf, rtol=1e-5)
    np.testing.assert_allclose(res["lerf"][0], [morf[0]] * 3, rtol=1e-5)
    assert res["fractions"] == [0.0, 0.25, 0.5]
    assert res["aopc_morf"] == pytest.approx(float((morf[0] - morf).mean()), rel=1e-5)
    assert res["aopc_lerf"] == pytest.approx(0.0, abs=1e-7)


def test_part_mass_by_hand():
    maps = np.zeros((2, 4, 4), np.float32)
    maps[:, 0, 0] = 3.0
    maps[:, 3, 3] = 1.0
    maps[:, 2, 2] = -5.0  # negative relevance does not count
    mask = np.zeros((2, 4, 4), bool)
    mask[:, 0, :] = True  # first row: area 4/16
    (row,) = part_mass(maps, {"top": mask})
    assert row["relevance_share"] == pytest.approx(0.75)
    assert row["area_share"] == pytest.approx(0.25)
    assert row["ratio"] == pytest.approx(3.0)


def test_targets_refused_with_one_line_errors():
    clf, emb = _clf(), _emb()
    with pytest.raises(FacetoolError, match="class head"):
        check_target(emb, Target.parse("label"))
    with pytest.raises(FacetoolError, match="embedding model"):
        check_target(clf, Target.parse("cosine"))
    with pytest.raises(FacetoolError, match="attribute model"):
        check_target(clf, Target.parse("attribute:gender"))
    with pytest.raises(FacetoolError, match="unknown --target"):
        Target.parse("logits")
    with pytest.raises(FacetoolError, match="attention"):
        explain(clf, torch.randn(1, 3, 64, 64), "attention", Explained(classes=torch.tensor([0])))
    clf.config["task"] = {"kind": "attribute", "names": ["gender"], "classes": [2], "vocab": [["f", "m"]]}
    check_target(clf, Target.parse("attribute:gender"))
    with pytest.raises(FacetoolError, match="identity classes"):
        check_target(clf, Target.parse("label"))


def test_lrp_output_of_cosine_sums_to_the_cosine():
    out = torch.randn(3, 16)
    ref = torch.randn(3, 16)
    r = Explained(refs=ref).lrp_output(out)
    torch.testing.assert_close(r.sum(1), torch.nn.functional.cosine_similarity(out, ref, dim=1))
    c = Explained(classes=torch.tensor([1, 0, 2]), sl=slice(1, 4)).lrp_output(out)
    assert torch.equal(c.nonzero()[:, 1], torch.tensor([2, 1, 3]))
    assert torch.equal(c.sum(1), out[[0, 1, 2], [2, 1, 3]])


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "scorecam", "lrp", "random"])
def test_explainers_leave_the_model_unchanged(method):
    m = _emb()
    m.train()  # explainers run in eval mode and restore the flags
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        m.eval()
        y0 = m(x)
        m.train()
        ref = torch.randn(2, 16)
    maps = explain(m, x, method, Explained(refs=ref))
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all() and np.abs(maps).max() > 0
    assert m.training and all(mod.training for mod in m.modules())
    assert not any(mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks for mod in m.modules())
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), y0)


# -- the command --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from facetool.models.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("relevance")
    torch.manual_seed(0)
    clf = create_model("resnet18", width=8, num_classes=8, input_size=64)
    emb = create_model("iresnet18", width=8, embedding_size=16, input_size=64)
    return save_checkpoint(d / "clf.pt", clf.eval()), save_checkpoint(d / "emb.pt", emb.eval())


def test_cli_lrp_classifier_writes_every_output(synthetic_store, checkpoints, tmp_path):
    clf, _ = checkpoints
    out = tmp_path / "rel"
    r = run_facetool("dissect", "relevance", "--model", clf, "--store", synthetic_store, "--out", out,
                     "--method", "lrp", "--target", "label", "--limit", 8, "--steps", 4, "--grid", 4)
    assert r.returncode == 0, r.stderr
    assert "AOPC" in r.stdout
    for f in ("overlay.png", "mean_maps.png", "curves.png", "curves.csv", "parts.csv", "maps.h5", "metrics.json"):
        assert (out / f).stat().st_size > 0, f
    met = json.loads((out / "metrics.json").read_text())
    assert met["images"] == 8 and met["method"] == "lrp" and np.isfinite(met["aopc_morf"])
    assert {p["part"] for p in met["parts"]} >= {"eyes", "nose", "mouth"}
    with h5py.File(out / "maps.h5") as f:
        assert f["maps"].shape == (8, 64, 64) and f["curves/morf"].shape == (8, 5)
        assert len(f["index"][:]) == 8 and "mean" in f
    # the same output again without --overwrite is refused
    r2 = run_facetool("dissect", "relevance", "--model", clf, "--store", synthetic_store, "--out", out, "--limit", 2)
    assert r2.returncode == 2 and "--overwrite" in r2.stderr


def test_cli_cosine_gradcam_and_errors(synthetic_store, checkpoints, tmp_path, cli):
    clf, emb = checkpoints
    out = tmp_path / "cos"
    r = run_facetool("dissect", "relevance", "--model", emb, "--store", synthetic_store, "--out", out,
                     "--method", "gradcam", "--target", "cosine", "--reference", "same-identity", "--limit", 4,
                     "--steps", 2)
    assert r.returncode == 0, r.stderr
    met = json.loads((out / "metrics.json").read_text())
    assert met["score"] == "cosine" and met["images"] == 4
    with h5py.File(out / "maps.h5") as f:
        ref, idx = f["reference_index"][:], f["index"][:]
    from facetool.store import FaceStore

    with FaceStore(synthetic_store) as s:
        assert (s.labels[ref] == s.labels[idx]).all() and (ref != idx).all()
    bad_pairs = tmp_path / "pairs.txt"
    bad_pairs.write_text("0 x\n")
    r = run_facetool("dissect", "relevance", "--store", synthetic_store, "--out", tmp_path / "x", "--model", emb,
                     "--target", "label")
    assert r.returncode == 2 and "class head" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for args, msg in [
        (("--model", emb, "--target", "label"), "class head"),
        (("--model", emb, "--target", "cosine"), "--reference"),
        (("--model", emb, "--target", "cosine", "--reference", bad_pairs), "two store indices"),
        (("--model", clf, "--target", "cosine", "--reference", "self"), "embedding model"),
        (("--model", clf, "--method", "attention"), "attention"),
        (("--model", clf, "--method", "deeplift"), "unknown --method"),
        (("--model", tmp_path / "missing.pt"), "not found"),
    ]:
        r = cli("dissect", "relevance", "--store", synthetic_store, "--out", tmp_path / "x", "--limit", 2, *args)
        assert r.exit_code == 2, (args, r.output)
        assert msg in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / "x" / "metrics.json").exists()


def test_generalisation_recipe_steps_parse_as_facetool_commands():
    """Every step of recipes/relevance_generalisation.toml names an existing command with valid options."""
    from pathlib import Path

    import typer

    from facetool.cli import app
    from facetool.recipe import load_recipe

    _, steps = load_recipe(Path(__file__).parents[1] / "recipes" / "relevance_generalisation.toml")
    root = typer.main.get_command(app)
    used = []
    for step in steps:
        cmd, args, path = root, list(step.argv), []
        while hasattr(cmd, "get_command"):
            sub = cmd.get_command(cmd.context_class(cmd), args[0])
            assert sub is not None, f"step {step.name!r}: no command {' '.join(path + args[:1])}"
            path.append(args.pop(0))
            cmd = sub
        cmd.make_context(" ".join(path), args)  # raises on unknown options / bad values
        used.append(" ".join(path))
    assert used.count("train resnet") == 6 and used.count("dissect relevance") == 5
    assert "dissect generalisation" in used


def test_mask_by_map_replaces_the_most_relevant_patches():
    from facetool.explainers.relevance import mask_by_map

    x = torch.zeros(1, 3, 8, 8)
    maps = torch.zeros(1, 8, 8)
    maps[0, 4:, 4:] = 1.0  # the bottom-right 4x4 patch is the most relevant
    maps[0, :4, 4:] = 0.5
    xm = mask_by_map(x, maps, 0.25, 4, "black")  # 1 of 4 patches
    assert (xm[0, :, 4:, 4:] == -1).all() and (xm[0, :, :4] == 0).all() and (xm[0, :, :, :4] == 0).all()
    xm2 = mask_by_map(x, maps, 0.5, 4, "black")
    assert (xm2[0, :, :, 4:] == -1).all() and (xm2[0, :, :, :4] == 0).all()


def test_init_from_checkpoint_copies_matching_weights(tmp_path):
    from facetool.trainers.classify import init_from_checkpoint
    from facetool.models.checkpoint import save_checkpoint

    src = _clf(1)
    p = save_checkpoint(tmp_path / "src.pt", src)
    torch.manual_seed(2)
    dst = create_model("resnet18", width=8, num_classes=2, input_size=64)  # another head
    copied, left = init_from_checkpoint(dst, p)
    assert torch.equal(dst.conv1.weight, src.conv1.weight) and torch.equal(dst.layer4[1].bn2.running_var, src.layer4[1].bn2.running_var)
    assert dst.fc.weight.shape == (2, 64) and left == 2  # fc.weight, fc.bias stay
    with pytest.raises(FacetoolError, match="tensors fit this model"):
        init_from_checkpoint(create_model("mobilefacenet", embedding_size=16, input_size=64), p)


def test_generalisation_matrix_cells(synthetic_store, checkpoints, tmp_path, cli):
    from facetool.explainers.relevance import load_images, mask_by_map
    from facetool.explainers.relevance.generalisation import _accuracy
    from facetool.models.checkpoint import load_model, save_checkpoint
    from facetool.store import FaceStore

    clf, emb = checkpoints
    torch.manual_seed(3)
    g = create_model("resnet18", width=8, num_classes=2, input_size=48)
    g.config["task"] = {"kind": "attribute", "names": ["gender"], "classes": [2], "vocab": [["female", "male"]]}
    gp = save_checkpoint(tmp_path / "gender.pt", g.eval())
    out = tmp_path / "gen"
    r = cli("dissect", "generalisation", "--models", f"{clf},{gp}", "--store", synthetic_store, "--out", out,
            "--limit", 6, "--fraction", 0.25, "--method", "gradcam")
    assert r.exit_code == 0, r.output
    res = json.loads((out / "matrix.json").read_text())
    assert res["targets"] == ["label", "attribute:gender"] and set(res["drop"]) == {"clf", "gender", "random"}
    assert (out / "matrix.png").stat().st_size > 0 and "masked_by" in (out / "matrix.csv").read_text()
    # the random row recomputed by hand for the gender model
    with FaceStore(synthetic_store) as s:
        rows = s.indices("test")[:6]
        y = torch.as_tensor(s.attribute("gender")[0][rows])
    m = load_model(gp)
    x = load_images(synthetic_store, rows, 48)
    rnd = torch.rand(6, 64, 64, generator=torch.Generator().manual_seed(0))
    want = _accuracy(m, x, y, slice(0, 2)) - _accuracy(m, mask_by_map(x, rnd, 0.25, 6, "mean"), y, slice(0, 2))
    assert res["drop"]["random"]["gender"] == pytest.approx(want)
    r = cli("dissect", "generalisation", "--models", f"{clf},{emb}", "--store", synthetic_store, "--out", tmp_path / "g2")
    assert r.exit_code == 2 and "embedding model" in r.output


def test_attention_method_reads_the_abn_map_of_the_explained_attribute(synthetic_store, tmp_path, cli):
    from facetool.explainers.attention import upsample_maps
    from facetool.explainers.relevance import resolve
    from facetool.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    m = create_model("abn_resnet18", num_classes=5, heads=[2, 3], width=8, input_size=64).eval()
    m.config["task"] = {"kind": "attributes", "names": ["gender", "skin"], "classes": [2, 3],
                        "vocab": [["female", "male"], ["light", "medium", "dark"]]}
    x = torch.randn(2, 3, 64, 64)
    what = resolve(m, x, Target.parse("attribute:skin"), attr_codes=torch.tensor([0, -1]))
    assert what.head == 1 and what.sl == slice(2, 5) and what.classes[0] == 0
    maps = explain(m, x, "attention", what)
    with torch.no_grad():
        _, internals = m(x, return_internals=True)
    want = upsample_maps(internals["attention"][:, 1:2], (64, 64), stride=m.attention_stride)[:, 0]
    np.testing.assert_allclose(maps, want.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(FacetoolError, match="cannot canonize"):
        explain(m, x, "lrp", what)
    p = save_checkpoint(tmp_path / "abn.pt", m)
    r = cli("dissect", "relevance", "--model", p, "--store", synthetic_store, "--out", tmp_path / "att",
            "--method", "attention", "--target", "attribute:gender", "--limit", 4, "--steps", 2)
    assert r.exit_code == 0, r.output
    met = json.loads((tmp_path / "att" / "metrics.json").read_text())
    assert met["method"] == "attention" and met["target"] == "attribute:gender" and np.isfinite(met["aopc_morf"])


def test_cli_image_reference_and_empty_split(synthetic_store, checkpoints, tmp_path, cli):
    import cv2

    from facetool.store import FaceStore, Record, StoreWriter

    _, emb = checkpoints
    with FaceStore(synthetic_store) as s:
        img = s.images([0])[0]
    ref = tmp_path / "ref.png"
    cv2.imwrite(str(ref), img[:, :, ::-1])
    r = cli("dissect", "relevance", "--model", emb, "--store", synthetic_store, "--out", tmp_path / "img",
            "--method", "lrp", "--target", "cosine", "--reference", ref, "--limit", 3, "--steps", 2)
    assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "img" / "maps.h5") as f:
        assert f["maps"].shape == (3, 64, 64) and f.attrs["reference"] == str(ref)
    w = StoreWriter(tmp_path / "train_only.h5", image_size=(32, 32), identities=["a"])
    w.append(Record(np.zeros((32, 32, 3), np.uint8), 0, split=0, source="a.png"))
    w.finalize()
    r = cli("dissect", "relevance", "--model", emb, "--store", tmp_path / "train_only.h5", "--out", tmp_path / "e",
            "--target", "cosine", "--reference", "self")
    assert r.exit_code == 2 and "split" in r.output and "empty" in r.output
    r = cli("dissect", "relevance", "--model", emb, "--store", synthetic_store, "--out", tmp_path / "e",
            "--target", "cosine", "--reference", tmp_path / "nope.png")
    assert r.exit_code == 2 and "nope.png" in r.output


def test_gradcam_maps_are_placed_on_receptive_field_centres(checkpoints):
    """Grad-CAM by hand (ReLU of the gradient-weighted channel sum at the cam_layer, min-max normalised)
    at the layer's resolution, upsampled with cell j on pixel s*j, equals ``explain(..., "gradcam")``;
    pytorch-grad-cam's own cv2.resize would put cell j on s*(j + 0.5) - 0.5 (half a cell off)."""
    from facetool.explainers.placement import upsample_maps
    from facetool.explainers.relevance import resolve
    from facetool.models.checkpoint import load_model

    clf, _ = checkpoints
    m = load_model(clf).eval()
    torch.manual_seed(1)
    x = torch.randn(3, 3, 64, 64)
    what = resolve(m, x, Target.parse("predicted"))
    maps = explain(m, x, "gradcam", what)
    layer = m.get_layer(m.cam_layer)
    acts = {}
    h = layer.register_forward_hook(lambda mod, i, o: acts.__setitem__("a", o))
    try:
        out = m(x)
        a = acts["a"]
        score = out.gather(1, what.classes[:, None]).sum()
        g, = torch.autograd.grad(score, a)
    finally:
        h.remove()
    cam = torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1)).detach()  # (B, h, w)
    cam = cam - cam.amin((1, 2), keepdim=True)
    cam = cam / (1e-7 + cam.amax((1, 2), keepdim=True))
    assert cam.shape[-1] < 64  # a real down-sampled layer
    want = upsample_maps(cam[:, None], (64, 64))[:, 0]
    np.testing.assert_allclose(maps, want.numpy(), atol=2e-4)


# -- issue 17 -----------------------------------------------------------------------------------------
def test_cli_bad_grid_and_every_option_are_refused_before_any_work(synthetic_store, checkpoints, tmp_path,
                                                                   monkeypatch):
    """I10: --grid 0 failed with 'internal error' after every map was computed; now one line, exit 2,
    nothing written, and the library refuses every bad option before loading the model."""
    clf, _ = checkpoints
    out = tmp_path / "g0"
    r = run_facetool("dissect", "relevance", "--model", clf, "--store", synthetic_store, "--out", out, "--grid", "0",
                     "--limit", "2", "--steps", "1")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "--grid" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr and not out.exists()
    import facetool.models.checkpoint as ckpt
    from facetool.explainers.relevance import dissect_relevance

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(ckpt, "load_model", no_work)
    for opt, kw in [("--grid", {"grid": 0}), ("--steps", {"steps": 0}), ("--max-fraction", {"max_fraction": math.nan}),
                    ("--max-fraction", {"max_fraction": 1.5}), ("--patch", {"patch": 0}), ("--limit", {"limit": 0}),
                    ("--batch-size", {"batch_size": -1}), ("--fill", {"fill": "grey"}),
                    ("--device", {"device": "tpu"})]:
        with pytest.raises(FacetoolError, match=opt):
            dissect_relevance(clf, synthetic_store, out, **kw)
    assert not out.exists()


def test_cli_reference_without_target_cosine_is_refused(synthetic_store, checkpoints, tmp_path):
    """--reference was silently ignored without --target cosine."""
    clf, _ = checkpoints
    out = tmp_path / "ref"
    r = run_facetool("dissect", "relevance", "--model", clf, "--store", synthetic_store, "--out", out,
                     "--reference", "self", "--limit", "2", "--steps", "1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: --reference applies only to --target cosine") and not out.exists()


def test_cli_scorecam_leaks_no_progress_bar(synthetic_store, checkpoints, tmp_path):
    """pytorch-grad-cam's ScoreCAM drew a tqdm bar per image on stderr."""
    import pytorch_grad_cam.score_cam as sc
    import tqdm

    clf, _ = checkpoints
    out = tmp_path / "sc"
    r = run_facetool("dissect", "relevance", "--model", clf, "--store", synthetic_store, "--out", out,
                     "--method", "scorecam", "--limit", "2", "--steps", "1", "--grid", "2")
    assert r.returncode == 0, r.stderr
    assert "it/s" not in r.stderr and "%|" not in r.stderr and "\r" not in r.stderr, r.stderr
    assert all(ln.startswith("note: ") for ln in r.stderr.strip().splitlines()), r.stderr
    assert sc.tqdm is tqdm  # the library's own module is put back after each map


def test_cli_gradcam_on_a_2x2_cam_layer_says_so(synthetic_store, checkpoints, tmp_path):
    """Grad-CAM on a 64-px ResNet's 2x2 layer4 gave meaningless maps without a word: one note line on
    stderr names the resolution and what to do; a 128-px model (4x4) and LRP get none."""
    clf, _ = checkpoints
    out = tmp_path / "gc"
    r = run_facetool("dissect", "relevance", "--model", clf, "--store", synthetic_store, "--out", out,
                     "--method", "gradcam", "--limit", "2", "--steps", "1", "--grid", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: gradcam maps of clf.pt come from a 2x2 map"), r.stderr
    assert "--input-size 128" in lines[0] and "--method lrp" in lines[0]
    assert json.loads((out / "metrics.json").read_text())["notes"] == [lines[0][len("note: "):]]
    from facetool.explainers.relevance.maps import cam_notes

    torch.manual_seed(0)
    big = create_model("resnet18", width=8, num_classes=5, input_size=128).eval()
    assert cam_notes(big, "gradcam", 128) == [] and cam_notes(_clf(), "lrp", 64) == []


def test_arch_and_device_on_relevance_and_generalisation(synthetic_store, checkpoints, tmp_path, cli):
    """--arch and --device were missing on `dissect relevance|generalisation` (the README promises --arch
    on every command with --model); both are checked before any work."""
    clf, _ = checkpoints
    out = tmp_path / "o"
    for cmd in (["dissect", "relevance", "--model", clf], ["dissect", "generalisation", "--models", f"{clf},{clf}"]):
        args = [*cmd, "--store", synthetic_store, "--out", out, "--limit", 2]
        r = cli(*args, "--arch", "iresnet34")
        assert r.exit_code == 2 and "resnet18; --arch iresnet34 contradicts it" in r.output, r.output
        r = cli(*args, "--device", "tpu")
        assert r.exit_code == 2 and "--device 'tpu' is not a device; use auto, cpu" in r.output, r.output
        assert not out.exists()
    r = cli("dissect", "relevance", "--model", clf, "--store", synthetic_store, "--out", out, "--limit", 2,
            "--steps", 1, "--grid", 2, "--arch", "resnet18", "--device", "cpu")
    assert r.exit_code == 0, r.output
