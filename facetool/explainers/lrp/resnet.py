"""ResNet canonizers: facetool's ResNet and ConvNet-AIG, and torchvision's ResNet.

* **BatchNorm after a conv** is merged into it (the stem, each block's ``convN``/``bnN`` and the
  projection shortcut);
* **residual sums** ``shortcut + branch`` become a ``zennit.layer.Sum`` module over the stacked terms;
* **ConvNet-AIG** gates are held at the decisions the model executed (computed without gradient, the
  branch multiplied by the fixed 0/1): relevance flows through the executed graph only;
* **torchvision ResNet** the same way (for comparison with zennit's own ``ResNetCanonizer``:
  ``tests/test_lrp.py`` finds them equal).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv

from facetool.explainers.lrp.parts import attribute_canonizer, block_pairs, new_sum, pair_merge_canonizer
from facetool.explainers.lrp.registry import register_canonizer
from facetool.models.gated import Gate, GatedResidual
from facetool.models.resnet import ResNet

# -- facetool ResNet / ConvNet-AIG ---------------------------------------------------------------


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
    if isinstance(module, GatedResidual):
        return {"forward": _gated_forward.__get__(module), "canonizer_sum": new_sum()}
    return None


@register_canonizer(ResNet, name="resnet", label="ResNet/ConvNet-AIG", containers=(GatedResidual, Gate))
def resnet_canonizers(model: nn.Module) -> list:
    return [pair_merge_canonizer(lambda m: block_pairs(m, (GatedResidual,))), attribute_canonizer(_resnet_blocks)]


# -- torchvision ResNet ---------------------------------------------------------------------------


def _tv_forward(self, x: Tensor) -> Tensor:
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if isinstance(self, tv.Bottleneck):
        out = self.bn3(self.conv3(self.relu(out)))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(self.canonizer_sum(torch.stack([identity, out], dim=-1)))


def _tv_blocks(name: str, module: nn.Module) -> dict | None:
    if isinstance(module, (tv.BasicBlock, tv.Bottleneck)):
        return {"forward": _tv_forward.__get__(module), "canonizer_sum": new_sum()}
    return None


@register_canonizer(tv.ResNet, name="torchvision_resnet", label="torchvision ResNet",
                    containers=(tv.BasicBlock, tv.Bottleneck))
def torchvision_resnet_canonizers(model: nn.Module) -> list:
    return [pair_merge_canonizer(lambda m: block_pairs(m, (tv.BasicBlock, tv.Bottleneck))),
            attribute_canonizer(_tv_blocks)]
