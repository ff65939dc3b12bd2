"""IR-ResNet canonizers (arcface_torch's pre-BN blocks ``bn1 -> conv1 -> bn2 -> prelu -> conv2 -> bn3``).

``bn1`` precedes the conv, so it is merged *to the right* into a temporary conv (weights ``W * a``,
interior bias ``sum W * b``) together with ``bn2`` on the left; the conv's zero padding pads ``bn1``'s
output, not its input, so the border difference of the shift is added back as a constant map (no
relevance). The head's ``bn2`` (BN2d before the flatten) is merged to the right into ``fc`` and the
``features`` BN1d to the left (a temporary Linear); ``conv2``/``bn3``, the stem and the projections are
ordinary merges; residual sums are ``Sum`` modules; PReLU is an activation (pass rule).

A block may have grouped 3x3 convolutions and a 1x1 ``project`` convolution between ``conv2`` and ``bn3``
(then ``project``/``bn3`` is the merged pair): the static form of a CondFace DGConv block, which
:mod:`facetool.explainers.lrp.condface` canonizes with per-sample kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facetool.explainers.lrp.parts import attribute_canonizer, bn_scale_shift, new_sum, pair_merge_canonizer
from facetool.explainers.lrp.registry import register_canonizer
from facetool.models.iresnet import IBasicBlock, IResNet


def interior_shift(weight: Tensor, shift: Tensor, groups: int = 1) -> Tensor:
    """What a conv adds to each output channel for a constant per-channel ``shift`` of its input, away from
    the borders: ``sum W * shift`` over each output channel's input channels (its group's). ``weight`` is
    (..., out, in/groups, k, k) (leading dimensions, e.g. per-sample kernels, are kept)."""
    out, cg = weight.shape[-4], weight.shape[-3]
    w = weight.reshape(*weight.shape[:-4], groups, out // groups, cg, *weight.shape[-2:])
    s = shift.reshape(groups, 1, cg, 1, 1).to(weight)
    return (w * s).sum((-3, -2, -1)).reshape(*weight.shape[:-4], out)


def scale_inputs(weight: Tensor, scale: Tensor, groups: int = 1) -> Tensor:
    """``weight`` (..., out, in/groups, k, k) with each input channel multiplied by ``scale`` (in,): a
    per-channel scaling of the conv's input moved into the kernel."""
    out, cg = weight.shape[-4], weight.shape[-3]
    w = weight.reshape(*weight.shape[:-4], groups, out // groups, cg, *weight.shape[-2:])
    return (w * scale.reshape(groups, 1, cg, 1, 1).to(weight)).reshape(weight.shape)


class _BorderShift(nn.Module):
    """Constant map added after a right-merged conv: what the shift of the BN before the conv adds at
    the borders minus its interior value (the conv pads the BN's *output* with zeros). Not a linear
    layer for zennit (no parameters, no rule; the gradient passes through the addition)."""

    def __init__(self, conv: nn.Conv2d, shift: Tensor, out_scale: Tensor) -> None:
        super().__init__()
        self.weight = conv.weight.detach()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.shift = shift
        self.out_scale = out_scale
        self._cache: dict = {}

    def interior(self) -> Tensor:
        return interior_shift(self.weight, self.shift, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        key = (tuple(x.shape[2:]), x.dtype, x.device)
        if key not in self._cache:
            with torch.no_grad():
                bmap = self.shift.view(1, -1, 1, 1).expand(1, x.shape[1], *x.shape[2:]).to(x)
                full = F.conv2d(bmap, self.weight.to(x), None, self.stride, self.padding, self.dilation, self.groups)
                self._cache[key] = ((full - self.interior().to(x).view(1, -1, 1, 1)) * self.out_scale.to(x).view(1, -1, 1, 1))
        return self._cache[key]


def _merged_conv1(block: nn.Module) -> tuple[nn.Conv2d, _BorderShift]:
    """bn1 (right) + conv1 + bn2 (left) as one temporary conv and its border correction."""
    a1, b1 = bn_scale_shift(block.bn1)
    a2, b2 = bn_scale_shift(block.bn2)
    conv = block.conv1
    merged = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, conv.groups, bias=True).to(conv.weight)
    border = _BorderShift(conv, b1, a2)
    with torch.no_grad():
        w = scale_inputs(conv.weight, a1, conv.groups)
        merged.weight.copy_(w * a2.view(-1, 1, 1, 1))
        bias = border.interior() + (conv.bias if conv.bias is not None else 0.0)
        merged.bias.copy_(bias * a2 + b2)
    merged.requires_grad_(False)
    return merged, border


def _block_forward(self, x: Tensor) -> Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.canonizer_conv1(x) + self.canonizer_border(x)
    out = self.conv2(self.prelu(out))
    project = getattr(self, "project", None)
    out = self.bn3(out if project is None else project(out))
    return self.canonizer_sum(torch.stack([identity, out], dim=-1))


def _head_linear(model: nn.Module) -> nn.Linear:
    """head bn2 (BN2d, right, through the flatten) + fc + features BN1d (left) as one Linear."""
    a, b = bn_scale_shift(model.bn2)
    fc = model.fc
    c = a.numel()
    side = fc.in_features // c
    a_flat = a.repeat_interleave(side)
    b_flat = b.repeat_interleave(side)
    af, bf = bn_scale_shift(model.features)
    lin = nn.Linear(fc.in_features, fc.out_features, bias=True).to(fc.weight)
    with torch.no_grad():
        lin.weight.copy_(fc.weight * a_flat.view(1, -1) * af.view(-1, 1))
        bias = fc.weight @ b_flat + (fc.bias if fc.bias is not None else 0.0)
        lin.bias.copy_(bias * af + bf)
    lin.requires_grad_(False)
    return lin


def _forward_head(self, features: Tensor) -> Tensor:
    x = self.dropout(torch.flatten(features, 1))
    return self.canonizer_head(x.to(torch.promote_types(x.dtype, torch.float32)))  # float32 at least, as the model


def _attrs(name: str, module: nn.Module) -> dict | None:
    if isinstance(module, IBasicBlock):
        conv, border = _merged_conv1(module)
        return {"forward": _block_forward.__get__(module), "canonizer_sum": new_sum(),
                "canonizer_conv1": conv, "canonizer_border": border}
    if isinstance(module, IResNet):
        return {"forward_head": _forward_head.__get__(module), "canonizer_head": _head_linear(module)}
    return None


def _pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    pairs = [(model.conv1, model.bn1)]
    for m in model.modules():
        if isinstance(m, IBasicBlock):
            project = getattr(m, "project", None)
            pairs.append((m.conv2 if project is None else project, m.bn3))
            if m.downsample is not None:
                pairs.append((m.downsample[0], m.downsample[1]))
    return pairs


@register_canonizer(IResNet, name="iresnet", label="IR-ResNet", containers=(IBasicBlock,))
def iresnet_canonizers(model: nn.Module) -> list:
    # the temporary convs are built from the unmerged parameters, so build them first
    return [attribute_canonizer(_attrs), pair_merge_canonizer(_pairs)]
