"""LRP on CondFace models (facetool.explainers.lrp.condface): routing held, rules on each sample's aggregated
kernel as one grouped convolution over the batch.

Known answer: for every image the CondFace map equals zennit's map (its hooks, facetool's IR-ResNet
canonizer) on a static IR-ResNet-like copy whose dynamic convolutions are plain convolutions holding that
image's aggregated kernel (grouped for DGConv, with the 1x1 back), in float64, to 1e-5 relative
(measured: < 1e-11 on every composite, bias-free too; the router computes in float32 in any model, so the copy
holds the routing the LRP pass executed)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import SEED_BASE
from facetool.errors import FacetoolError
from facetool.explainers.lrp import check_canonizable, lrp, lrp_context
from facetool.models import create_model
from facetool.models.condface import DynamicBlock
from facetool.models.iresnet import IBasicBlock
from test_lrp import _explained
from test_lrp_onepass import METHODS, _close

KW = dict(embedding_size=16, width=8, input_size=32)
NAMES = ("condface_dc_ir18", "condface_ir18")


def _model(name: str, seed: int = 0) -> nn.Module:
    """A small random CondFace model with measured BN statistics and random BN affine parameters, its
    expert kernels spread so that the aggregated kernels differ clearly between images."""
    torch.manual_seed(seed)
    m = create_model(name, **KW)
    bns = [mod for mod in m.modules() if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d))]
    with torch.no_grad():
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            if bn.weight.requires_grad:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.3, 0.3)
        for blk in m.routing_blocks():  # routing far from uniform
            blk.router.fc2.weight.mul_(20.0)
        m.train()
        m(torch.randn(16, 3, KW["input_size"], KW["input_size"]))
        for bn in bns:
            bn.momentum = 0.1
    return m.eval()


class _StaticGroupBlock(IBasicBlock):
    """IR block with grouped 3x3 convolutions and a 1x1 ``project`` before bn3: a DGConv block with its
    kernels fixed."""

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.bn3(self.project(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))) + identity


def _plain(layer: nn.Module, alpha: torch.Tensor) -> nn.Conv2d:
    """A plain Conv2d holding the dynamic layer's kernel aggregated with ``alpha`` (1, m*n)."""
    g = layer.groups * layer.groups_m
    conv = nn.Conv2d(layer.in_ch, layer.out_ch, layer.kernel_size, layer.stride, layer.padding, groups=g, bias=False,
                     dtype=layer.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(layer.aggregated_weight(alpha.reshape(1, layer.groups_m, layer.experts))[0])
    return conv


def _static_copy(m: nn.Module, alphas: list[torch.Tensor]) -> nn.Module:
    """An IResNet with ``m``'s stem, layer1, head, BNs, PReLUs and shortcuts, and in layer2..4 plain blocks
    whose convolutions hold one image's aggregated kernels (``alphas``: each block's (1, D) routing)."""
    s = create_model(f"iresnet{18}", **KW).to(next(m.parameters()))
    own = {k: v for k, v in m.state_dict().items() if not k.startswith(("layer2", "layer3", "layer4"))}
    s.load_state_dict(own, strict=False)
    blocks = iter(zip(m.routing_blocks(), alphas))
    for i in (2, 3, 4):
        layer = getattr(s, f"layer{i}")
        for j in range(len(layer)):
            d, alpha = next(blocks)
            blk = _StaticGroupBlock.__new__(_StaticGroupBlock) if d.project is not None else IBasicBlock.__new__(IBasicBlock)
            nn.Module.__init__(blk)
            blk.bn1, blk.conv1 = copy.deepcopy(d.bn1), _plain(d.conv1, alpha)
            blk.bn2, blk.prelu = copy.deepcopy(d.bn2), copy.deepcopy(d.prelu)
            blk.conv2 = _plain(d.conv2, alpha)
            if d.project is not None:
                blk.project = copy.deepcopy(d.project)
            blk.bn3, blk.downsample = copy.deepcopy(d.bn3), copy.deepcopy(d.downsample)
            layer[j] = blk
    return s.eval()


@pytest.mark.parametrize("name", NAMES)
def test_condface_map_equals_zennit_on_each_images_static_copy(name):
    """One batch through the dynamic model; per image, zennit on the static copy with that image's kernels.
    Rules as the composites apply them: z+, gamma, alpha-beta and epsilon on the dynamic convolutions
    (flat and z^B on the stem), with and without the bias-free rules."""
    m = _model(name, SEED_BASE).double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(SEED_BASE))
    assert check_canonizable(m) == "condface"
    for method in METHODS:
        for bias_free in (False, True):
            ours, out = lrp(m, x, _explained, method, bias_free=bias_free)
            # the routing this pass executed (held; the plain forward's to float32 rounding: the router is float32)
            routing = [b.routing for b in m.routing_blocks()]
            for b in range(len(x)):
                static = _static_copy(m, [r[b:b + 1] for r in routing])
                ref, out_ref = lrp(static, x[b:b + 1], _explained, method, bias_free=bias_free, engine="zennit")
                torch.testing.assert_close(out[b:b + 1], out_ref, rtol=1e-10, atol=1e-12)
                _close(ours[b:b + 1], ref)


@pytest.mark.parametrize("name", NAMES)
def test_held_routing_is_the_models_and_images_differ(name):
    """The routing used in the LRP pass is the model's own (to float32 rounding and zennit's merged-BN eps:
    measured 4e-5), the images really use different kernels (so the per-sample test above is not a
    shared-kernel test), and an image's map does not depend on the other images of the batch (the grouped
    convolution keeps samples apart)."""
    m = _model(name, SEED_BASE)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(SEED_BASE + 1))
    with torch.no_grad():
        _, internals = m(x, return_internals=True)
    beta = internals["routing"]
    assert beta.shape == (4, 24 if name == "condface_dc_ir18" else 96)
    assert (beta - beta[:1]).abs().max() > 0.1  # the images route differently
    rel, _ = lrp(m, x, _explained, "lrp")
    held = torch.cat([b.routing for b in m.routing_blocks()], 1)
    torch.testing.assert_close(held, beta, rtol=0, atol=1e-3)  # measured: < 1e-4 (float32, zennit's merged-BN eps)
    assert torch.isfinite(rel).all() and rel.abs().sum() > 0
    # relevance only through the kernels: the per-sample map is unchanged when another image joins the batch
    alone, _ = lrp(m, x[:1], _explained, "lrp")
    _close(alone, rel[:1], rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_condface_model_restored_after_lrp_also_on_error(name):
    m = _model(name)
    x = torch.randn(2, 3, 32, 32)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    types = {k: type(v) for k, v in m.named_modules()}
    with torch.no_grad():
        y0 = m(x)
    with pytest.raises(RuntimeError, match="boom"):
        with lrp_context(m, "lrp-gamma", x):
            m(x.clone().requires_grad_(True))
            raise RuntimeError("boom")
    for method in ("lrp", "lrp-gamma", "lrp-ab"):
        lrp(m, x, _explained, method)
    with torch.no_grad():
        assert torch.equal(m(x), y0)
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    assert {k: type(v) for k, v in m.named_modules()} == types
    assert all("forward" not in vars(mod) for mod in m.modules())
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())


def test_condface_with_an_unknown_module_is_refused():
    m = _model("condface_ir18")
    m.layer3[0].extra = nn.GELU()
    with pytest.raises(FacetoolError, match="GELU"):
        check_canonizable(m)
    assert isinstance(m.layer3[0], DynamicBlock)


def test_zennit_engine_is_refused_on_condface_with_one_line():
    """zennit's hooks fail on a kernel set per forward (an AttributeError inside zennit before): a FacetoolError."""
    m = _model("condface_dc_ir18")
    with pytest.raises(FacetoolError, match="zennit's hooks cannot explain a CondFace model"):
        lrp(m, torch.randn(1, 3, 32, 32), _explained, "lrp", engine="zennit")
