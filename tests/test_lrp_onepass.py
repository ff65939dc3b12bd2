"""One-pass LRP (facetool.explainers.lrp.onepass) against zennit's per-layer hooks, the reference.

Maps are compared in float64 (so the tolerance measures the rules, not float32 rounding): on every
architecture and composite they agree to 1e-5 relative
(measured: below 1e-14 everywhere; the sums are grouped differently in places)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import SEED_BASE
from facetool.explainers.lrp import lrp, lrp_context
from test_lrp import SMALL, _explained, _model

METHODS = ("lrp", "lrp-gamma", "lrp-ab", "lrp-epsilon")


def _close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """Every value within ``rtol`` of the reference, relative to the map's largest value."""
    assert ref.abs().max() > 0
    err = ((ours - ref).abs().amax((1, 2, 3)) / ref.abs().amax((1, 2, 3))).max().item()
    assert err < rtol, err


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("method", METHODS)
def test_onepass_equals_zennit_on_every_architecture(name, method):
    """ResNet, ConvNet-AIG (gates held), IR-ResNet (right merges, border maps), MobileFaceNet; with and
    without the bias-free rules."""
    seed = SEED_BASE
    m = _model(name, seed=seed).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    for bias_free in (False, True):
        ours, out = lrp(m, x, _explained, method, bias_free=bias_free)
        ref, out_ref = lrp(m, x, _explained, method, bias_free=bias_free, engine="zennit")
        assert torch.equal(out, out_ref)
        _close(ours, ref)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_onepass_equals_zennit_resnet_canonizer_on_torchvision(arch):
    """torchvision ResNets: facetool's one pass against zennit's own ResNetCanonizer + EpsilonPlusFlat."""
    torchvision = pytest.importorskip("torchvision")
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer

    torch.manual_seed(0)
    m = getattr(torchvision.models, arch)(num_classes=7)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
    m = m.double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    onehot = torch.zeros(2, 7, dtype=torch.float64)
    onehot[:, 3] = 1.0
    with Gradient(m, EpsilonPlusFlat(canonizers=[ResNetCanonizer()])) as attributor:
        _, ref = attributor(x, onehot)
    ours, _ = lrp(m, x, lambda out: onehot, "lrp")
    _close(ours, ref)
    assert all(type(mod).__name__ != "Sum" for mod in m.modules())


@pytest.mark.parametrize("engine, expect_recomputation", [("onepass", False), ("zennit", True)])
def test_backward_recomputes_no_layer(monkeypatch, engine, expect_recomputation):
    """The one pass runs no convolution forward during the backward (zennit's hooks rerun every
    rule-bearing conv there: the same count is > 0 for it) and attaches no hook."""
    m = _model("resnet18")
    x = torch.randn(2, 3, 64, 64)
    calls = []
    conv2d = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: calls.append(1) or conv2d(*a, **k))
    xx = x.clone().requires_grad_(True)
    with lrp_context(m, "lrp", xx, engine=engine):
        hooks = sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) + len(mod._backward_hooks)
                    for mod in m.modules())
        out = m(xx)
        in_forward = len(calls)
        torch.autograd.grad(out, xx, _explained(out.detach()))
    in_backward = len(calls) - in_forward
    assert in_forward > 0
    assert (in_backward > 0) == expect_recomputation, in_backward
    assert (hooks > 0) == expect_recomputation


@pytest.mark.parametrize("name", list(SMALL))
def test_model_restored_after_onepass_also_on_error(name):
    """Parameters, module types and forwards are the model's own again after the block, also after an
    exception inside it; outputs bit-identical."""
    m = _model(name)
    x = torch.randn(2, 3, 64, 64)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    types = {k: type(v) for k, v in m.named_modules()}
    with torch.no_grad():
        y0 = m(x)
    with pytest.raises(RuntimeError, match="boom"):
        with lrp_context(m, "lrp-gamma", x):
            m(x.clone().requires_grad_(True))
            raise RuntimeError("boom")
    lrp(m, x, _explained, "lrp")
    with torch.no_grad():
        assert torch.equal(m(x), y0)
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    assert {k: type(v) for k, v in m.named_modules()} == types
    assert all("forward" not in vars(mod) for mod in m.modules())


@pytest.mark.parametrize("name", ["resnet18", "iresnet18"])
def test_relevance_maps_unchanged_in_float32(name):
    """What `dissect relevance` computes (float32, ``explain``'s maps summed over colour) is zennit's to
    1e-5 relative (measured: < 5e-7)."""
    from facetool.explainers.relevance import Explained, explain

    m = _model(name)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = m(x)
    what = Explained(refs=torch.randn_like(out)) if name == "iresnet18" else Explained(classes=out.argmax(1))
    for method in ("lrp", "lrp-gamma", "lrp-ab"):
        maps = torch.from_numpy(explain(m, x, method, what))[:, None]
        ref, _ = lrp(m, x, what.lrp_output, method, engine="zennit")
        _close(maps, ref.sum(1, keepdim=True))
