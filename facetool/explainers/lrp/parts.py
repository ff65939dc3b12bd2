"""Building blocks of the canonizers: zennit's BatchNorm merge over explicit pairs, attribute
canonizers (a temporary ``forward`` and the modules it uses), zennit's ``Sum`` module and BatchNorm as
an affine map. A family file (:mod:`facetool.explainers.lrp`) combines these for one architecture."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from facetool.errors import FacetoolError

#: Module types every canonized model may contain as they are (zennit has a rule or a pass for each).
LEAVES = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.PReLU, nn.MaxPool2d,
          nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity, nn.Flatten)


def zennit_modules():
    """zennit's ``canonizers`` and ``layer`` modules; a missing zennit is a FacetoolError."""
    try:
        import zennit  # noqa: F401
    except ImportError as e:  # pragma: no cover - zennit is a dependency
        raise FacetoolError("LRP needs the zennit package (pip install zennit)") from e
    from zennit import canonizers, layer

    return canonizers, layer


def pair_merge_canonizer(pairs_fn: Callable[[nn.Module], list[tuple[nn.Module, nn.Module]]]):
    """A zennit MergeBatchNorm over explicit (linear, batchnorm) pairs found by ``pairs_fn``. A pair
    ``(None, batchnorm)`` only turns the BN into what zennit leaves of a merged one (for a linear layer
    the caller merges itself, e.g. per-sample kernels: :mod:`facetool.explainers.lrp.condface`)."""
    canonizers, _ = zennit_modules()

    class PairMergeBatchNorm(canonizers.MergeBatchNorm):
        def apply(self, root_module):
            instances = []
            for lin, bn in pairs_fn(root_module):
                inst = PairMergeBatchNorm()
                inst.register(() if lin is None else (lin,), bn)
                instances.append(inst)
            return instances

        def copy(self):
            return PairMergeBatchNorm()

    return PairMergeBatchNorm()


def attribute_canonizer(attr_fn: Callable[[str, nn.Module], dict | None]):
    """zennit's AttributeCanonizer: ``attr_fn(name, module)`` gives the attributes a module has while
    attached (e.g. a canonical ``forward`` and the modules it calls), or None."""
    canonizers, _ = zennit_modules()
    return canonizers.AttributeCanonizer(attr_fn)


def new_sum() -> nn.Module:
    """A ``zennit.layer.Sum`` over the last dimension: residual terms stacked there become one module,
    so the Norm rule splits relevance between them (the gradient would copy it to both)."""
    _, layer = zennit_modules()
    return layer.Sum()


def bn_scale_shift(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval-mode BN as ``y = a * x + b``."""
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    b = (bn.bias if bn.affine else 0.0) - bn.running_mean * a
    return a.detach(), b.detach()


def block_pairs(model: nn.Module, block_types: tuple[type, ...]) -> list[tuple[nn.Module, nn.Module]]:
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
