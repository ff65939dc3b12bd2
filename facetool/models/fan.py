"""FAN: the stacked-hourglass face alignment network, in the module and key layout of the public
face-alignment code (1adrianb/face-alignment, ``face_alignment/models/fan.py``), so its published
``2DFAN4-*.pth.tar`` state_dicts and TorchScript ``2DFAN4-*.zip`` archives load key-exact.

Layout (``FAN(num_stacks)``; every ``ConvBlock`` is pre-activation BN-ReLU-3x3 to out/2, out/4, out/4,
the three outputs concatenated, plus the identity or a BN-ReLU-1x1 ``downsample``):

* stem: ``conv1`` 7x7 s2 (3->64, with bias) -> ``bn1`` -> ReLU -> ``conv2`` (64->128) -> avgpool 2
  -> ``conv3`` (128->128) -> ``conv4`` (128->256): S/4 px;
* stack i: ``m{i}`` HourGlass(depth 4) -> ``top_m_{i}`` -> ``conv_last{i}`` 1x1 -> ``bn_end{i}`` -> ReLU
  -> ``l{i}`` 1x1 (256->L): the stack's heatmaps (B, L, S/4, S/4); between stacks
  ``previous = previous + bl{i}(features) + al{i}(heatmaps)`` (no ``bl``/``al`` after the last stack).
* HourGlass level d (4..1): ``b1_d`` on the input (the skip), avgpool 2 -> ``b2_d`` -> level d-1
  (level 1: ``b2_plus_1``) -> ``b3_d`` -> nearest upsample x2, added to the skip.

Input: RGB (B, 3, S, S) in [0, 1] (the public code divides by 255; **not** facetool's (x-127.5)/127.5), S
divisible by 64. ``forward(x)`` returns the list of every stack's heatmaps, the last one final, as the
public code does; ``forward(x, return_internals=True)`` returns ``(heatmaps, internals)`` with, per stack i
(list index i = hourglass i+1; "h2l-2" of the FAN-Face thesis is index 1, module ``m1``):

* ``internals["h2l"][i]`` -- the high-to-low half: ``[b1_4, b2_4, b2_3, b2_2, b2_1]`` outputs, 256 channels
  at S/4, S/8, S/16, S/32, S/64 px (64, 32, 16, 8, 4 for S = 256);
* ``internals["l2h"][i]`` -- the low-to-high half: ``[b3_1, b3_2, b3_3, b3_4, m{i} output]``, 256 channels at
  S/64, S/32, S/16, S/8, S/4 px (4, 8, 16, 32, 64).

:func:`fan_tap` reads them by the thesis's names (``"h2l-2"``). CONTRACTS.md "Models" has the table.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from facetool.errors import FacetoolError
from facetool.models.base import HEATMAPS, FaceModel
from facetool.models.registry import register_model, register_state_dict_matcher

#: hourglass depth and width of the public FAN
DEPTH, FEATURES = 4, 256
MAX_STACKS = 4


class ConvBlock(nn.Module):
    """Pre-activation block: BN-ReLU-3x3 to out/2, out/4, out/4, the three concatenated, + the input
    (through BN-ReLU-1x1 when the widths differ). Key names as the public ``ConvBlock``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        half, quarter = cout // 2, cout // 4
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, half, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, quarter, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(quarter)
        self.conv3 = nn.Conv2d(quarter, quarter, 3, padding=1, bias=False)
        self.downsample: nn.Sequential | None = None
        if cin != cout:
            self.downsample = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o1 = self.conv1(F.relu(self.bn1(x)))
        o2 = self.conv2(F.relu(self.bn2(o1)))
        o3 = self.conv3(F.relu(self.bn3(o2)))
        skip = x if self.downsample is None else self.downsample(x)
        return torch.cat((o1, o2, o3), 1) + skip


class HourGlass(nn.Module):
    """Recursive hourglass of ``depth`` levels; modules registered in the public order (b1_d, b2_d, the
    level below, b3_d), so a state_dict lists its keys as the public one does."""

    def __init__(self, depth: int = DEPTH, features: int = FEATURES) -> None:
        super().__init__()
        self.depth = depth
        self._build(depth, features)

    def _build(self, level: int, features: int) -> None:
        self.add_module(f"b1_{level}", ConvBlock(features, features))
        self.add_module(f"b2_{level}", ConvBlock(features, features))
        if level > 1:
            self._build(level - 1, features)
        else:
            self.add_module(f"b2_plus_{level}", ConvBlock(features, features))
        self.add_module(f"b3_{level}", ConvBlock(features, features))

    def _level(self, level: int, x: torch.Tensor, h2l: list | None, l2h: list | None) -> torch.Tensor:
        up1 = self._modules[f"b1_{level}"](x)
        low1 = self._modules[f"b2_{level}"](F.avg_pool2d(x, 2, stride=2))
        if h2l is not None:
            if level == self.depth:
                h2l.append(up1)
            h2l.append(low1)
        if level > 1:
            low2 = self._level(level - 1, low1, h2l, l2h)
        else:
            low2 = self._modules[f"b2_plus_{level}"](low1)
        low3 = self._modules[f"b3_{level}"](low2)
        if l2h is not None:
            l2h.append(low3)
        return up1 + F.interpolate(low3, scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor, h2l: list | None = None, l2h: list | None = None) -> torch.Tensor:
        """The hourglass output; ``h2l`` / ``l2h`` lists, when given, receive the halves' features
        (see the module docstring for their order)."""
        out = self._level(self.depth, x, h2l, l2h)
        if l2h is not None:
            l2h.append(out)
        return out


class FAN(FaceModel):
    """The public face-alignment FAN with ``num_stacks`` hourglasses (1-4), ``num_landmarks`` heatmaps,
    for square inputs of ``input_size`` px (divisible by 64). ``width`` is the hourglass width (public: 256; the
    stem is width/4, width/2, width/2, width as 64, 128, 128, 256 there): smaller ones train fast on CPU.
    See the module docstring."""

    output_kind = HEATMAPS
    internal_names = ("h2l", "l2h")

    def __init__(self, num_stacks: int = 4, num_landmarks: int = 68, input_size: int = 256,
                 width: int = FEATURES) -> None:
        super().__init__()
        self.check_arguments(num_stacks, num_landmarks, input_size, width)
        self.num_stacks, self.num_landmarks, self.input_size, self.width = num_stacks, num_landmarks, input_size, width
        self.heatmap_size = input_size // 4
        self._build()

    @staticmethod
    def check_arguments(num_stacks: int, num_landmarks: int, input_size: int, width: int = FEATURES) -> None:
        """One-line errors for arguments no FAN can have (also checked by commands before any work)."""
        if isinstance(num_stacks, bool) or not isinstance(num_stacks, int) or not 1 <= num_stacks <= MAX_STACKS:
            raise FacetoolError(f"FAN: --stacks must be a whole number from 1 to {MAX_STACKS}, not {num_stacks!r}")
        if isinstance(num_landmarks, bool) or not isinstance(num_landmarks, int) or num_landmarks < 1:
            raise FacetoolError(f"FAN: the number of landmarks must be a positive whole number, not {num_landmarks!r}")
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 64 or input_size % 64:
            raise FacetoolError(f"FAN: --input-size must be a multiple of 64 (the stem halves twice and the "
                                f"hourglass four times), not {input_size!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 4 or width % 4:
            raise FacetoolError(f"FAN: --width must be a positive multiple of 4, not {width!r}")

    def _build(self) -> None:
        num_stacks, num_landmarks, w = self.num_stacks, self.num_landmarks, self.width
        self.conv1 = nn.Conv2d(3, w // 4, 7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(w // 4)
        self.conv2 = ConvBlock(w // 4, w // 2)
        self.conv3 = ConvBlock(w // 2, w // 2)
        self.conv4 = ConvBlock(w // 2, w)
        for i in range(num_stacks):
            self.add_module(f"m{i}", HourGlass(DEPTH, w))
            self.add_module(f"top_m_{i}", ConvBlock(w, w))
            self.add_module(f"conv_last{i}", nn.Conv2d(w, w, 1))
            self.add_module(f"bn_end{i}", nn.BatchNorm2d(w))
            self.add_module(f"l{i}", nn.Conv2d(w, num_landmarks, 1))
            if i < num_stacks - 1:
                self.add_module(f"bl{i}", nn.Conv2d(w, w, 1))
                self.add_module(f"al{i}", nn.Conv2d(num_landmarks, w, 1))
        per_stack = tuple(n for i in range(num_stacks) for n in (f"m{i}", f"top_m_{i}", f"bn_end{i}", f"l{i}"))
        self.layer_names = ("conv1", "conv2", "conv3", "conv4", *per_stack)
        self.cam_layer = f"bn_end{num_stacks - 1}"

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.avg_pool2d(self.conv2(x), 2, stride=2)
        return self.conv4(self.conv3(x))

    def _stacks(self, x: torch.Tensor, internals: dict | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        previous = self.stem(x)
        outputs: list[torch.Tensor] = []
        feats = previous
        if internals is not None:
            internals["h2l"], internals["l2h"] = [], []
        for i in range(self.num_stacks):
            h2l, l2h = ([], []) if internals is not None else (None, None)
            hg = self._modules[f"m{i}"](previous, h2l, l2h)
            if internals is not None:
                internals["h2l"].append(h2l)
                internals["l2h"].append(l2h)
            feats = F.relu(self._modules[f"bn_end{i}"](self._modules[f"conv_last{i}"](self._modules[f"top_m_{i}"](hg))))
            heat = self._modules[f"l{i}"](feats)
            outputs.append(heat)
            if i < self.num_stacks - 1:
                previous = previous + self._modules[f"bl{i}"](feats) + self._modules[f"al{i}"](heat)
        return outputs, feats

    def forward_features(self, x: torch.Tensor, internals: dict | None = None) -> torch.Tensor:
        """The last stack's feature map (B, 256, S/4, S/4), before its heatmap layer."""
        return self._stacks(x, internals)[1]

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """The last stack's heatmaps from its feature map."""
        return self._modules[f"l{self.num_stacks - 1}"](features)

    def forward(self, x: torch.Tensor, return_internals: bool = False):
        """Every stack's heatmaps (a list, the last one final), as the public FAN; with
        ``return_internals`` also the internals dict (``h2l``, ``l2h`` per stack)."""
        internals: dict | None = {} if return_internals else None
        outputs, _ = self._stacks(x, internals)
        return (outputs, internals) if return_internals else outputs

    def adapt_state_dict(self, sd: dict) -> dict:
        """A public-layout state_dict made to fit this model, as :func:`load_model` calls it before the
        key-exact check: files written before torch kept ``num_batches_tracked`` (all of them absent) get
        zeros, and a file with more stacks gives its first ``num_stacks`` (dropping the later stacks and the
        ``bl``/``al`` of the last kept one, as the FAN-Face thesis took a 2-stack FAN from the 4-stack one).
        Anything else is left for the key check to name."""
        return adapt_public_state_dict(sd, self.num_stacks)


def stacks_in(sd: dict) -> int:
    """The number of hourglass stacks of a FAN-layout state_dict (0 when it is none)."""
    found = {int(m.group(1)) for k in sd if (m := _STACK_KEY.match(k))}
    return max(found) + 1 if found else 0


_STACK_KEY = re.compile(r"^l(\d+)\.weight$")
_STACK_PREFIX = re.compile(r"^(m|top_m_|conv_last|bn_end|l|bl|al)(\d+)\.")


def adapt_public_state_dict(sd: dict, num_stacks: int) -> dict:
    """See :meth:`FAN.adapt_state_dict`."""
    out = dict(sd)
    if stacks_in(out) > num_stacks:
        def kept(k: str) -> bool:
            m = _STACK_PREFIX.match(k)
            if m is None:
                return True
            i = int(m.group(2))
            return i < num_stacks - (1 if m.group(1) in ("bl", "al") else 0)
        out = {k: v for k, v in out.items() if kept(k)}
    if not any(k.endswith(".num_batches_tracked") for k in out):
        for k in [k for k in out if k.endswith(".running_var")]:
            out[k.removesuffix("running_var") + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return out


def fan_tap(internals: dict, tap: str) -> list[torch.Tensor]:
    """The features a FAN-Face tap names: ``"h2l-K"`` / ``"l2h-K"`` -> the high-to-low / low-to-high half of
    hourglass K (1-based, the thesis's numbering: ``h2l-2`` is module ``m1``), from
    ``FAN(x, return_internals=True)``'s internals (orders: see the module docstring)."""
    m = re.fullmatch(r"(h2l|l2h)-(\d+)", tap)
    if m is None:
        raise FacetoolError(f"unknown FAN tap {tap!r}; use h2l-K or l2h-K (K = hourglass number, from 1)")
    half, k = m.group(1), int(m.group(2))
    stacks = internals.get(half) or []
    if not 1 <= k <= len(stacks):
        raise FacetoolError(f"FAN tap {tap!r}: this FAN has {len(stacks)} hourglass(es)")
    return stacks[k - 1]


def _fan(num_stacks: int, num_landmarks: int, input_size: int, width: int) -> FAN:
    return FAN(num_stacks=num_stacks, num_landmarks=num_landmarks, input_size=input_size, width=width)


@register_model("fan1", family="fan")
def fan1(num_landmarks: int = 68, input_size: int = 256, width: int = FEATURES) -> FAN:
    return _fan(1, num_landmarks, input_size, width)


@register_model("fan2", family="fan")
def fan2(num_landmarks: int = 68, input_size: int = 256, width: int = FEATURES) -> FAN:
    return _fan(2, num_landmarks, input_size, width)


@register_model("fan3", family="fan")
def fan3(num_landmarks: int = 68, input_size: int = 256, width: int = FEATURES) -> FAN:
    return _fan(3, num_landmarks, input_size, width)


@register_model("fan4", family="fan")
def fan4(num_landmarks: int = 68, input_size: int = 256, width: int = FEATURES) -> FAN:
    return _fan(4, num_landmarks, input_size, width)


def fan_name(num_stacks: int) -> str:
    """The registered name of the FAN with ``num_stacks`` hourglasses."""
    return f"fan{num_stacks}"


@register_state_dict_matcher
def match_fan(sd: dict) -> tuple[str, dict[str, Any]] | None:
    """Recognise a public-layout FAN state_dict (``2DFAN4-*.pth.tar``): stacks from the ``l{i}`` heads,
    landmarks from their width. The input size is not in the weights (any multiple of 64 works): 256."""
    if not all(k in sd for k in ("conv1.weight", "l0.weight")) or not any(k.startswith("m0.b") for k in sd):
        return None  # (a FAN with a few wrong keys still matches, so that the key check names them)
    n = stacks_in(sd)
    if not 1 <= n <= MAX_STACKS:
        return None
    head = sd.get(f"l{n - 1}.weight")
    if getattr(head, "ndim", 0) != 4:
        return None
    kw = {"num_landmarks": int(head.shape[0])}
    if int(head.shape[1]) != FEATURES:
        kw["width"] = int(head.shape[1])
    return fan_name(n), kw


def decode_heatmaps(heatmaps: torch.Tensor) -> torch.Tensor:
    """Heatmap-grid coordinates (B, L, 2) of (B, L, H, W) heatmaps, as face-alignment's ``get_preds_fromhm``:
    the argmax (first one on ties), as 1-based (col + 1, row + 1), moved 0.25 towards the larger neighbour
    in x and in y (the sign of the neighbour difference; only when 0 < col < W-1 and 0 < row < H-1), minus 0.5.
    Times ``S / W`` (4 for the FAN) gives the point in the input crop."""
    if heatmaps.ndim != 4:
        raise FacetoolError(f"heatmaps must be (B, L, H, W), not {tuple(heatmaps.shape)}")
    b, n, h, w = heatmaps.shape
    flat = heatmaps.detach().reshape(b, n, h * w)
    idx = flat.argmax(-1)
    col, row = idx % w, idx // w
    preds = torch.stack((col + 1, row + 1), -1).to(torch.float32)
    inside = (col > 0) & (col < w - 1) & (row > 0) & (row < h - 1)
    c, r = col.clamp(1, w - 2), row.clamp(1, h - 2)

    def at(rr: torch.Tensor, cc: torch.Tensor) -> torch.Tensor:
        return flat.gather(-1, (rr * w + cc).unsqueeze(-1)).squeeze(-1)

    dx = torch.sign(at(r, c + 1) - at(r, c - 1))
    dy = torch.sign(at(r + 1, c) - at(r - 1, c))
    preds += 0.25 * torch.stack((dx, dy), -1).to(torch.float32) * inside.unsqueeze(-1)
    return preds - 0.5


def heatmaps_to_landmarks(heatmaps: torch.Tensor, center: torch.Tensor | None = None,
                          scale: torch.Tensor | float | None = None, *, truncate: bool = True) -> torch.Tensor:
    """Landmarks (B, L, 2) in image coordinates from FAN heatmaps (B, L, H, W), exactly as the public
    decoding: :func:`decode_heatmaps`, then the inverse of the crop transform at the heatmap resolution r,
    ``t = [[r/h, 0, r(0.5 - c_x/h)], [0, r/h, r(0.5 - c_y/h)]]`` with ``h = 200 * scale``, i.e.
    ``x = h (p_x / r - 0.5) + c_x``; cast to whole numbers toward zero as the public code does (``truncate``;
    False keeps the fraction). ``center`` (B, 2) (or (2,)), ``scale`` (B,) (or a number): the crop of the
    public code (centre of the box, y moved up 0.12 of its height; scale (w + h) / 195). Without them the
    points are in the FAN's input crop (heatmap coordinates x 4 for the FAN, no truncation)."""
    preds = decode_heatmaps(heatmaps)
    b, _, hh, w = heatmaps.shape
    if center is None and scale is None:
        return preds * 4.0
    if center is None or scale is None:
        raise FacetoolError("heatmaps_to_landmarks needs both center and scale (or neither)")
    center = torch.as_tensor(center, dtype=torch.float64).reshape(-1, 2).expand(b, 2)
    scale = torch.as_tensor(scale, dtype=torch.float64).reshape(-1).expand(b)
    if hh != w:
        raise FacetoolError(f"heatmaps must be square to map back through the crop, not {hh}x{w}")
    h = (200.0 * scale).reshape(b, 1, 1)
    pts = h * (preds.to(torch.float64) / w - 0.5) + center.reshape(b, 1, 2)
    if truncate:
        pts = torch.trunc(pts)
    return pts.to(torch.float32)
