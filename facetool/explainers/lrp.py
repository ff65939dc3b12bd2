"""Layer-wise relevance propagation (LRP) for every facetool architecture, through zennit.

zennit applies its rules to *modules*; its own canonizers only know torchvision's ResNet blocks and
merge a BatchNorm only when it directly follows a linear layer. The canonizers here bring each facetool
architecture into the canonical form LRP needs, temporarily (attached and detached as a context
manager; the model's outputs are bit-identical afterwards):

* **BatchNorm after a conv/linear** is merged into it (zennit's ``MergeBatchNorm``, by explicit pairs,
  parameters restored on exit);
* **residual sums** ``shortcut + branch`` become a ``zennit.layer.Sum`` module over the stacked
  terms, so the proportional (Norm) rule splits relevance between the terms instead of the gradient
  copying it to both (which doubles it);
* **ConvNet-AIG** gates are held at the decisions the model executed (computed without gradient, the
  branch multiplied by the fixed 0/1): relevance flows through the executed graph only;
* **IR-ResNet** (pre-BN blocks ``bn1 -> conv1 -> bn2 -> prelu -> conv2 -> bn3``): ``bn1`` precedes the
  conv, so it is merged *to the right* into a temporary conv (weights ``W * a``, interior bias
  ``sum W * b``) together with ``bn2`` on the left; the conv's zero padding pads ``bn1``'s output, not
  its input, so the border difference of the shift is added back as a constant map (no relevance);
  the head's ``bn2`` (BN2d before the flatten) is merged to the right into ``fc`` and the ``features``
  BN1d to the left (a temporary Linear); PReLU is an activation (pass rule);
* **MobileFaceNet**: conv+BN merges, inverted-residual sums as modules, the ``features`` BN1d merged
  into the bias-free linear;
* **torchvision ResNet** (for comparison with zennit's own ``ResNetCanonizer``).

A model with a module type none of these handles is refused with an error naming the type
(:func:`check_canonizable`), never silently explained by plain gradients.

Composites (``method``): ``lrp`` = EpsilonPlusFlat, ``lrp-gamma`` = EpsilonGammaBox with the bounds
of facetool's normalisation ((0 - 127.5) / 127.5 = -1 .. 1), ``lrp-ab`` = EpsilonAlpha2Beta1,
``lrp-epsilon`` = the epsilon rule on every linear layer (used by the conservation tests).
``bias_free=True`` zeroes the biases in the rules (zennit's ``zero_params='bias'``): then each layer
conserves relevance and the input relevance sums to the explained output (zennit issue #183).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facetool.errors import FacetoolError

LRP_METHODS = ("lrp", "lrp-gamma", "lrp-ab", "lrp-epsilon")

# ----------------------------------------------------------------------------------- canonizers


def _zennit():
    try:
        import zennit  # noqa: F401
    except ImportError as e:  # pragma: no cover - zennit is a dependency
        raise FacetoolError("LRP needs the zennit package (pip install zennit)") from e
    from zennit import canonizers, layer

    return canonizers, layer


def _pair_merge_canonizer(pairs_fn: Callable[[nn.Module], list[tuple[nn.Module, nn.Module]]]):
    """A zennit MergeBatchNorm over explicit (linear, batchnorm) pairs found by ``pairs_fn``."""
    canonizers, _ = _zennit()

    class PairMergeBatchNorm(canonizers.MergeBatchNorm):
        def apply(self, root_module):
            instances = []
            for lin, bn in pairs_fn(root_module):
                inst = PairMergeBatchNorm()
                inst.register((lin,), bn)
                instances.append(inst)
            return instances

        def copy(self):
            return PairMergeBatchNorm()

    return PairMergeBatchNorm()


def _attribute_canonizer(attr_fn: Callable[[str, nn.Module], dict | None]):
    canonizers, _ = _zennit()
    return canonizers.AttributeCanonizer(attr_fn)


def _new_sum() -> nn.Module:
    _, layer = _zennit()
    return layer.Sum()


def _bn_scale_shift(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval-mode BN as ``y = a * x + b``."""
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    b = (bn.bias if bn.affine else 0.0) - bn.running_mean * a
    return a.detach(), b.detach()


# -- facetool ResNet / ConvNet-AIG ---------------------------------------------------------------


def _block_pairs(model: nn.Module, block_types: tuple[type, ...]) -> list[tuple[nn.Module, nn.Module]]:
    """(conv, BN) pairs of a ResNet-layout model: the stem, each block's convN/bnN and its projection."""
    pairs = [(model.conv1, model.bn1)]
    for m in model.modules():
        if isinstance(m, block_types):
            for i in (1, 2, 3):
                if hasattr(m, f"conv{i}"):
                    pairs.append((getattr(m, f"conv{i}"), getattr(m, f"bn{i}")))
            if m.downsample is not None:
                pairs.append((m.downsample[0], m.downsample[1]))
    return pairs


def _resnet_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    from facetool.models.gated import GatedResidual

    return _block_pairs(model, (GatedResidual,))


def _gated_forward(self, x: Tensor) -> Tensor:
    """Canonical ``relu(Sum([shortcut(x), z * residual(x)]))`` with the gate decision ``z`` fixed."""
    s = self.shortcut(x)
    r = self.residual(x)
    if self.gate is not None:
        with torch.no_grad():
            z, p = self.gate(x)
        self.last_gate, self.last_prob = z, p
        r = r * z.to(r.dtype).view(-1, 1, 1, 1)
    return torch.relu(self.canonizer_sum(torch.stack([s, r], dim=-1)))


def _resnet_blocks(name: str, module: nn.Module) -> dict | None:
    from facetool.models.gated import GatedResidual

    if isinstance(module, GatedResidual):
        return {"forward": _gated_forward.__get__(module), "canonizer_sum": _new_sum()}
    return None


# -- torchvision ResNet ---------------------------------------------------------------------------


def _tv_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return _block_pairs(model, (BasicBlock, Bottleneck))


def _tv_forward(self, x: Tensor) -> Tensor:
    from torchvision.models.resnet import Bottleneck

    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if isinstance(self, Bottleneck):
        out = self.bn3(self.conv3(self.relu(out)))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(self.canonizer_sum(torch.stack([identity, out], dim=-1)))


def _tv_blocks(name: str, module: nn.Module) -> dict | None:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if isinstance(module, (BasicBlock, Bottleneck)):
        return {"forward": _tv_forward.__get__(module), "canonizer_sum": _new_sum()}
    return None


# -- IR-ResNet --------------------------------------------------------------------------------------


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
        return (self.weight * self.shift.view(1, -1, 1, 1)).sum((1, 2, 3)) if self.groups == 1 else None

    def forward(self, x: Tensor) -> Tensor:
        key = (tuple(x.shape[2:]), x.dtype, x.device)
        if key not in self._cache:
            with torch.no_grad():
                bmap = self.shift.view(1, -1, 1, 1).expand(1, x.shape[1], *x.shape[2:]).to(x)
                full = F.conv2d(bmap, self.weight.to(x), None, self.stride, self.padding, self.dilation, self.groups)
                self._cache[key] = ((full - self.interior().to(x).view(1, -1, 1, 1)) * self.out_scale.to(x).view(1, -1, 1, 1))
        return self._cache[key]


def _iresnet_merged_conv1(block: nn.Module) -> tuple[nn.Conv2d, _BorderShift]:
    """bn1 (right) + conv1 + bn2 (left) as one temporary conv and its border correction."""
    a1, b1 = _bn_scale_shift(block.bn1)
    a2, b2 = _bn_scale_shift(block.bn2)
    conv = block.conv1
    merged = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, conv.groups, bias=True).to(conv.weight)
    border = _BorderShift(conv, b1, a2)
    with torch.no_grad():
        w = conv.weight * a1.view(1, -1, 1, 1)
        merged.weight.copy_(w * a2.view(-1, 1, 1, 1))
        bias = border.interior() + (conv.bias if conv.bias is not None else 0.0)
        merged.bias.copy_(bias * a2 + b2)
    merged.requires_grad_(False)
    return merged, border


def _iblock_forward(self, x: Tensor) -> Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.canonizer_conv1(x) + self.canonizer_border(x)
    out = self.bn3(self.conv2(self.prelu(out)))
    return self.canonizer_sum(torch.stack([identity, out], dim=-1))


def _iresnet_head_linear(model: nn.Module) -> nn.Linear:
    """head bn2 (BN2d, right, through the flatten) + fc + features BN1d (left) as one Linear."""
    a, b = _bn_scale_shift(model.bn2)
    fc = model.fc
    c = a.numel()
    side = fc.in_features // c
    a_flat = a.repeat_interleave(side)
    b_flat = b.repeat_interleave(side)
    af, bf = _bn_scale_shift(model.features)
    lin = nn.Linear(fc.in_features, fc.out_features, bias=True).to(fc.weight)
    with torch.no_grad():
        lin.weight.copy_(fc.weight * a_flat.view(1, -1) * af.view(-1, 1))
        bias = fc.weight @ b_flat + (fc.bias if fc.bias is not None else 0.0)
        lin.bias.copy_(bias * af + bf)
    lin.requires_grad_(False)
    return lin


def _iresnet_forward_head(self, features: Tensor) -> Tensor:
    x = self.dropout(torch.flatten(features, 1))
    return self.canonizer_head(x.float())


def _iresnet_attrs(name: str, module: nn.Module) -> dict | None:
    from facetool.models.iresnet import IBasicBlock, IResNet

    if isinstance(module, IBasicBlock):
        conv, border = _iresnet_merged_conv1(module)
        return {"forward": _iblock_forward.__get__(module), "canonizer_sum": _new_sum(),
                "canonizer_conv1": conv, "canonizer_border": border}
    if isinstance(module, IResNet):
        return {"forward_head": _iresnet_forward_head.__get__(module), "canonizer_head": _iresnet_head_linear(module)}
    return None


def _iresnet_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    from facetool.models.iresnet import IBasicBlock

    pairs = [(model.conv1, model.bn1)]
    for m in model.modules():
        if isinstance(m, IBasicBlock):
            pairs.append((m.conv2, m.bn3))
            if m.downsample is not None:
                pairs.append((m.downsample[0], m.downsample[1]))
    return pairs


# -- MobileFaceNet --------------------------------------------------------------------------------


def _mfn_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    from facetool.models.mobilefacenet import ConvBN

    pairs = [(m[0], m[1]) for m in model.modules() if isinstance(m, ConvBN)]
    pairs.append((model.linear, model.features))
    return pairs


def _mfn_forward(self, x: Tensor) -> Tensor:
    out = self.conv(x)
    return self.canonizer_sum(torch.stack([x, out], dim=-1))


def _mfn_blocks(name: str, module: nn.Module) -> dict | None:
    from facetool.models.mobilefacenet import Bottleneck

    if isinstance(module, Bottleneck) and module.residual:
        return {"forward": _mfn_forward.__get__(module), "canonizer_sum": _new_sum()}
    return None


# -- dispatch -----------------------------------------------------------------------------------------

_LEAVES = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.PReLU, nn.MaxPool2d,
           nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity, nn.Flatten)


def _architecture(model: nn.Module) -> str:
    from facetool.models.iresnet import IResNet
    from facetool.models.mobilefacenet import MobileFaceNet
    from facetool.models.resnet import ResNet

    if isinstance(model, ResNet):
        return "resnet"
    if isinstance(model, IResNet):
        return "iresnet"
    if isinstance(model, MobileFaceNet):
        return "mobilefacenet"
    try:
        from torchvision.models.resnet import ResNet as TVResNet

        if isinstance(model, TVResNet):
            return "torchvision_resnet"
    except ImportError:  # pragma: no cover
        pass
    raise FacetoolError(
        f"LRP cannot canonize a {type(model).__name__} model (facetool canonizes ResNet/ConvNet-AIG, "
        "IR-ResNet, MobileFaceNet and torchvision ResNet); use --method gradcam for it"
    )


def _containers(arch: str) -> tuple[type, ...]:
    from facetool.trainers.aig import Gate, GatedResidual
    from facetool.models.iresnet import IBasicBlock, IResNet
    from facetool.models.mobilefacenet import Bottleneck, ConvBN, MobileFaceNet
    from facetool.models.resnet import ResNet

    if arch == "resnet":
        return (ResNet, GatedResidual, Gate, nn.Sequential)
    if arch == "iresnet":
        return (IResNet, IBasicBlock, nn.Sequential)
    if arch == "mobilefacenet":
        return (MobileFaceNet, Bottleneck, ConvBN, nn.Sequential)
    from torchvision.models.resnet import BasicBlock, Bottleneck as TVB, ResNet as TVResNet

    return (TVResNet, BasicBlock, TVB, nn.Sequential)


def check_canonizable(model: nn.Module) -> str:
    """The architecture key of ``model``; a model (or a sub-module type) the canonizers do not know is
    a FacetoolError naming it."""
    arch = _architecture(model)
    containers = _containers(arch)
    for name, m in model.named_modules():
        if type(m) in _LEAVES or isinstance(m, containers):
            continue
        raise FacetoolError(
            f"LRP cannot canonize module {name or '<root>'} of type {type(m).__name__} in {type(model).__name__} "
            f"(known: {', '.join(sorted({t.__name__ for t in _LEAVES + containers}))}); use --method gradcam"
        )
    return arch


def canonizers_for(model: nn.Module) -> list:
    """zennit canonizers for ``model`` (after :func:`check_canonizable`)."""
    arch = check_canonizable(model)
    if arch == "resnet":
        return [_pair_merge_canonizer(_resnet_pairs), _attribute_canonizer(_resnet_blocks)]
    if arch == "torchvision_resnet":
        return [_pair_merge_canonizer(_tv_pairs), _attribute_canonizer(_tv_blocks)]
    if arch == "iresnet":
        # the temporary convs are built from the unmerged parameters, so build them first
        return [_attribute_canonizer(_iresnet_attrs), _pair_merge_canonizer(_iresnet_pairs)]
    return [_pair_merge_canonizer(_mfn_pairs), _attribute_canonizer(_mfn_blocks)]


def input_bounds(x: Tensor) -> tuple[Tensor, Tensor]:
    """Lowest/highest normalised pixel values, shaped like ``x`` (facetool: (v - 127.5) / 127.5)."""
    from facetool.data.transforms import MEAN, STD

    return torch.full_like(x, (0.0 - MEAN) / STD), torch.full_like(x, (255.0 - MEAN) / STD)


def make_composite(method: str, model: nn.Module, x: Tensor, bias_free: bool = False, epsilon: float = 1e-6):
    """The zennit composite of ``method`` with facetool's canonizers for ``model``."""
    from zennit import composites, rules
    from zennit.types import Convolution

    if method not in LRP_METHODS:
        raise FacetoolError(f"unknown LRP method {method!r}; use one of {', '.join(LRP_METHODS)}")
    zp = ["bias"] if bias_free else None
    canon = canonizers_for(model)
    if method == "lrp":
        return composites.EpsilonPlusFlat(epsilon=epsilon, zero_params=zp, canonizers=canon)
    if method == "lrp-gamma":
        low, high = input_bounds(x)
        return composites.EpsilonGammaBox(low=low, high=high, epsilon=epsilon, zero_params=zp, canonizers=canon)
    if method == "lrp-ab":
        return composites.EpsilonAlpha2Beta1(epsilon=epsilon, zero_params=zp, canonizers=canon)
    layer_map = composites.layer_map_base() + [
        ((Convolution, nn.Linear), rules.Epsilon(epsilon=epsilon, zero_params=zp)),
    ]
    return composites.LayerMapComposite(layer_map=layer_map, canonizers=canon)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every module is in eval mode; the previous flags are restored afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, f in flags.items():
            m.training = f


@contextlib.contextmanager
def lrp_context(model: nn.Module, method: str, x: Tensor, bias_free: bool = False,
                epsilon: float = 1e-6) -> Iterator[nn.Module]:
    """Canonizers and rule hooks attached to ``model`` inside the block (eval mode), removed after."""
    composite = make_composite(method, model, x, bias_free, epsilon)
    with eval_mode(model):
        composite.register(model)
        try:
            yield model
        finally:
            composite.remove()


def lrp(model: nn.Module, x: Tensor, attr_output: Callable[[Tensor], Tensor], method: str = "lrp",
        bias_free: bool = False, epsilon: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Relevance of each input value: ``(relevance (B, C, H, W), model output)``.

    ``attr_output(out)`` gives the relevance at the model output (e.g. the one-hot class logit, or the
    embedding's terms of the cosine to a reference); the input relevance sums to its sum (exactly with
    ``bias_free`` up to the stabilisers)."""
    x = x.detach().clone().requires_grad_(True)
    with lrp_context(model, method, x, bias_free, epsilon):
        out = model(x)
        rel, = torch.autograd.grad(out, x, grad_outputs=attr_output(out.detach()).to(out.dtype))
    return rel.detach(), out.detach()
