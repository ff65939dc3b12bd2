"""CondFace architectures (thesis ch. 5): IR-ResNets whose last three stages convolve with kernels
chosen per image by a routing network (:mod:`facetool.models.dynamic`).

* ``condface_dc_ir<depth>`` (the thesis's DC row): in every block of ``layer2..4`` both 3x3
  convolutions are :class:`~facetool.models.dynamic.DynamicConv2d` with ``experts`` (4) kernels; one
  routing network per block (on the block's normalised input) drives both, so IR-18 has 6 routing
  positions and ``routing`` in R^(6*4 = 24).
* ``condface_ir<depth>`` (AS4 / CondFace): the block's 3x3 convolutions are
  :class:`~facetool.models.dynamic.DynamicGroupConv2d` (``groups_m`` = 4 input-channel groups x
  ``experts`` = 4) with twice the output channels, then a 1x1 convolution back to the stage width
  (the groups make the wide convolutions about as cheap as the dense ones; the 1x1 mixes the groups);
  one routing per block, so IR-18 has ``routing`` in R^(6*16 = 96).

Stem, ``layer1``, shortcuts and head are IR-ResNet's (any depth, width, input size; ``output_kind``
"embedding"). ``model(x, return_internals=True)`` reports ``routing`` (B, D): the blocks' routing
vectors concatenated in forward order (each group's slice of ``experts`` entries sums to 1).
``set_temperature(t)`` sets the routing softmax temperature of every block.
"""

from __future__ import annotations

import torch
from torch import nn

from facetool.errors import FacetoolError
from facetool.models.base import EMBEDDING
from facetool.models.dynamic import DynamicConv2d, DynamicGroupConv2d, Router, dynamic_layers
from facetool.models.iresnet import BN_EPS, LAYERS, IResNet, ir_geometry
from facetool.models.registry import register_model, register_state_dict_matcher

#: the variants: "dc" (DynamicConv2d) and "dgconv" (DynamicGroupConv2d, x2 channels + 1x1 back)
VARIANTS = ("dc", "dgconv")


class DynamicBlock(nn.Module):
    """IR block ``bn1 -> conv1 -> bn2 -> prelu -> conv2(stride) [-> 1x1 back] -> bn3`` + identity, with
    dynamic 3x3 convolutions sharing one routing network (on ``bn1(x)``); ``routing`` is (B, m*n)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, variant: str = "dc", experts: int = 4,
                 groups_m: int = 4, temperature: float = 1.0) -> None:
        super().__init__()
        self.variant = variant
        if variant == "dc":
            m, mid = 1, cout
            self.conv1 = DynamicConv2d(cin, mid, 3, 1, 1, experts=experts, router=False)
            self.conv2 = DynamicConv2d(mid, mid, 3, stride, 1, experts=experts, router=False)
        else:
            m, mid = groups_m, 2 * cout
            self.conv1 = DynamicGroupConv2d(cin, mid, 3, 1, 1, groups_m=m, experts=experts, router=False)
            self.conv2 = DynamicGroupConv2d(mid, mid, 3, stride, 1, groups_m=m, experts=experts, router=False)
        self.router = Router(cin, experts, m)
        self.router.temperature = float(temperature)
        self.bn1 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.bn2 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self.prelu = nn.PReLU(mid)
        self.project = nn.Conv2d(mid, cout, 1, bias=False) if variant == "dgconv" else None
        self.bn3 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout, eps=BN_EPS)
            )
        self.routing: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        h = self.bn1(x)
        alpha = self.router(h)
        self.routing = alpha.flatten(1)
        out = self.conv2(self.prelu(self.bn2(self.conv1(h, alpha))), alpha)
        if self.project is not None:
            out = self.project(out)
        return self.bn3(out) + identity


class CondFaceIResNet(IResNet):
    """IR-ResNet with dynamic (DC) or dynamic-group (DGConv) blocks in ``layer2..4``."""

    output_kind = EMBEDDING
    internal_names = ("routing",)

    def __init__(self, layers: tuple[int, int, int, int], variant: str = "dgconv", experts: int = 4,
                 groups_m: int = 4, embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0,
                 fp16: bool = False, width: int = 64, temperature: float = 1.0) -> None:
        if variant not in VARIANTS:
            raise FacetoolError(f"--variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if experts < 1 or groups_m < 1:
            raise FacetoolError(f"experts and groups_m must be >= 1, got {experts} and {groups_m}")
        if variant == "dgconv" and width % groups_m:
            raise FacetoolError(f"--width must be a multiple of the {groups_m} channel groups, got {width}")
        if not temperature > 0:
            raise FacetoolError(f"routing temperature must be > 0, got {temperature}")
        super().__init__(layers, embedding_size, input_size, dropout, fp16, width)
        self.variant = variant
        cin = width
        for i, n in enumerate(layers[1:], 2):
            w = width * 2 ** (i - 1)
            blocks = [DynamicBlock(cin, w, 2, variant, experts, groups_m, temperature)]
            blocks += [DynamicBlock(w, w, 1, variant, experts, groups_m, temperature) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = w
        self._init_weights()
        for layer in dynamic_layers(self):
            nn.init.normal_(layer.weight, 0, 0.1)

    def routing_blocks(self) -> list[DynamicBlock]:
        """The blocks with a routing network, in forward order (the order of ``routing``'s slices)."""
        return [m for m in self.modules() if isinstance(m, DynamicBlock)]

    def set_temperature(self, t: float) -> None:
        """Routing softmax temperature of every block (for a START:END schedule); > 0."""
        if not t > 0:
            raise FacetoolError(f"routing temperature must be > 0, got {t}")
        for b in self.routing_blocks():
            b.router.temperature = float(t)

    def forward_features(self, x: torch.Tensor, internals: dict | None = None) -> torch.Tensor:
        out = super().forward_features(x, internals)
        if internals is not None:
            internals["routing"] = torch.cat([b.routing for b in self.routing_blocks()], 1)
        return out


def _factory(depth: int, variant: str):
    def build(embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0, fp16: bool = False,
              width: int = 64, experts: int = 4, groups_m: int = 4, temperature: float = 1.0) -> CondFaceIResNet:
        return CondFaceIResNet(LAYERS[depth], variant, experts, groups_m, embedding_size, input_size, dropout,
                               fp16, width, temperature)

    build.__name__ = f"condface{'_dc' if variant == 'dc' else ''}_ir{depth}"
    build.__doc__ = (f"CondFace IR-ResNet-{depth}, "
                     + ("dynamic convolutions (DC)" if variant == "dc" else "dynamic group convolutions (AS4)") + ".")
    return build


for _d in LAYERS:
    register_model(f"condface_dc_ir{_d}", family="condface")(_factory(_d, "dc"))
    register_model(f"condface_ir{_d}", family="condface")(_factory(_d, "dgconv"))


@register_state_dict_matcher
def match_condface(sd: dict) -> tuple[str, dict] | None:
    """Recognise a bare CondFace state_dict (``model.state_dict()`` saved without facetool's config):
    variant, depth, width, experts, groups, embedding and input size from the keys and shapes."""
    if not all(k in sd for k in ("conv1.weight", "fc.weight", "layer2.0.router.fc1.weight", "layer2.0.conv1.weight")):
        return None
    geometry = ir_geometry(sd)
    if geometry is None:
        return None
    depth, kwargs = geometry
    variant = "dgconv" if "layer2.0.project.weight" in sd else "dc"
    groups_m, experts = (int(s) for s in sd["layer2.0.conv1.weight"].shape[:2])
    if experts != 4:
        kwargs["experts"] = experts
    if variant == "dgconv" and groups_m != 4:
        kwargs["groups_m"] = groups_m
    return f"condface{'_dc' if variant == 'dc' else ''}_ir{depth}", kwargs
