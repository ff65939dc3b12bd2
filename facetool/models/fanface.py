"""FAN-Face (thesis ch. 3): a frozen face-alignment network (FAN, :mod:`facetool.models.fan`) inside an
IR-ResNet (ArcFace) recogniser, one model with the usual interface (``output_kind`` embedding,
``forward_features`` / ``forward_head``, named stages ``frn.layer1..4``).

* The FAN is frozen: eval mode (also when the wrapper is ``.train()``-ed), ``requires_grad`` False, run under
  ``torch.no_grad``. It sees the recogniser's input (normalised 112 crop in [-1, 1]) de-normalised to RGB
  [0, 1] and resized (bilinear) to its own input size (256 for the public FAN).
* ``input_heatmaps`` (Eq. 3.1): ``h2`` stacks the heatmaps of hourglass 2 (the 51 internal points of iBUG 68,
  no jaw; all points for other conventions), resized bilinearly to 112 px, with the image: conv1 takes
  3 + 51 = 54 channels. ``h2+`` also concatenates them, resized, to the input of each of the 4 stages (the
  recogniser's resolution drops): each stage's first block takes C + 51 channels. ``none``: 3 channels.
* ``integration`` (Eq. 3.2): ``ỹ_k = y_k + γ · f(x_l, y_k)`` with x_l a FAN tap (``h2l-2``: the high-to-low
  half of hourglass 2, ``l2h-2``: its low-to-high half), its four largest maps paired with stages 1..4 in order
  (at 256 px: 64, 32, 16, 8 px with 56, 28, 14, 7 px) and resized (bilinear) to y_k. ``mode`` ``1-1``: one
  integration at the end of each stage; ``1-m``: one after every block of each stage. γ is a learnable scalar
  per integration, **initialised to 0** (the thesis leaves it open): training starts from the recogniser
  itself and fades the FAN features in, and γ = 0 gives the recogniser without integration exactly.
  f (AdaIN eps 1e-5, statistics per channel over space):

  - ``bl``: BN(x_l) → 1×1 (C_l→C_k) → AdaIN to y_k → concat with y_k → 1×1 (2C_k→C_k) → BN → PReLU;
  - ``sl``: as BL but AdaIN's output is added to y_k (1×1 C_k→C_k);
  - ``al``: as BL with the second 1×1 a bottleneck 1×1 (2C_k→C_k/2) → BN → PReLU → 3×3 → BN → PReLU → 1×1 (→C_k).
* ``multitask`` (the thesis's multi-task baseline): a heatmap head after the last stage (1×1 C_4→L, bilinear to
  the FAN's heatmap size) trained with 0.1·L2 against the FAN's hourglass-2 heatmaps
  (``internals["heatmap_pred"]`` / ``internals["fan_heatmaps"]``; :class:`facetool.trainers.fanface`).

The checkpoint is one facetool checkpoint: ``config["fan"]`` is the FAN's config (name and arguments) and
the state_dict holds both networks (``fan.*``, ``frn.*``), so ``load_model`` rebuilds it. ``frozen_parts``
names the FAN for :func:`facetool.flops.flops_summary`, which reports its cost apart (Table 3.2 counts without it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from facetool.errors import FacetoolError
from facetool.models.base import EMBEDDING, FaceModel
from facetool.models.registry import register_model

INPUT_HEATMAPS = ("none", "h2", "h2+")
INTEGRATIONS = ("none", "bl", "sl", "al")
TAPS = ("h2l-2", "l2h-2")
MODES = ("1-1", "1-m")
#: the multi-task baseline's heatmap loss weight (thesis: 0.1 x L2)
MULTITASK_WEIGHT = 0.1
ADAIN_EPS = 1e-5
#: hourglass 2 (0-based stack index 1) gives the heatmaps and the taps
HOURGLASS = 2


def _choice(value: str, allowed: tuple[str, ...], option: str) -> str:
    v = str(value).lower()
    if v not in allowed:
        raise FacetoolError(f"unknown {option} {value!r}; use one of {' | '.join(allowed)}")
    return v


def adain(content: torch.Tensor, style: torch.Tensor, eps: float = ADAIN_EPS) -> torch.Tensor:
    """Adaptive instance normalisation: ``content`` normalised per sample and channel over space, then given
    ``style``'s per-channel mean and standard deviation."""
    cm, cv = content.mean((2, 3), keepdim=True), content.var((2, 3), keepdim=True, unbiased=False)
    sm, sv = style.mean((2, 3), keepdim=True), style.var((2, 3), keepdim=True, unbiased=False)
    return (content - cm) / torch.sqrt(cv + eps) * torch.sqrt(sv + eps) + sm


class Integration(nn.Module):
    """One integration layer f(x_l, y) of Eq. 3.2 (``kind`` bl | sl | al, see the module docstring); the
    layer returns ``y + gamma * f(x_l, y)``, the shape of y."""

    def __init__(self, kind: str, fan_channels: int, channels: int, gamma: float = 0.0) -> None:
        super().__init__()
        self.kind = kind
        self.bn_in = nn.BatchNorm2d(fan_channels)
        self.proj = nn.Conv2d(fan_channels, channels, 1, bias=False)
        cin = channels if kind == "sl" else 2 * channels
        if kind == "al":
            mid = max(channels // 2, 1)
            self.fuse = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.PReLU(mid),
                                      nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.PReLU(mid),
                                      nn.Conv2d(mid, channels, 1, bias=False))
        else:
            self.fuse = nn.Conv2d(cin, channels, 1, bias=False)
        self.bn_out = nn.BatchNorm2d(channels)
        self.prelu = nn.PReLU(channels)
        self.gamma = nn.Parameter(torch.tensor(float(gamma)))

    def branch(self, x_l: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """f(x_l, y): x_l resized to y's size (bilinear) first."""
        if x_l.shape[-2:] != y.shape[-2:]:
            x_l = F.interpolate(x_l, size=y.shape[-2:], mode="bilinear", align_corners=False)
        a = adain(self.proj(self.bn_in(x_l)), y)
        z = a + y if self.kind == "sl" else torch.cat((a, y), 1)
        return self.prelu(self.bn_out(self.fuse(z)))

    def forward(self, x_l: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.gamma * self.branch(x_l, y)


class FanFace(FaceModel):
    """FAN-Face: a frozen FAN + an IR-ResNet recogniser (see the module docstring)."""

    output_kind = EMBEDDING
    layer_names = ("frn.layer1", "frn.layer2", "frn.layer3", "frn.layer4")
    cam_layer = "frn.layer4"
    frozen_parts = ("fan",)
    internal_names = ("fan_heatmaps", "heatmap_pred")

    def __init__(self, fan: dict, network: str = "iresnet34", embedding_size: int = 512, input_size: int = 112,
                 width: int = 64, input_heatmaps: str = "none", integration: str = "bl", taps: str = "h2l-2",
                 mode: str = "1-1", multitask: bool = False, gamma: float = 0.0) -> None:
        super().__init__()
        from facetool.models.fan import FAN
        from facetool.models.registry import create_model, model_family, resolve_model_name

        self.input_heatmaps = _choice(input_heatmaps, INPUT_HEATMAPS, "--input-heatmaps")
        self.integration = _choice(integration, INTEGRATIONS, "--integration")
        self.taps = _choice(taps, TAPS, "--taps")
        self.mode = _choice(mode, MODES, "--mode")
        self.multitask = bool(multitask)
        if not isinstance(fan, dict) or not isinstance(fan.get("name"), str):
            raise FacetoolError("FAN-Face needs the FAN's config (a dict with its 'name')")
        fan_kw = {k: v for k, v in fan.items() if k not in ("name", "task")}
        if model_family(fan["name"]) != "fan":
            raise FacetoolError(f"FAN-Face: {fan['name']!r} is not a FAN (fan1..fan4)")
        fan_model = create_model(fan["name"], **fan_kw)
        assert isinstance(fan_model, FAN)
        if fan_model.num_stacks < HOURGLASS:
            raise FacetoolError(f"FAN-Face reads hourglass {HOURGLASS} (heatmaps and the h2l-2 / l2h-2 taps); this FAN "
                                f"has {fan_model.num_stacks} stack(s): train one with --stacks 2 or more")
        self.fan = fan_model
        for p in self.fan.parameters():
            p.requires_grad_(False)
        self.fan.eval()
        name = resolve_model_name(network, family="recognition", option="--network")
        if not name.startswith("iresnet"):
            raise FacetoolError(f"FAN-Face's recogniser is an IR-ResNet (r18 .. r200), not {network!r}")
        kw: dict[str, Any] = {"embedding_size": embedding_size, "input_size": input_size}
        if width != 64:
            kw["width"] = width
        self.frn = create_model(name, **kw)
        self.input_size, self.embedding_size = input_size, embedding_size
        L = fan_model.num_landmarks
        #: the heatmap channels used: the 51 internal points (no jaw 0-16) of iBUG 68, else every point
        self.points = list(range(17, 68)) if L == 68 else list(range(L))
        P = len(self.points)
        widths = [self.frn.layer1[0].conv1.out_channels, self.frn.layer2[0].conv1.out_channels,
                  self.frn.layer3[0].conv1.out_channels, self.frn.layer4[0].conv1.out_channels]
        from facetool.models.iresnet import IBasicBlock

        if self.input_heatmaps != "none":
            w0 = self.frn.conv1.out_channels
            self.frn.conv1 = nn.Conv2d(3 + P, w0, 3, padding=1, bias=False)
            nn.init.normal_(self.frn.conv1.weight, 0, 0.1)
        if self.input_heatmaps == "h2+":
            cin = self.frn.conv1.out_channels
            for k, w in enumerate(widths, 1):
                stage = getattr(self.frn, f"layer{k}")
                stage[0] = IBasicBlock(cin + P, w, stride=2)
                cin = w
            self.frn._init_weights()
        c_l = fan_model.width
        if self.integration != "none":
            depth = [len(getattr(self.frn, f"layer{k}")) for k in range(1, 5)]
            per = [1] * 4 if self.mode == "1-1" else depth
            self.integrations = nn.ModuleList(
                nn.ModuleList(Integration(self.integration, c_l, w, gamma) for _ in range(n)) for w, n in zip(widths, per))
            if self.mode == "1-m":
                for k in range(1, 5):
                    stage = _IntegratedStage(*getattr(self.frn, f"layer{k}"))
                    object.__setattr__(stage, "integrations", self.integrations[k - 1])  # not registered twice
                    setattr(self.frn, f"layer{k}", stage)
        if self.multitask:
            self.heatmap_head = nn.Conv2d(widths[-1], P, 1)

    # -- the frozen FAN ------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "FanFace":
        super().train(mode)
        self.fan.eval()  # frozen: its BatchNorm keeps its statistics
        return self

    def fan_input(self, x: torch.Tensor) -> torch.Tensor:
        """The recogniser's input (normalised, [-1, 1]) as the FAN wants it: RGB [0, 1] at its input size."""
        s = self.fan.input_size
        x = x[:, :3] * 0.5 + 0.5
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        return x

    def run_fan(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Hourglass 2's heatmaps (the used points) and the tap's four maps for stages 1..4 (largest first)."""
        from facetool.models.fan import fan_tap

        with torch.no_grad():
            heat, internals = self.fan(self.fan_input(x), return_internals=True)
            h = heat[HOURGLASS - 1][:, self.points]
            maps = sorted(fan_tap(internals, self.taps), key=lambda t: -t.shape[-1])[:4]
        return h.detach(), [m.detach() for m in maps]

    # -- the model interface -------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, internals: dict | None = None) -> torch.Tensor:
        need_fan = self.input_heatmaps != "none" or self.integration != "none" or self.multitask
        h, taps = self.run_fan(x) if need_fan else (None, [])
        frn = self.frn
        y = x
        if self.input_heatmaps != "none":
            y = torch.cat((x, _resize(h, x.shape[-2:])), 1)
        y = frn.prelu(frn.bn1(frn.conv1(y)))
        for k in range(4):
            if self.input_heatmaps == "h2+":
                y = torch.cat((y, _resize(h, y.shape[-2:])), 1)
            stage = getattr(frn, f"layer{k + 1}")
            if isinstance(stage, _IntegratedStage):  # 1-m: integration after every block, inside the stage
                object.__setattr__(stage, "tap", taps[k])
                try:
                    y = stage(y)
                finally:
                    object.__setattr__(stage, "tap", None)
            else:
                y = stage(y)  # the stage module itself runs, so hooks on the named stages see its output
            if self.integration != "none" and self.mode == "1-1":
                y = self.integrations[k][0](taps[k], y)
        if internals is not None and h is not None:
            internals["fan_heatmaps"] = h
            if self.multitask:
                internals["heatmap_pred"] = _resize(self.heatmap_head(y), h.shape[-2:])
        return y

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.frn.forward_head(features)

    def gammas(self) -> list[float]:
        """The integration layers' γ, stage by stage (empty without integration)."""
        if self.integration == "none":
            return []
        return [float(m.gamma.detach()) for stage in self.integrations for m in stage]


class _IntegratedStage(nn.Sequential):
    """A stage's blocks (the same keys as the IR-ResNet's ``nn.Sequential``) with a 1-M integration after each;
    the integration layers are owned by :class:`FanFace` (``integrations``) and the tap is set per forward."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        for block, integration in zip(self, self.integrations):
            y = integration(self.tap, block(y))
        return y


def _resize(t: torch.Tensor, size) -> torch.Tensor:
    size = tuple(int(s) for s in size)
    return t if tuple(t.shape[-2:]) == size else F.interpolate(t, size=size, mode="bilinear", align_corners=False)


@register_model("fanface", family="fanface")
def fanface(fan: dict, network: str = "iresnet34", embedding_size: int = 512, input_size: int = 112, width: int = 64,
            input_heatmaps: str = "none", integration: str = "bl", taps: str = "h2l-2", mode: str = "1-1",
            multitask: bool = False, gamma: float = 0.0) -> FanFace:
    """FAN-Face: the FAN of config ``fan`` (frozen) + an IR-ResNet recogniser ``network``."""
    return FanFace(fan, network, embedding_size, input_size, width, input_heatmaps, integration, taps, mode,
                   multitask, gamma)
