"""ResNet-18/34/50/101 for face crops and their ConvNet-AIG variants (a gate per residual block).

Registry names ``resnet18 resnet34 resnet50 resnet101`` and ``aig_resnet18 ... aig_resnet101``;
kwargs ``num_classes`` (0 = no classifier: ``forward_head`` returns the pooled feature),
``input_size`` (recorded for FLOP counting; any size >= 32 works, the final pooling is adaptive),
``width`` (base width, 64 as in the paper; 16/32 for CPU tests), ``gate_hidden`` (AIG, 16).

Stem: 7x7/2 conv + BN + ReLU + 3x3/2 max-pool, then four stages of widths w, 2w, 4w, 8w (x4 for
bottlenecks), strides 1, 2, 2, 2: a 128 px face gives a 4x4 map before pooling, 112 px 4x4, 64 px 2x2.
ResNet-101 = [3, 4, 23, 3] bottlenecks = 33 gated blocks; ResNet-50 and -34 have 16, ResNet-18 8.
Every block is gated in the AIG variants (including the first block of a stage, whose shortcut is the
1x1 projection); the block ends with the ReLU after the addition, as in ResNet.

Internals (``forward(x, return_internals=True)``): ``gates`` (B, L) hard decisions and
``gate_probs`` (B, L) execution probabilities (AIG variants only).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from facetool.models.base import CLASSIFICATION, EMBEDDING, FaceModel
from facetool.models.gated import Gate, GatedResidual, gated_blocks
from facetool.models.registry import register_model, register_state_dict_matcher, stage_block_counts


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


class BasicBlock(GatedResidual):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, gate_hidden: int | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = _bn(planes)
        self.downsample = _projection(inplanes, planes, stride)
        self.gate = Gate(inplanes, gate_hidden) if gate_hidden else None

    def residual(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))

    def shortcut(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)


class Bottleneck(GatedResidual):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, gate_hidden: int | None = None) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = _bn(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = _bn(out)
        self.downsample = _projection(inplanes, out, stride)
        self.gate = Gate(inplanes, gate_hidden) if gate_hidden else None

    def residual(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.bn3(self.conv3(h))

    def shortcut(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)


def _projection(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(FaceModel):
    """ResNet classifier; with ``gate_hidden`` every block is a ConvNet-AIG gated block."""

    layer_names = ("layer1", "layer2", "layer3", "layer4")
    cam_layer = "layer4"

    def __init__(self, block: type[GatedResidual], layers: list[int], num_classes: int = 1000,
                 input_size: int = 128, width: int = 64, gate_hidden: int | None = None) -> None:
        super().__init__()
        from facetool.errors import FacetoolError

        if input_size < 32:  # stride 32: below that the last stage sees only padding-dominated 1x1 maps
            raise FacetoolError(f"--input-size must be >= 32 for ResNet/AIG/IIG (they downsample by 32), got {input_size}")
        if width < 1:
            raise FacetoolError(f"--width must be >= 1 (64 = standard ResNet), got {width}")
        if gate_hidden is not None and gate_hidden < 1:
            raise FacetoolError(f"--gate-hidden must be >= 1, got {gate_hidden}")
        self.input_size = int(input_size)
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = width
        for i, n in enumerate(layers):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(inplanes, planes, 2 if (i > 0 and j == 0) else 1, gate_hidden))
                inplanes = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_features = inplanes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes) if num_classes > 0 else nn.Identity()
        self.output_kind = CLASSIFICATION if num_classes > 0 else EMBEDDING
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not _in_gate(self, m):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self._gated = gated_blocks(self)
        self.num_gates = len(self._gated)
        self.internal_names = ("gates", "gate_probs") if self.num_gates else ()

    def forward_features(self, x: Tensor, internals: dict | None = None) -> Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.num_gates:
            if internals is not None:
                internals["gates"] = torch.stack([b.last_gate for b in self._gated], 1)
                internals["gate_probs"] = torch.stack([b.last_prob for b in self._gated], 1)
            for b in self._gated:
                b.last_gate = b.last_prob = None
        return x

    def forward_head(self, features: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(features), 1))


def _in_gate(model: nn.Module, conv: nn.Module) -> bool:
    return any(conv is m for b in gated_blocks(model) for m in b.gate.modules())


_DEPTHS = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
}


def _make(depth: int, aig: bool, num_classes: int = 1000, input_size: int = 128, width: int = 64,
          gate_hidden: int = 16) -> ResNet:
    block, layers = _DEPTHS[depth]
    return ResNet(block, layers, num_classes, input_size, width, gate_hidden if aig else None)


@register_model("resnet18")
def resnet18(**kw) -> ResNet:
    return _make(18, False, **kw)


@register_model("resnet34")
def resnet34(**kw) -> ResNet:
    return _make(34, False, **kw)


@register_model("resnet50")
def resnet50(**kw) -> ResNet:
    return _make(50, False, **kw)


@register_model("resnet101")
def resnet101(**kw) -> ResNet:
    return _make(101, False, **kw)


@register_model("aig_resnet18", family="aig")
def aig_resnet18(**kw) -> ResNet:
    return _make(18, True, **kw)


@register_model("aig_resnet34", family="aig")
def aig_resnet34(**kw) -> ResNet:
    return _make(34, True, **kw)


@register_model("aig_resnet50", family="aig")
def aig_resnet50(**kw) -> ResNet:
    return _make(50, True, **kw)


@register_model("aig_resnet101", family="aig")
def aig_resnet101(**kw) -> ResNet:
    return _make(101, True, **kw)


_KEY = re.compile(r"^(conv1|bn1|fc|layer[1-4]\.\d+\.(conv[1-3]|bn[1-3]|downsample\.[01]|gate\.(fc1|bn|fc2)))\."
                  r"(weight|bias|running_mean|running_var|num_batches_tracked)$")


@register_state_dict_matcher
def match_resnet(sd: dict) -> tuple[str, dict] | None:
    """Recognise a bare ResNet / ConvNet-AIG state_dict (``model.state_dict()`` of these models; also
    torchvision's ResNet layout): depth, block type, gates, width, gate width and classes from the keys.
    The input size is not in the weights (the pooling is adaptive): the default is kept."""
    if "conv1.weight" not in sd or "layer1.0.conv1.weight" not in sd or not all(_KEY.match(k) for k in sd):
        return None
    counts = stage_block_counts(sd)
    block = Bottleneck if "layer1.0.conv3.weight" in sd else BasicBlock
    depth = next((d for d, (b, lay) in _DEPTHS.items() if b is block and counts == lay), None)
    if depth is None:
        return None
    kwargs: dict = {"num_classes": int(sd["fc.weight"].shape[0]) if "fc.weight" in sd else 0,
                    "width": int(sd["conv1.weight"].shape[0])}
    if "layer1.0.gate.fc1.weight" in sd:
        kwargs["gate_hidden"] = int(sd["layer1.0.gate.fc1.weight"].shape[0])
        return f"aig_resnet{depth}", kwargs
    return f"resnet{depth}", kwargs
