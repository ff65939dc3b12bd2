"""MobileFaceNet canonizers: conv+BN merges, inverted-residual sums as ``Sum`` modules, the
``features`` BN1d merged into the bias-free linear."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from facetool.explainers.lrp.parts import attribute_canonizer, new_sum, pair_merge_canonizer
from facetool.explainers.lrp.registry import register_canonizer
from facetool.models.mobilefacenet import Bottleneck, ConvBN, MobileFaceNet


def _pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    pairs = [(m[0], m[1]) for m in model.modules() if isinstance(m, ConvBN)]
    pairs.append((model.linear, model.features))
    return pairs


def _forward(self, x: Tensor) -> Tensor:
    out = self.conv(x)
    return self.canonizer_sum(torch.stack([x, out], dim=-1))


def _blocks(name: str, module: nn.Module) -> dict | None:
    if isinstance(module, Bottleneck) and module.residual:
        return {"forward": _forward.__get__(module), "canonizer_sum": new_sum()}
    return None


@register_canonizer(MobileFaceNet, name="mobilefacenet", label="MobileFaceNet", containers=(Bottleneck, ConvBN))
def mobilefacenet_canonizers(model: nn.Module) -> list:
    return [pair_merge_canonizer(_pairs), attribute_canonizer(_blocks)]
