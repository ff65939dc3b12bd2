"""CondFace canonizers (:mod:`facetool.models.condface`): IR-ResNets whose blocks in ``layer2..4`` convolve
each image with its own kernel, ``W_b = sum_i alpha_bi W_i``, mixed from expert kernels by a routing network
(``DynamicConv2d``; ``DynamicGroupConv2d``: per input-channel group, then a 1x1 ``project`` back).

**The routing is held fixed.** In the canonical block the routing weights ``alpha = softmax(MLP(GAP(bn1(x))) / T)``
are computed without gradient, as ConvNet-AIG's gates are held at the executed decisions
(:mod:`facetool.explainers.lrp.resnet`): relevance flows through each image's aggregated kernel and none into
the routing network. This is how LRP treats multiplicative gating in general (the gate is a weight of the
signal path, the signal takes all relevance: Arras et al. 2017 for LSTM gates), and it makes the map of an
image the LRP map of the static IR-ResNet that executed on it -- the same blocks with plain convolutions
holding that image's kernels (``tests/test_lrp_condface.py`` checks exactly that against zennit). The
routing's own dependence on the image (which kernels were chosen) is not attributed by these maps; the
routing vectors are in ``internals["routing"]`` and ``facetool dissect routing`` for that.

**Per-sample kernels as one grouped convolution.** Each dynamic convolution becomes a temporary
:class:`SampleConv`: an ``nn.Conv2d`` whose kernel (B*out, in/g, k, k) and bias (B*out) are set at every
forward, applied to the input viewed as (1, B*C, H, W) with ``groups = B*g`` -- the layer's own batched form.
So the one-pass rules (:mod:`facetool.explainers.lrp.onepass`) apply to it unchanged (epsilon, z+, flat,
gamma, alpha-beta, z^B: element-wise on the per-sample kernel and bias), and their backward is the transposed
grouped convolution over the batch (``conv2d_input`` with ``groups = B*g``): no loop over samples. zennit's
hooks cannot run such a layer (``engine="zennit"`` is refused); the reference is the static copy.

The merges are IR-ResNet's (:mod:`facetool.explainers.lrp.iresnet`), done per sample at each forward:
``bn1`` right-merged into ``conv1``'s kernel with ``bn2`` on the left (its border correction is linear in the
kernel: ``sum_i alpha_i`` of per-expert constant maps, cached per input size), ``conv2`` merged with ``bn3``
(DC), or ``project`` with ``bn3`` (DGConv, an ordinary merge); stem, ``layer1``, shortcuts and head as IR-ResNet.
A merged ``bn3`` stays in the forward as zennit leaves a merged BatchNorm (zennit 0.5.1 keeps its ``eps``: a
factor 1/sqrt(1 + eps) with the pass rule), so the maps equal the static network's under zennit's merges.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facetool.explainers.lrp import iresnet
from facetool.explainers.lrp.iresnet import interior_shift, scale_inputs
from facetool.explainers.lrp.parts import attribute_canonizer, bn_scale_shift, new_sum, pair_merge_canonizer
from facetool.explainers.lrp.registry import register_canonizer
from facetool.models.condface import CondFaceIResNet, DynamicBlock
from facetool.models.dynamic import DynamicConv2d, DynamicGroupConv2d, Router
from facetool.models.iresnet import IBasicBlock


class SampleConv(nn.Conv2d):
    """A Conv2d whose kernel is given per forward (:meth:`run`): each sample's (out, in/g, k, k) kernel
    stacked over the batch and applied as one grouped convolution to the input viewed as (1, B*C, H, W).
    ``weight``/``bias`` are plain tensors (the rules read them as a Conv2d's), not parameters."""

    def __init__(self, layer: nn.Module) -> None:
        g = layer.groups * layer.groups_m
        super().__init__(layer.in_ch, layer.out_ch, layer.kernel_size, layer.stride, layer.padding, groups=g,
                         bias=False, device="meta")
        del self.weight, self.bias
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self.sample_groups = g

    def run(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``x`` (B, C, H, W) convolved, sample b with ``weight[b]`` (+ ``bias[b]``) -> (B, out, h, w)."""
        b, c, h, w = x.shape
        self.weight = weight.flatten(0, 1)
        self.bias = None if bias is None else bias.flatten()
        self.groups = b * self.sample_groups
        out = self(x.reshape(1, b * c, h, w))
        return out.reshape(b, -1, out.shape[-2], out.shape[-1])


class ExpertBorder:
    """Border correction of a right-merged dynamic conv1, per sample: what ``bn1``'s shift adds at the
    borders minus its interior value (IR-ResNet's ``_BorderShift``), ``sum_i alpha_i`` of each expert's
    map (the map is linear in the kernel), times ``bn2``'s scale. Constant: no relevance. Not a module."""

    def __init__(self, layer: nn.Module, shift: Tensor, out_scale: Tensor) -> None:
        self.layer, self.shift, self.out_scale = layer, shift, out_scale
        self._cache: dict = {}

    def _experts(self, x: Tensor) -> Tensor:
        """(n, out, h, w) per-expert border maps for ``x``'s size."""
        key = (tuple(x.shape[2:]), x.dtype, x.device)
        if key not in self._cache:
            lay = self.layer
            g = lay.groups * lay.groups_m
            with torch.no_grad():
                bmap = self.shift.view(1, -1, 1, 1).to(x).expand(1, x.shape[1], *x.shape[2:])
                maps = []
                for i in range(lay.experts):
                    w = lay.weight[:, i].detach().reshape(lay.out_ch, *lay.weight.shape[3:]).to(x)
                    full = F.conv2d(bmap, w, None, lay.stride, lay.padding, 1, g)[0]
                    maps.append(full - interior_shift(w, self.shift, g).view(-1, 1, 1))
                self._cache[key] = torch.stack(maps)
        return self._cache[key]

    def __call__(self, alpha: Tensor, x: Tensor) -> Tensor:
        maps = self._experts(x)
        per_out = alpha.to(x.dtype).repeat_interleave(self.layer.out_ch // self.layer.groups_m, dim=1)  # (B, out, n)
        return torch.einsum("bon,nohw->bohw", per_out, maps) * self.out_scale.to(x).view(1, -1, 1, 1)


def _dynamic_block_forward(self, x: Tensor) -> Tensor:
    """Canonical DynamicBlock: routing held (no gradient), per-sample merged kernels, ``Sum`` residual."""
    identity = x if self.downsample is None else self.downsample(x)
    with torch.no_grad():
        alpha = self.router(self.bn1(x))
    self.routing = alpha.flatten(1)
    c1, c2 = self.conv1, self.conv2
    a1, b1 = bn_scale_shift(self.bn1)
    a2, b2 = bn_scale_shift(self.bn2)
    with torch.no_grad():
        w = c1.aggregated_weight(alpha)
        bias = interior_shift(w, b1, self.canonizer_conv1.sample_groups)
        agg_bias = c1.aggregated_bias(alpha)
        if agg_bias is not None:
            bias = bias + agg_bias
        w1 = scale_inputs(w, a1, self.canonizer_conv1.sample_groups) * a2.view(1, -1, 1, 1, 1)
        b1m = bias * a2 + b2
    out = self.canonizer_conv1.run(x, w1, b1m) + self.canonizer_border(alpha, x)
    out = self.prelu(out)
    with torch.no_grad():
        w2, b2m = c2.aggregated_weight(alpha), c2.aggregated_bias(alpha)
        if self.project is None:  # DC: bn3 (its parameters before the merge) into each sample's conv2
            a3, b3 = self.canonizer_bn3
            w2 = w2 * a3.view(1, -1, 1, 1, 1)
            b2m = b3.expand(len(x), -1) if b2m is None else b2m * a3 + b3
    out = self.canonizer_conv2.run(out, w2, b2m)
    if self.project is not None:  # DGConv: project + bn3 are an ordinary merged pair
        out = self.project(out)
    return self.canonizer_sum(torch.stack([identity, self.bn3(out)], dim=-1))  # bn3: what zennit leaves of a merge


def _attrs(name: str, module: nn.Module) -> dict | None:
    if isinstance(module, DynamicBlock):
        a2, _ = bn_scale_shift(module.bn2)
        _, b1 = bn_scale_shift(module.bn1)
        return {"forward": _dynamic_block_forward.__get__(module), "canonizer_sum": new_sum(),
                "canonizer_bn3": bn_scale_shift(module.bn3),
                "canonizer_conv1": SampleConv(module.conv1), "canonizer_conv2": SampleConv(module.conv2),
                "canonizer_border": ExpertBorder(module.conv1, b1, a2)}
    return iresnet._attrs(name, module)


def _pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    pairs = iresnet._pairs(model)
    for m in model.modules():
        if isinstance(m, DynamicBlock):
            # DGConv: project + bn3; DC: bn3 alone (merged per sample into conv2 by the block's forward)
            pairs.append((m.project, m.bn3))
            if m.downsample is not None:
                pairs.append((m.downsample[0], m.downsample[1]))
    return pairs


@register_canonizer(CondFaceIResNet, name="condface", label="CondFace",
                    containers=(IBasicBlock, DynamicBlock, DynamicConv2d, DynamicGroupConv2d, Router), zennit=False)
def condface_canonizers(model: nn.Module) -> list:
    # like IR-ResNet's: the temporary convs and border maps from the unmerged parameters first, then the merges
    return [attribute_canonizer(_attrs), pair_merge_canonizer(_pairs)]
