"""MobileFaceNet (Chen et al. 2018, as in the thesis' Table 4.11), ~1.2 M parameters.

112 -> 56 conv 3x3/64 s2 -> depthwise 3x3/64 -> inverted-residual bottlenecks
64 (x5, first s2, expansion 128), 128 (x7, first s2, expansion 256),
128 (x3, first s2, expansions 512 then 256) -> 1x1 conv 512 -> 7x7 depthwise (GDC) -> linear
embedding. Every conv is followed by BatchNorm, PReLU except the linear projections.

``forward_features`` returns the 1x1-conv 512 map (before the GDC); ``forward_head`` the embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from facetool.errors import FacetoolError
from facetool.models.base import EMBEDDING, FaceModel
from facetool.models.registry import register_model, register_state_dict_matcher

#: (out channels, blocks, first stride, expansion channels of the first block, of the others)
STAGES = ((64, 5, 2, 128, 128), (128, 7, 2, 256, 256), (128, 3, 2, 512, 256))


class ConvBN(nn.Sequential):
    """conv -> BN (-> PReLU)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True,
                 padding: int | None = None) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, k, stride, k // 2 if padding is None else padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act:
            layers.append(nn.PReLU(cout))
        super().__init__(*layers)


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand -> 3x3 depthwise(stride) -> 1x1 linear projection (+ identity)."""

    def __init__(self, cin: int, cout: int, stride: int, hidden: int) -> None:
        super().__init__()
        self.residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            ConvBN(cin, hidden, 1),
            ConvBN(hidden, hidden, 3, stride, groups=hidden),
            ConvBN(hidden, cout, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


class MobileFaceNet(FaceModel):
    """MobileFaceNet embedding network with a global depthwise-conv (GDC) head."""

    output_kind = EMBEDDING
    layer_names = ("conv1", "conv2_dw", "blocks", "conv_sep")
    cam_layer = "conv_sep"

    def __init__(self, embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0) -> None:
        super().__init__()
        if input_size % 16 or input_size < 16:
            raise FacetoolError(f"--input-size must be a multiple of 16 (>= 16) for MobileFaceNet, got {input_size}")
        if embedding_size < 1:
            raise FacetoolError(f"--embedding-size must be >= 1, got {embedding_size}")
        self.embedding_size = embedding_size
        self.input_size = input_size
        self.conv1 = ConvBN(3, 64, 3, stride=2)
        self.conv2_dw = ConvBN(64, 64, 3, groups=64)
        blocks: list[nn.Module] = []
        cin = 64
        for cout, n, stride, first_hidden, hidden in STAGES:
            for i in range(n):
                blocks.append(Bottleneck(cin, cout, stride if i == 0 else 1, first_hidden if i == 0 else hidden))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.conv_sep = ConvBN(cin, 512, 1)
        side = input_size // 16
        self.gdc = ConvBN(512, 512, side, groups=512, act=False, padding=0)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(512, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward_features(self, x: torch.Tensor, internals: dict | None = None) -> torch.Tensor:
        return self.conv_sep(self.blocks(self.conv2_dw(self.conv1(x))))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        x = self.dropout(torch.flatten(self.gdc(features), 1))
        return self.features(self.linear(x))


@register_model("mobilefacenet", family="recognition", aliases=("mbf",))
def mobilefacenet(embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0) -> MobileFaceNet:
    """MobileFaceNet (~1.2 M parameters at embedding 512)."""
    return MobileFaceNet(embedding_size, input_size, dropout)


@register_state_dict_matcher
def match_mobilefacenet(sd: dict) -> tuple[str, dict] | None:
    """Recognise a bare facetool MobileFaceNet state_dict."""
    if not all(k in sd for k in ("conv2_dw.0.weight", "gdc.0.weight", "linear.weight")):
        return None
    side = int(sd["gdc.0.weight"].shape[-1])
    return "mobilefacenet", {"embedding_size": int(sd["linear.weight"].shape[0]), "input_size": side * 16}

