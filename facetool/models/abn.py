"""Attention Branch Network (Fukui et al., CVPR 2019) on ResNet-18...101 and IR-ResNet backbones.

Registry names ``abn_resnet18 ... abn_resnet101`` and ``abn_iresnet18 ... abn_iresnet100``; kwargs
``num_classes`` (C = total outputs), ``heads`` (classes per attribute head, default ``[C]``; their sum
is C), ``input_size`` (any size; every pooling is adaptive), ``width`` (base width), ``mechanism``
(``residual``: the perception branch sees ``(1 + M) * g``, Eq. 2 of the paper; ``multiply``: ``M * g``,
Eq. 1).

Layout: the backbone's stem and ``layer1..3`` give the feature map ``g`` (B, c, h, w).

* attention branch: ``att_layer4`` (a stride-1 copy of the last stage, own weights) -> ``att_bn`` ->
  1x1 conv c4 -> C (``att_conv``) -> BN -> ReLU, then (a) 1x1 conv C -> C (``att_conv2``) + global
  average pooling -> attention logits (B, C), (b) 3x3 conv C -> A (``att_conv3``) + BN + sigmoid ->
  maps ``M`` (B, A, h, w) in [0, 1], one per head (A = 1 for a single task);
* perception branch: the backbone's ``layer4`` on ``(1 + M_a) * g`` for every head ``a``, global
  average pooling and head ``a``'s linear classifier (its rows of ``fc``).

Multi-task (A > 1) runs ONE batched pass: the A attention-weighted copies of ``g`` are folded into
the batch (B*A, c, h, w), ``layer4`` runs once, and each output column ``k`` takes the pooled feature
of its head (``fc`` rows gathered per head: ``einsum('bkf,kf->bk')``). The reference code instead
runs ``layer4`` once per attribute in a Python loop; :func:`per_attribute_loop` switches this model
to that loop (tests check both agree to 1e-5 in eval mode, ``benchmarks/bench_abn.py`` times them).
In training mode the folded pass computes BatchNorm statistics over all B*A copies (the loop over
each attribute's B copies) -- the same expectation, a different batch.

``att_channels`` is the width K of the attention branch's ReLU bottleneck (1x1 conv c4 -> K -> BN ->
ReLU; then K -> C logits and K -> A maps). ``None`` -- and a checkpoint config without the key, as
0.2.1 wrote them by default -- means K = C, as in the paper. With K = C = 2 (one binary attribute) the
bottleneck can die: when BN + ReLU zero both channels on an image, its map is the constant
``sigmoid(att_bn3(0))`` and its attention logits are 0 (measured on the synthetic set: seed 1 of a
glasses classifier gave one constant map for every image, a beard classifier zeroed every bearded
face); ``att_channels=16`` avoids it, so ``facetool train abn`` builds K = max(C, 16) unless told
otherwise (:func:`default_att_channels`, :func:`att_channels_option`).

``attention_stride`` s: map cell (j, k) is centred on input pixel (s*j, s*k) (16 for ResNets, 8 for
IR-ResNets; every conv and pool is "same"-padded) -- ``facetool.explainers.attention.upsample_maps``
places the maps on the image accordingly.

Output: ONE tensor (B, C) of concatenated per-head logits (``facetool.tasks.split_logits``).
Internals: ``attention`` (B, A, h, w) and ``attention_logits`` (B, C). ``forward_features`` returns the
perception branch's last map (B*A, c4, h', w'), ``forward_head`` pools it and applies the heads.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from facetool.errors import FacetoolError
from facetool.hooks import set_attrs
from facetool.models.base import FaceModel
from facetool.models.registry import create_model, register_model

MECHANISMS = ("residual", "multiply")
#: ``facetool train abn``'s narrowest attention bottleneck: K = max(C, MIN_ATT_CHANNELS) by default
MIN_ATT_CHANNELS = 16
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "iresnet18", "iresnet34", "iresnet50", "iresnet100")


def _stride_one(stage: nn.Module) -> nn.Module:
    """Make every strided convolution / pooling of ``stage`` stride 1 (the attention branch's copy)."""
    for m in stage.modules():
        if isinstance(m, nn.Conv2d) and m.stride != (1, 1):
            m.stride = (1, 1)
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) and m.stride not in (1, (1, 1)):
            m.stride = 1
    return stage


def default_att_channels(num_outputs: int) -> int:
    """``train abn``'s bottleneck width K for C outputs: max(C, 16) (the paper's K = C dies on a binary
    attribute)."""
    return max(int(num_outputs), MIN_ATT_CHANNELS)


def att_channels_option(value: int | None, num_outputs: int) -> int | None:
    """The ``att_channels`` argument for ``train abn --att-channels VALUE`` (``None``: not given).

    Not given: :func:`default_att_channels`, recorded only where it differs from C (C < 16), so a model of
    C >= 16 outputs has the config 0.2.1 wrote (and a 0.2.1 run resumes); 0: ``None``, the paper's K = C
    (also 0.2.1's config); K >= 1: K."""
    if value is None:
        k = default_att_channels(num_outputs)
        return k if k != int(num_outputs) else None
    if int(value) < 0:
        raise FacetoolError(f"--att-channels must be >= 0 (0 = the number of outputs, as in the paper), got {value}")
    return int(value) or None


def _build_backbone(name: str, width: int) -> nn.Module:
    if name.startswith("iresnet"):
        return create_model(name, width=width, input_size=112)
    return create_model(name, num_classes=0, width=width, input_size=128)


class ABN(FaceModel):
    layer_names = ("layer1", "layer2", "layer3", "att_layer4", "layer4")
    cam_layer = "layer4"
    internal_names = ("attention", "attention_logits")

    def __init__(self, backbone: str, num_classes: int, input_size: int = 112, width: int = 64,
                 heads: Sequence[int] | None = None, mechanism: str = "residual",
                 att_channels: int | None = None) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise FacetoolError(f"ABN has no backbone {backbone!r}; use one of {', '.join(BACKBONES)}")
        if mechanism not in MECHANISMS:
            raise FacetoolError(f"unknown --mechanism {mechanism!r}; use one of {', '.join(MECHANISMS)}")
        heads = [int(num_classes)] if not heads else [int(k) for k in heads]
        if num_classes < 1 or min(heads) < 1 or sum(heads) != num_classes:
            raise FacetoolError(f"ABN heads {heads} must be positive and sum to num_classes={num_classes}")
        if att_channels is not None and int(att_channels) < 1:
            raise FacetoolError(f"att_channels must be >= 1, got {att_channels}")
        if input_size < 16:
            raise FacetoolError(f"input_size must be >= 16, got {input_size}")
        self.input_size, self.mechanism, self.heads = int(input_size), mechanism, heads
        self.loop = False  # True: the reference per-attribute loop instead of the batched pass
        base = _build_backbone(backbone, width)
        self.ir = backbone.startswith("iresnet")
        if self.ir:
            self.stem = nn.Sequential(base.conv1, base.bn1, base.prelu)
        else:
            self.stem = nn.Sequential(base.conv1, base.bn1, nn.ReLU(inplace=True), base.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = base.layer1, base.layer2, base.layer3, base.layer4
        c3 = _out_channels(self.layer3)
        c4 = _out_channels(self.layer4)
        self.att_layer4 = _stride_one(_build_backbone(backbone, width).layer4)  # fresh weights
        C, A = int(num_classes), len(heads)
        K = C if att_channels is None else int(att_channels)  # the paper: K = C
        self.att_bn = nn.BatchNorm2d(c4)
        self.att_conv = nn.Conv2d(c4, K, 1, bias=False)
        self.att_bn2 = nn.BatchNorm2d(K)
        self.att_conv2 = nn.Conv2d(K, C, 1, bias=False)
        self.att_conv3 = nn.Conv2d(K, A, 3, padding=1, bias=False)
        self.att_bn3 = nn.BatchNorm2d(A)
        self.out_norm = nn.BatchNorm2d(c4) if self.ir else nn.Identity()  # IR blocks end without activation
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c4, C)
        self.register_buffer("owner", torch.tensor([i for i, k in enumerate(heads) for _ in range(k)]),
                             persistent=False)
        self.num_features, self.num_maps, self.channels_g = c4, A, c3
        # every conv / pool is "same"-padded, so map cell (j, k) is centred on input pixel (s*j, s*k)
        self.attention_stride = _stride(self.stem, prod=True) * math.prod(
            _stride(l) for l in (self.layer1, self.layer2, self.layer3))
        for m in (self.att_conv, self.att_conv2, self.att_conv3):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    # -- branches -------------------------------------------------------------------------------
    def attention(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """(maps (B, A, h, w) in [0, 1], attention logits (B, C)) from the layer3 map ``g``."""
        a = self.att_bn(self.att_layer4(g))
        a = torch.relu(self.att_bn2(self.att_conv(a)))
        maps = torch.sigmoid(self.att_bn3(self.att_conv3(a)))
        logits = self.att_conv2(a).mean((2, 3))
        return maps, logits

    def weighted(self, g: Tensor, m: Tensor) -> Tensor:
        """What the perception branch sees for maps ``m`` (B, k, h, w): (B, k, c, h, w)."""
        w = m[:, :, None]
        return g[:, None] * (1.0 + w) if self.mechanism == "residual" else g[:, None] * w

    def perceive(self, g: Tensor, maps: Tensor) -> Tensor:
        """Perception branch's last map (B*A, c4, h', w'), head-major within each image."""
        if not self.loop or maps.shape[1] == 1:
            return self.layer4(self.weighted(g, maps).flatten(0, 1))
        outs = [self.layer4(self.weighted(g, maps[:, a:a + 1])[:, 0]) for a in range(maps.shape[1])]
        return torch.stack(outs, 1).flatten(0, 1)

    # -- FaceModel interface ----------------------------------------------------------------------
    def forward_features(self, x: Tensor, internals: dict | None = None) -> Tensor:
        g = self.layer3(self.layer2(self.layer1(self.stem(x))))
        maps, logits = self.attention(g)
        if internals is not None:
            internals["attention"] = maps
            internals["attention_logits"] = logits
        return self.perceive(g, maps)

    def forward_head(self, features: Tensor) -> Tensor:
        f = torch.flatten(self.pool(self.out_norm(features)), 1).view(-1, self.num_maps, self.num_features)
        if self.num_maps == 1:
            return self.fc(f[:, 0])
        return torch.einsum("bkf,kf->bk", f[:, self.owner], self.fc.weight) + self.fc.bias


def _stride(m: nn.Module, prod: bool = False) -> int:
    """Down-sampling factor of a stem (``prod``: the product of its conv/pool strides) or of a residual
    stage (its largest stride: the main path and the projection shortcut downsample in parallel)."""
    s = [c.stride if isinstance(c.stride, int) else c.stride[0] for c in m.modules()
         if isinstance(c, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))]
    return math.prod(s) if prod else max(s, default=1)


def _out_channels(stage: nn.Module) -> int:
    """Output channels of a residual stage (its last conv: the last block's branch or projection)."""
    return [m for m in stage.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


@contextlib.contextmanager
def per_attribute_loop(model: nn.Module, on: bool = True) -> Iterator[nn.Module]:
    """Within the block, multi-task ABN runs ``layer4`` once per attribute (the reference code's
    loop) instead of once on the folded batch; the previous mode is restored afterwards."""
    with set_attrs((m for m in model.modules() if isinstance(m, ABN)), loop=on):
        yield model


def _factory(backbone: str):
    def build(num_classes: int = 1000, input_size: int = 112, width: int = 64, heads: Sequence[int] | None = None,
              mechanism: str = "residual", att_channels: int | None = None) -> ABN:
        return ABN(backbone, num_classes, input_size, width, heads, mechanism, att_channels)

    build.__name__ = f"abn_{backbone}"
    build.__doc__ = f"Attention Branch Network on {backbone}."
    return build


for _b in BACKBONES:
    register_model(f"abn_{_b}")(_factory(_b))
