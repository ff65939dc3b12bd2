"""IR-ResNet face-recognition backbones, state_dict-compatible with insightface arcface_torch.

Layout (keys and shapes exactly as arcface_torch's ``backbones/iresnet.py``, so its released
``backbone.pth`` files load strictly): stem ``conv1`` (3x3, stride 1) -> ``bn1`` -> ``prelu``; stages
``layer1..4`` of improved residual blocks ``bn1 -> conv1 -> bn2 -> prelu -> conv2(stride) -> bn3``
plus the identity (``downsample.0/1`` when the shape changes); head ``bn2 -> flatten -> dropout ->
fc -> features`` (BatchNorm1d with its weight frozen at 1).

``forward_features`` returns the last conv map (before the head's ``bn2``); ``forward_head`` the
embedding. ``width`` scales every stage (64 = arcface_torch); it keeps the key names, so narrow
models for tests and quick experiments use the same code path.
"""

from __future__ import annotations


import torch
from torch import nn

from facetool.errors import FacetoolError
from facetool.models.base import EMBEDDING, FaceModel
from facetool.models.registry import register_model, register_state_dict_matcher, stage_block_counts

LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 200: (6, 26, 60, 6)}
BN_EPS = 1e-5


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-BN residual block: bn1 -> conv1 -> bn2 -> prelu -> conv2(stride) -> bn3, + identity."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout, eps=BN_EPS)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + identity


class IResNet(FaceModel):
    """IR-ResNet embedding network (ArcFace backbone)."""

    output_kind = EMBEDDING
    layer_names = ("layer1", "layer2", "layer3", "layer4")
    cam_layer = "layer4"

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        embedding_size: int = 512,
        input_size: int = 112,
        dropout: float = 0.0,
        fp16: bool = False,
        width: int = 64,
    ) -> None:
        super().__init__()
        if input_size % 16 or input_size < 16:
            raise FacetoolError(f"--input-size must be a multiple of 16 (>= 16) for IR-ResNets, got {input_size}")
        if width < 1:
            raise FacetoolError(f"--width must be >= 1 (64 = arcface_torch), got {width}")
        if embedding_size < 1:
            raise FacetoolError(f"--embedding-size must be >= 1, got {embedding_size}")
        self.fp16 = fp16
        self.embedding_size = embedding_size
        self.input_size = input_size
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = _conv3x3(3, width)
        self.bn1 = nn.BatchNorm2d(width, eps=BN_EPS)
        self.prelu = nn.PReLU(width)
        cin = width
        for i, (n, w) in enumerate(zip(layers, widths), 1):
            blocks = [IBasicBlock(cin, w, stride=2)] + [IBasicBlock(w, w) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = w
        side = input_size // 16
        self.bn2 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(cin * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad = False

    def forward_features(self, x: torch.Tensor, internals: dict | None = None) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=self.fp16 and x.device.type == "cuda"):
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=self.fp16 and features.device.type == "cuda"):
            x = self.dropout(torch.flatten(self.bn2(features), 1))
        return self.features(self.fc(x.float()))


def _factory(depth: int):
    def build(embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0, fp16: bool = False,
              width: int = 64) -> IResNet:
        return IResNet(LAYERS[depth], embedding_size, input_size, dropout, fp16, width)

    build.__name__ = f"iresnet{depth}"
    build.__doc__ = f"IR-ResNet-{depth} (arcface_torch r{depth} layout)."
    return build


for _d in LAYERS:
    register_model(f"iresnet{_d}", family="recognition", aliases=(f"r{_d}",))(_factory(_d))



def ir_geometry(sd: dict) -> tuple[int, dict] | None:
    """Depth and the IR-ResNet keywords (embedding size, input size, width when not 64) that a state_dict
    of the IR-ResNet layout (plain or CondFace) implies by its keys and shapes; None for another layout."""
    counts = stage_block_counts(sd)
    depth = next((d for d, lay in LAYERS.items() if tuple(counts) == lay), None)
    if depth is None:
        return None
    width = int(sd["conv1.weight"].shape[0])
    emb, flat = (int(s) for s in sd["fc.weight"].shape)
    side = round((flat / (8 * width)) ** 0.5)
    kwargs: dict = {"embedding_size": emb, "input_size": side * 16}
    if width != 64:
        kwargs["width"] = width
    return depth, kwargs


@register_state_dict_matcher
def match_iresnet(sd: dict) -> tuple[str, dict] | None:
    """Recognise a bare IR-ResNet state_dict (arcface_torch ``backbone.pth``): depth, width,
    embedding size and input size from the keys and shapes."""
    if not all(k in sd for k in ("conv1.weight", "prelu.weight", "fc.weight", "features.running_mean")):
        return None
    if getattr(sd.get("layer2.0.conv1.weight"), "ndim", 4) != 4:  # dynamic (CondFace) kernels: not ours
        return None
    geometry = ir_geometry(sd)
    if geometry is None:
        return None
    depth, kwargs = geometry
    return f"iresnet{depth}", kwargs

