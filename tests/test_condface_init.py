"""`train condface --init CHECKPOINT` (issue 18): a CondFace model started from a CondFace checkpoint of the same
architecture (every weight) or from a BL IR-ResNet (DC: every expert = the BL kernel, so the BL function exactly;
DGConv: the BL kernels' input-group slices, an approximation), and one-line refusals of checkpoints that do not fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import run_facetool

from facetool.errors import FacetoolError
from facetool.io import torch_save
from facetool.models import create_model
from facetool.models.dynamic import dynamic_layers
from facetool.trainers.condface import init_condface

GEOM = dict(width=8, input_size=32, embedding_size=16)


def _bl(path, seed: int = 0, **kw):
    """A BL IR-18 whose BatchNorms and PReLUs are not at their initial values (so that copying them matters)."""
    torch.manual_seed(seed)
    bl = create_model("iresnet18", **{**GEOM, **kw})
    for m in bl.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
        elif isinstance(m, torch.nn.PReLU):
            m.weight.data.uniform_(0.1, 0.4)
    torch_save(bl.state_dict(), path)
    return bl.eval()


@pytest.fixture
def x():
    return torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_dc_from_bl_computes_the_bl_embedding_exactly_whatever_the_routing(tmp_path, x):
    bl = _bl(tmp_path / "bl.pth")
    cf = create_model("condface_dc_ir18", **GEOM)
    assert init_condface(cf, tmp_path / "bl.pth") == "bl"
    cf.eval()
    with torch.no_grad():
        want = bl(x)
        got, internals = cf(x, return_internals=True)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for b in cf.routing_blocks():  # another routing: still the BL (identical experts)
            torch.nn.init.normal_(b.router.fc2.weight, 0, 3.0)
        assert not torch.allclose(cf(x, return_internals=True)[1]["routing"], internals["routing"], atol=1e-3)
        torch.testing.assert_close(cf(x), want, atol=1e-5, rtol=1e-5)


def test_dgconv_from_bl_copies_the_shared_parts_and_approximates_the_bl(tmp_path, x):
    """Not exact (grouped convolutions cannot mix the groups before the PReLU): what holds is that the stem and
    layer1 are the BL's exactly, every expert of a group is the same (the routing does not matter at step 0),
    group k's kernels come from the BL kernel's input-channel slice k, and the embedding is much nearer the
    BL's than a fresh model's (measured: cosine 0.51 vs 0.24 here)."""
    bl = _bl(tmp_path / "bl.pth")
    fresh = create_model("condface_ir18", **GEOM).eval()
    cf = create_model("condface_ir18", **GEOM)
    init_condface(cf, tmp_path / "bl.pth")
    cf.eval()
    sd, own = bl.state_dict(), cf.state_dict()
    for k in ("conv1.weight", "layer1.1.conv2.weight", "layer3.0.bn1.running_var", "layer4.1.bn3.weight",
              "layer2.0.downsample.0.weight", "fc.weight", "features.running_mean"):
        assert torch.equal(own[k], sd[k]), k
    for layer in dynamic_layers(cf):
        w = layer.weight
        assert torch.equal(w, w[:, :1].expand_as(w)), "experts of a group differ"
    w1, m = sd["layer3.1.conv1.weight"], cf.layer3[1].conv1.weight  # (32, 32, 3, 3) -> (4, 4, 16, 8, 3, 3)
    for g in range(4):  # slot j of group g: BL mid channel (16 g + j) mod 32 from input slice g, scaled by m/r = 2
        rows = [(16 * g + j) % 32 for j in range(16)]
        torch.testing.assert_close(m[g, 0], 2 * w1[rows, 8 * g:8 * (g + 1)])
    with torch.no_grad():
        want = bl(x)
        near = F.cosine_similarity(cf(x), want).mean()
        far = F.cosine_similarity(fresh(x), want).mean()
        for b in cf.routing_blocks():
            torch.nn.init.normal_(b.router.fc2.weight, 0, 3.0)
        torch.testing.assert_close(cf(x), cf(x.clone()))
    assert near > far + 0.15, (float(near), float(far))


def test_condface_from_condface_copies_every_weight(tmp_path, x):
    src = create_model("condface_ir18", **GEOM)
    torch_save(src.state_dict(), tmp_path / "cf.pth")
    dst = create_model("condface_ir18", **GEOM)
    assert init_condface(dst, tmp_path / "cf.pth") == "condface"
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


@pytest.mark.parametrize("what, kw, fits", [
    ("iresnet18", dict(width=16), "--network r18 --width 16"),
    ("iresnet34", {}, "--network r34 --width 8"),
    ("condface_dc_ir18", {}, "--variant dc --network r18"),
    ("condface_ir18", dict(input_size=48), "--input-size 48"),
])
def test_a_checkpoint_that_does_not_fit_names_what_fits(tmp_path, what, kw, fits):
    torch_save(create_model(what, **{**GEOM, **kw}).state_dict(), tmp_path / "m.pth")
    with pytest.raises(FacetoolError, match=fits.replace("-", r"\-")) as e:
        init_condface(create_model("condface_ir18", **GEOM), tmp_path / "m.pth")
    assert "this run builds --variant dgconv --network r18 --width 8" in str(e.value)


TINY = ["--width", "8", "--input-size", "32", "--embedding-size", "16", "--epochs", "1", "--max-steps", "2",
        "--batch-size", "8"]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from facetool.data.synthetic import prepare_synthetic

    path, _ = prepare_synthetic(tmp_path_factory.mktemp("cfi") / "s.h5", identities=4, per_identity=6, size=32, seed=0)
    return path


def test_cli_trains_condface_from_a_bl_that_train_arcface_wrote(tiny_store, tmp_path):
    r = run_facetool("train", "arcface", "--store", tiny_store, "--out", tmp_path / "bl", "--network", "r18",
                     "--loss", "cosface", *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    bl = tmp_path / "bl" / "model.pt"
    r = run_facetool("train", "condface", "--store", tiny_store, "--out", tmp_path / "cf", "--variant", "dc",
                     "--init", bl, "--clustering", "kmeans", "--prototypes", "3", *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "every expert is the BL kernel" in r.stderr
    r = run_facetool("train", "condface", "--store", tiny_store, "--out", tmp_path / "cf2", "--variant", "dc",
                     "--init", tmp_path / "cf" / "model.pt", *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # another width: one line, exit 2, naming what fits
    r = run_facetool("train", "condface", "--store", tiny_store, "--out", tmp_path / "cf3", "--init", bl,
                     *TINY[:1], "16", *TINY[2:], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--width 8" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # guard_output knows --init: a run folder that holds the checkpoint is not overwritten
    r = run_facetool("train", "condface", "--store", tiny_store, "--out", tmp_path / "bl", "--overwrite",
                     "--variant", "dc", "--init", bl, *TINY, cwd=tmp_path)
    assert r.returncode == 2 and bl.exists(), r.stderr
