"""CondFace layers and models (thesis ch. 5): the batched dynamic convolutions against a per-sample
convolution with a hand-aggregated kernel, the routing vectors, FLOPs by hand, checkpoints and ONNX
export with a dynamic batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from facetool.errors import FacetoolError
from facetool.flops import count_flops
from facetool.models import FaceModel, create_model, load_model, save_checkpoint
from facetool.models.base import EMBEDDING
from facetool.models.dynamic import DynamicConv2d, DynamicGroupConv2d, set_routing_temperature


def _per_sample_dc(layer: DynamicConv2d, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Sample by sample: W_b = sum_i alpha[b, i] W_i (Eq. 5.2), then an ordinary convolution."""
    w = layer.weight[0]  # (n, out, in/groups, k, k)
    outs = []
    for b in range(x.shape[0]):
        wb = sum(alpha[b, i] * w[i] for i in range(layer.experts))
        bb = None if layer.bias is None else sum(alpha[b, i] * layer.bias[0, i] for i in range(layer.experts))
        outs.append(F.conv2d(x[b:b + 1], wb, bb, layer.stride, layer.padding, groups=layer.groups))
    return torch.cat(outs)


def _per_sample_dg(layer: DynamicGroupConv2d, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Sample by sample and group by group (Eq. 5.3): W^k = sum_i alpha[b, k, i] W_i^k, O = concat_k W^k x^k."""
    m, n = layer.groups_m, layer.experts
    xs = x.chunk(m, dim=1)
    outs = []
    for b in range(x.shape[0]):
        parts = []
        for k in range(m):
            wk = sum(alpha[b, k, i] * layer.weight[k, i] for i in range(n))
            parts.append(F.conv2d(xs[k][b:b + 1], wk, None, layer.stride, layer.padding))
        outs.append(torch.cat(parts, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("stride,padding,groups,bias", [(1, 1, 1, False), (2, 0, 2, True), (2, 1, 4, False)])
def test_dynamic_conv_batched_equals_per_sample(batch, stride, padding, groups, bias):
    torch.manual_seed(batch)
    layer = DynamicConv2d(8, 12, 3, stride, padding, experts=3, groups=groups, bias=bias)
    x = torch.randn(batch, 8, 9, 9)
    for mode in (layer.train, layer.eval):
        mode()
        y = layer(x)
        alpha = layer.routing
        assert alpha.shape == (batch, 3)
        assert torch.allclose(alpha.sum(1), torch.ones(batch))
        assert torch.allclose(y, _per_sample_dc(layer, x, alpha), atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3, 4])
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 0)])
def test_dynamic_group_conv_batched_equals_per_sample(batch, stride, padding):
    torch.manual_seed(batch)
    layer = DynamicGroupConv2d(8, 16, 3, stride, padding, groups_m=4, experts=4)
    x = torch.randn(batch, 8, 7, 7)
    y = layer(x)
    alpha = layer.routing.reshape(batch, 4, 4)
    assert torch.allclose(alpha.sum(-1), torch.ones(batch, 4))  # every group slice sums to 1
    assert torch.allclose(y, _per_sample_dg(layer, x, alpha), atol=1e-5)
    # routing from the caller (shared by a block), and the expert-sum form used for ONNX
    a = torch.softmax(torch.randn(batch, 4, 4), -1)
    ref = _per_sample_dg(layer, x, a)
    assert torch.allclose(layer(x, a), ref, atol=1e-5)
    assert torch.allclose(layer._expert_sum(x, a), ref, atol=1e-5)


def test_identical_experts_make_output_independent_of_alpha():
    torch.manual_seed(0)
    for layer in (DynamicConv2d(6, 8, 3, 1, 1, experts=4, groups=2, bias=True), DynamicGroupConv2d(8, 8, 3, 1, 1)):
        with torch.no_grad():
            layer.weight.copy_(layer.weight[:, :1].expand_as(layer.weight))
            if layer.bias is not None:
                layer.bias.copy_(layer.bias[:, :1].expand_as(layer.bias))
        x = torch.randn(3, layer.in_ch, 6, 6)
        shape = (3, layer.groups_m, layer.experts)
        a1, a2 = torch.softmax(torch.randn(shape), -1), torch.softmax(5 * torch.randn(shape), -1)
        assert not torch.allclose(a1, a2)
        y1, y2 = layer(x, a1), layer(x, a2)
        assert torch.allclose(y1, y2, atol=1e-5)
        single = F.conv2d(x, layer.weight[:, 0].flatten(0, 1), None if layer.bias is None else layer.bias[:, 0].flatten(),
                          layer.stride, layer.padding, groups=layer.groups * layer.groups_m)
        assert torch.allclose(y1, single, atol=1e-5)


def test_temperature_sharpens_routing():
    torch.manual_seed(0)
    layer = DynamicConv2d(8, 8, 3, padding=1, experts=4, temperature=1.0)
    x = torch.randn(4, 8, 5, 5)
    layer(x)
    soft = layer.routing.clone()
    layer.set_temperature(0.01)
    layer(x)
    assert layer.routing.max(1).values.min() > soft.max(1).values.max() - 1e-6
    assert torch.equal(layer.routing.argmax(1), soft.argmax(1))
    layer.set_temperature(1e4)
    layer(x)
    assert torch.allclose(layer.routing, torch.full((4, 4), 0.25), atol=1e-3)
    with pytest.raises(FacetoolError, match="temperature"):
        layer.set_temperature(0)


def test_layer_runs_under_autocast():
    layer = DynamicGroupConv2d(8, 8, 3, 1, 1)
    x = torch.randn(2, 8, 6, 6)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), ref, atol=0.1, rtol=0.05)
    assert torch.allclose(layer.routing.reshape(2, 4, 4).sum(-1), torch.ones(2, 4), atol=1e-3)


# -- the architectures --------------------------------------------------------------------------
@pytest.mark.parametrize("name,dim", [("condface_dc_ir18", 24), ("condface_ir18", 96)])
@pytest.mark.parametrize("size,width", [(112, 8), (64, 16)])
def test_models_report_routing(name, dim, size, width):
    torch.manual_seed(0)
    m = create_model(name, input_size=size, width=width, embedding_size=32)
    assert m.output_kind == EMBEDDING and "routing" in m.internal_names
    x = torch.randn(3, 3, size, size)
    y, internals = m(x, return_internals=True)
    assert y.shape == (3, 32) and internals["routing"].shape == (3, dim)
    groups = internals["routing"].reshape(3, -1, 4)  # every slice of 4 experts is one softmax
    assert torch.allclose(groups.sum(-1), torch.ones(3, dim // 4), atol=1e-5)
    m.eval()
    with torch.no_grad():  # a sample's output does not depend on the rest of its batch
        assert torch.allclose(m(x)[1:2], m(x[1:2]), atol=1e-4)


def test_model_temperature_and_bad_arguments():
    m = create_model("condface_ir18", input_size=64, width=8, embedding_size=16).eval()
    x = torch.randn(2, 3, 64, 64)
    m.set_temperature(1e4)
    _, i = m(x, return_internals=True)
    assert torch.allclose(i["routing"], torch.full((2, 96), 0.25), atol=1e-3)
    set_routing_temperature(m, 1e-3)  # the helper goes through the model's own set_temperature
    _, i = m(x, return_internals=True)
    assert i["routing"].max() > 0.9
    with pytest.raises(FacetoolError, match="temperature"):
        m.set_temperature(-1)
    with pytest.raises(FacetoolError, match="width"):
        create_model("condface_ir18", width=6)
    with pytest.raises(FacetoolError, match="input-size"):
        create_model("condface_dc_ir18", input_size=100)


class _OneLayer(FaceModel):
    """One DynamicConv2d 3 -> 4 (3x3, padding 1, 4 experts) on an 8x8 image."""

    output_kind = EMBEDDING

    def __init__(self) -> None:
        super().__init__()
        self.input_size = 8
        self.conv = DynamicConv2d(3, 4, 3, padding=1, experts=4)

    def forward_features(self, x, internals=None):
        return self.conv(x)

    def forward_head(self, f):
        return f.flatten(1)


def test_flops_count_routing_and_aggregation_by_hand():
    # conv: 4 outputs x 8*8 positions x 3*3*3 MACs; routing MLP on the pooled 1x1 map: 1x1 3 -> max(4, 0.75) = 4
    # (12 MACs), 1x1 4 -> 4 experts (16 MACs); aggregation: (1, 4) alpha @ (4, 4*3*3*3) experts (432 MACs)
    conv, mlp, agg = 4 * 64 * 27, 3 * 4 + 4 * 4, 4 * 108
    m = _OneLayer()
    assert count_flops(m) == 2 * (conv + mlp + agg)
    assert count_flops(m, batch=3) == 2 * (conv + mlp + agg)
    # the model counts more than its IR-ResNet twin: the routing MLPs and aggregations it adds
    cf = count_flops(create_model("condface_dc_ir18", input_size=64, width=8))
    assert cf > count_flops(create_model("iresnet18", input_size=64, width=8))


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = create_model("condface_ir18", input_size=64, width=8, embedding_size=16).eval()
    path = save_checkpoint(tmp_path / "cf.pt", m)
    back = load_model(path)
    assert type(back) is type(m) and back.config == m.config
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
    # a bare state_dict (no facetool config) is recognised as CondFace, not as its IR-ResNet twin
    for name, kw in (("condface_ir18", {"experts": 3}), ("condface_dc_ir18", {})):
        m = create_model(name, input_size=64, width=8, embedding_size=16, **kw).eval()
        torch.save(m.state_dict(), tmp_path / "bare.pt")
        back = load_model(tmp_path / "bare.pt")
        assert back.config == m.config
        with torch.no_grad():
            assert torch.equal(back(x), m(x))


@pytest.mark.parametrize("name", ["condface_dc_ir18", "condface_ir18"])
def test_onnx_export_with_dynamic_batch(name, tmp_path):
    """Grouped-by-batch convolutions freeze groups=B in ONNX (onnx#3843): the export uses the expert-sum
    form, and ONNX Runtime at batch 1 and 3 equals PyTorch."""
    from facetool.export import export_onnx
    from facetool.models.onnx_model import OnnxModel

    torch.manual_seed(0)
    m = create_model(name, input_size=64, width=8, embedding_size=16).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
    ckpt = save_checkpoint(tmp_path / "cf.pt", m)
    report = export_onnx(ckpt, tmp_path / "cf.onnx", dynamic_batch=True)
    assert report["dynamic_batch"] and report["output_size"] == 16
    onnx_model = OnnxModel(tmp_path / "cf.onnx", providers=["CPUExecutionProvider"])
    for b in (1, 3):
        x = torch.rand(b, 3, 64, 64) * 2 - 1
        with torch.no_grad():
            ref = m(x)
        got = onnx_model(x)
        assert got.shape == (b, 16)
        assert (got - ref).abs().max() / ref.abs().max() < 1e-4
        assert (F.normalize(got) - F.normalize(ref)).abs().max() < 1e-4


def test_routing_prior_reads_the_models_routing():
    """The inversion routing prior takes the (B, D) internal as one vector per image: the mean squared
    difference to the targets' routing (not a sum over the batch's rows)."""
    from facetool.explainers.invert.priors import RoutingPrior, reference_internals

    torch.manual_seed(0)
    m = create_model("condface_dc_ir18", input_size=64, width=8, embedding_size=16).eval()
    x, other = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    target = reference_internals(m, x)["routing"]
    prior = RoutingPrior(target, 1.0)
    prior.setup(m)
    with torch.no_grad():
        _, same = m(x, return_internals=True)
        _, diff = m(other, return_internals=True)
    assert float(prior(x, None, same)) == pytest.approx(0.0, abs=1e-10)
    assert float(prior(other, None, diff)) == pytest.approx(float(F.mse_loss(diff["routing"], target)), rel=1e-5)
