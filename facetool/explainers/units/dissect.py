"""Hierarchical Network Dissection (HND) of the units of any named layer, and bias discovery.

Given a :class:`~facetool.explainers.units.dictionary.FaceDictionary`, every unit (channel) of the
requested layers is paired with local concepts (parts / local attributes, grouped in facial
regions) and global concepts (categorical attributes), as in Teotia et al., "Interpreting Face
Inference Models using Hierarchical Network Dissection" (see ``shared/REFERENCE.md``):

1. **Thresholds** (pass 1 over the dictionary): per unit, the top-``quantile`` activation level of
   its feature maps over all images and positions (Network Dissection: 0.005; the published HND code
   used 0.05), estimated in bounded memory by a per-unit streaming histogram
   (:class:`TopQuantile`, error below one bin = range / 2048).
2. **IoU** (pass 2): each map is upsampled bilinearly to the mask size and thresholded
   (``> threshold``); IoU(u, c) = sum of intersections / sum of unions, accumulated only over the
   images that carry concept c. A unit is *localizable* ("interpretable") when its best IoU >= 0.04;
   its region is the region of its best concept.
3. **Probabilistic pairing** (stage 2) within that region: the region's images (carrying any of its
   concepts) are ranked by the unit's max activation in ascending order, ``rank_i = (position+1)/N``
   (the most activating image has rank 1; tied maxima share their mean rank), ``s_i = (max_i - min) /
   (max - min)`` with min/max of the unit's maps over all dictionary images; score(c) =
   sum over the region images carrying c of rank_i * s_i / #images carrying c, times IoU(u, c);
   P(c) = score / sum of the region's scores; the unit holds every concept with
   P(c) > 1.5 / |region| (a region with a single concept holds it, P = 1, since 1.5/1 is unreachable).
4. **Global concepts**: per attribute group (gender, age, ...), the images with a known value are
   ranked the same way (min/max over those images' maps), score(v) = sum over images with value v of
   rank_i * s_i / #images with v, normalised over the group's values; the unit is *biased* towards
   every value with P >= 1/k + 0.05 (k values: 0.55 for 2-way, 0.3 for 4-way groups as in HND), k the
   number of the group's values *present* among the dictionary's images (a vocabulary of 4 ages of
   which 2 appear is a 2-way group: with k = 4 both could pass 0.3 and the unit would be "biased" to
   both). A group with fewer than two values present is skipped, with a note.
   A unit that is not localizable but biased in some group is a *global* unit.

**Bias discovery**: a *link* (local concept c, subgroup g=v) is a unit that holds c and is biased
towards g=v. :func:`compare_dissections` ranks the links whose counts differ between two models.

Cost and memory. The model runs once: pass 1 keeps a (units x 2048) histogram per layer and a per-unit
top-k of images, writes the per-image max/min of every unit to an HDF5 scratch file (in blocks of rows)
and, when they fit ``cache_bytes`` on disk, the activations to a raw scratch file that pass 2 reads back
instead of running the model again. Pass 2 adds the batch's :func:`unit_concept_counts` ((units x
concepts) integer tallies, additive, so shards of the dictionary can be summed): only the blocks of pixels
whose map cells can reach the threshold are upsampled (exactly as :func:`upsample_maps` would), in a few
tensor ops per block position, on the model's device. Stages 2/3 read the scratch back in blocks of units
(1M values) and rank all units of a block at once. Memory does not grow with the number of images; the
results equal the per-unit implementation's bit for bit (``tests/dissect_reference.py``).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from facetool import distributed as fd
from facetool.devices import resolve_device
from facetool.errors import FacetoolError
from facetool.explainers.placement import upsample_weights
from facetool.explainers.units.dictionary import FaceDictionary, GlobalGroup
from facetool.hooks import taps

MAX_PREDICTED_VALUES = 12

IOU_THRESHOLD = 0.04
QUANTILE = 0.005
HND_CODE_QUANTILE = 0.05
KEEP_FACTOR = 1.5


def global_threshold(k: int) -> float:
    """HND's 'biased' level for a k-way group: 0.55 (k=2), 0.3 (k=4); 1/k + 0.05 in general. ``k`` is
    the number of values present in the dictionary (:func:`present_values`), not the vocabulary size."""
    return 1.0 / k + 0.05


def present_values(group: GlobalGroup) -> np.ndarray:
    """The codes of ``group``'s values that some dictionary image has (sorted; unknown -1 left out)."""
    codes = np.asarray(group.codes)
    return np.unique(codes[codes >= 0])


def group_note(group: GlobalGroup, n_images: int, predicted: bool = False) -> str | None:
    """Why ``group`` cannot be contrasted (fewer than two values present), or None when it can."""
    present = present_values(group)
    if len(present) >= 2:
        return None
    if len(present) == 0:
        why = f"no dictionary image has a known {group.name}"
    elif predicted:
        why = f"the model predicts one value ({group.values[int(present[0])]}) on all {n_images} dictionary images"
    else:
        why = f"only one value ({group.values[int(present[0])]}) is present among the {n_images} dictionary images"
    return f"global group '{group.name}' dropped: {why}, so no unit can be biased within it"


# ----------------------------------------------------------------------------------- quantiles
class TopQuantile:
    """Per-unit streaming estimate of the top-``q`` quantile in bounded memory.

    Each unit has a histogram of ``bins`` equal bins over ``[lo, lo + bins * width)``: ``lo`` is the
    unit's minimum in the first batch (values below it are only counted), and when a value lands
    above the range the width doubles (pairs of bins merge exactly) as often as needed. The quantile
    is interpolated linearly inside its bin, so the error is below one bin width."""

    def __init__(self, units: int, bins: int = 2048) -> None:
        if bins & (bins - 1):
            raise ValueError("bins must be a power of two")
        self.units, self.bins = units, bins
        self.counts = torch.zeros(units, bins, dtype=torch.float64)
        self.lo = torch.zeros(units, dtype=torch.float64)
        self.width = torch.ones(units, dtype=torch.float64)
        self.n = 0
        self.started = False

    def update(self, x: torch.Tensor) -> None:
        """``x``: (units, n) values."""
        x = x.detach().to(torch.float64).cpu()
        U, B = self.units, self.bins
        if not self.started:
            lo, hi = x.min(1).values, x.max(1).values
            span = hi - lo
            tiny = torch.clamp(lo.abs(), min=1.0) * 1e-6
            self.lo = lo
            self.width = torch.where(span > 0, span * (1 + 1e-9) / B, tiny / B) + 1e-12
            self.started = True
        top = x.max(1).values
        need = (top - self.lo) / (self.width * B)
        doublings = torch.where(need >= 1, torch.ceil(torch.log2(need.clamp(min=1.0)) + 1e-12), torch.zeros_like(need))
        # make sure the top value is strictly inside after doubling
        doublings = torch.where((need >= 1) & (self.lo + self.width * B * 2**doublings <= top), doublings + 1, doublings)
        for m in torch.unique(doublings[doublings > 0]).tolist():
            sel = doublings == m
            m = int(m)
            f = 2**m
            c = self.counts[sel]
            if f >= B:
                merged = torch.zeros_like(c)
                merged[:, 0] = c.sum(1)
            else:
                merged = torch.zeros_like(c)
                merged[:, : B // f] = c.view(-1, B // f, f).sum(-1)
            self.counts[sel] = merged
            self.width[sel] = self.width[sel] * f
        # bin of every value, -1 (a column dropped below) for values under the range (and NaN)
        idx = torch.nan_to_num_(torch.floor_((x - self.lo[:, None]).div_(self.width[:, None])), nan=-1.0)
        idx = idx.clamp_(-1, B - 1).long().add_(torch.arange(U)[:, None] * (B + 1) + 1)
        self.counts += torch.bincount(idx.reshape(-1), minlength=U * (B + 1)).view(U, B + 1)[:, 1:]
        self.n += x.shape[1]

    def quantile(self, q: float) -> torch.Tensor:
        """The level t per unit with a fraction ``q`` of all values above it."""
        k = q * self.n
        rev = self.counts.flip(1)
        cum = rev.cumsum(1)
        b = torch.searchsorted(cum, torch.full((self.units, 1), k, dtype=torch.float64)).squeeze(1).clamp(max=self.bins - 1)
        before = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)[:, None]).squeeze(1), torch.zeros_like(k + cum[:, 0]))
        inbin = rev.gather(1, b[:, None]).squeeze(1)
        frac = torch.where(inbin > 0, ((k - before) / inbin).clamp(0, 1), torch.zeros_like(inbin))
        top_edge = self.lo + self.width * (self.bins - b)  # upper edge of bin (bins-1-b)
        return (top_edge - frac * self.width).to(torch.float32)


# ----------------------------------------------------------------------------------- pairing maths
def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ascending ranks along the first axis (every column of a 2-D array on its own); tied values
    share the mean of their positions (NaNs tie with each other)."""
    x = np.asarray(x)
    if x.ndim == 1:
        return average_ranks(x[:, None])[:, 0]
    n = x.shape[0]
    order = np.argsort(x, axis=0, kind="stable")
    xs = np.take_along_axis(x, order, 0)
    new = np.ones(x.shape, bool)  # first of a run of equal values
    new[1:] = (xs[1:] != xs[:-1]) & ~(np.isnan(xs[1:]) & np.isnan(xs[:-1]))
    pos = np.broadcast_to(np.arange(n)[:, None], x.shape)
    start = np.maximum.accumulate(np.where(new, pos, 0), axis=0)
    last = np.ones(x.shape, bool)
    last[:-1] = new[1:]
    stop = np.minimum.accumulate(np.where(last, pos, n)[::-1], axis=0)[::-1]
    counts = stop - start + 1
    r = np.empty(x.shape, np.float64)
    np.put_along_axis(r, order, start + (counts + 1) / 2.0, 0)  # mean of 1-based positions start+1 .. start+count
    return r


def rank_activation_weights(maxima: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """rank_i * s_i for each image (rows) and unit (columns): images ranked ascending by max
    activation, rank = (position+1)/N (tied maxima share their mean rank); s = (max - lo) / (hi - lo) (0 for a constant unit)."""
    maxima = np.asarray(maxima, np.float64)
    rank = average_ranks(maxima) / maxima.shape[0]
    span = np.asarray(hi, np.float64) - np.asarray(lo, np.float64)
    s = np.where(span > 0, (maxima - lo) / np.where(span > 0, span, 1.0), 0.0)
    return rank * s


def concept_probabilities(weights: np.ndarray, carry: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """HND stage 2 for one unit over one region. ``weights`` (N,) = rank*s of the region's images,
    ``carry`` (N, K) bool, ``iou`` (K,). Returns P (K,) (zeros when every score is 0)."""
    carry = np.asarray(carry, bool)
    n_c = carry.sum(0)
    score = np.where(n_c > 0, (carry.T.astype(np.float64) @ weights) / np.maximum(n_c, 1), 0.0) * np.asarray(iou)
    tot = score.sum()
    return score / tot if tot > 0 else np.zeros_like(score)


def keep_threshold(region_size: int) -> float:
    return KEEP_FACTOR / region_size


def kept(prob: np.ndarray) -> np.ndarray:
    """Concepts a unit holds in a region: P > 1.5/|region| (a one-concept region: its concept)."""
    prob = np.asarray(prob)
    if len(prob) == 1:
        return prob > 0
    return prob > keep_threshold(len(prob))


def group_probabilities(weights: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
    """HND global stage for one unit and group: ``weights`` (N,) rank*s over the images with a known
    value, ``codes`` (N,) in 0..k-1. P(v) = [sum_{code=v} w / #code=v] normalised over values. With
    ``weights`` (N, b), the b units at once: P is (k, b), each column as the unit alone would get it."""
    codes = np.asarray(codes)
    weights = np.asarray(weights, np.float64)
    if weights.ndim == 1:
        return group_probabilities(weights[:, None], codes, k)[:, 0]
    sums = np.zeros((k, weights.shape[1]))
    np.add.at(sums, codes, weights)  # row by row in order, as bincount adds
    n = np.bincount(codes, minlength=k)[:, None]
    score = np.where(n > 0, sums / np.maximum(n, 1), 0.0)
    # the 1-D sum of each column (numpy sums 8 or more values pairwise)
    tot = score.sum(0) if k < 8 else np.array([c.sum() for c in np.ascontiguousarray(score.T)])
    return np.where(tot > 0, score / np.where(tot > 0, tot, 1.0), 0.0)


# ----------------------------------------------------------------------------------- results
@dataclass
class UnitResult:
    unit: int
    best_concept: str
    best_iou: float
    kind: str  # "local" | "global" | "none"
    region: str = ""
    threshold: float = 0.0
    probs: dict[str, float] = field(default_factory=dict)  # region concept -> P
    concepts: list[str] = field(default_factory=list)  # kept local concepts
    ious: dict[str, float] = field(default_factory=dict)  # region concept -> IoU
    globals: dict[str, dict[str, float]] = field(default_factory=dict)  # group -> value -> P
    biased: list[str] = field(default_factory=list)  # "group=value"
    top_images: list[int] = field(default_factory=list)  # dictionary rows, most activating first

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class LayerResult:
    layer: str
    units: list[UnitResult]
    shape: tuple[int, int, int]  # (units, h, w)
    iou: np.ndarray  # (U, K)

    def counts(self, concepts) -> dict[str, int]:
        kinds = {c.name: c.kind for c in concepts}
        c = {"units": len(self.units), "local": 0, "part": 0, "attribute": 0, "global": 0, "none": 0}
        for u in self.units:
            c[u.kind] += 1
            if any(kinds.get(n) == "part" for n in u.concepts):
                c["part"] += 1
            if any(kinds.get(n) == "attribute" for n in u.concepts):
                c["attribute"] += 1
        return c

    def links(self) -> dict[tuple[str, str], int]:
        """(local concept, "group=value") -> number of units holding the concept and biased to the value."""
        out: dict[tuple[str, str], int] = {}
        for u in self.units:
            for c in u.concepts:
                for b in u.biased:
                    out[(c, b)] = out.get((c, b), 0) + 1
        return out

    def subgroup_probs(self) -> dict[tuple[str, str], list[float]]:
        """(local concept, "group=value") -> P(value) of every unit holding the concept."""
        out: dict[tuple[str, str], list[float]] = {}
        for u in self.units:
            for c in u.concepts:
                for g, probs in u.globals.items():
                    for v, p in probs.items():
                        out.setdefault((c, f"{g}={v}"), []).append(p)
        return out

    def concept_units(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for u in self.units:
            for c in u.concepts:
                out[c] = out.get(c, 0) + 1
        return out


@dataclass
class Dissection:
    layers: dict[str, LayerResult]
    dictionary: dict
    settings: dict
    timing: dict
    notes: list[str] = field(default_factory=list)  # what was dropped and why (global groups ...)

    def tally(self, concepts) -> list[dict]:
        rows = []
        for name, lr in self.layers.items():
            for u in lr.units:
                rows.append({"layer": name, "unit": u.unit, "kind": u.kind, "region": u.region,
                             "concepts": ";".join(u.concepts),
                             "probabilities": ";".join(f"{c}={u.probs[c]:.3f}" for c in u.concepts),
                             "best_concept": u.best_concept, "best_iou": round(u.best_iou, 5),
                             "biased": ";".join(u.biased), "threshold": u.threshold})
        return rows

    def to_json(self) -> dict:
        return {"settings": self.settings, "dictionary": self.dictionary, "timing": self.timing, "notes": self.notes,
                "layers": {n: {"shape": list(lr.shape), "units": [u.to_dict() for u in lr.units],
                               "links": [{"concept": c, "subgroup": g, "units": n_}
                                         for (c, g), n_ in sorted(lr.links().items(), key=lambda t: -t[1])]}
                           for n, lr in self.layers.items()}}


# ----------------------------------------------------------------------------------- streaming
def _model_input(images: np.ndarray, size: int | None, device) -> torch.Tensor:
    from facetool.data.transforms import normalize

    x = normalize(images).to(device)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def _check_layers(model, layers: Sequence[str]) -> list[str]:
    names = list(getattr(model, "layer_names", ()) or ())
    if not names:
        raise FacetoolError(f"model {getattr(model, 'name', type(model).__name__)} names no layers to dissect")
    out = []
    for name in layers:
        model.get_layer(name)  # unknown -> FacetoolError listing the names
        if name not in out:
            out.append(name)
    if not out:
        raise FacetoolError(f"no layer given; the model has: {', '.join(names)}")
    return out


def prediction_heads(model) -> list[tuple[str, list[str], slice]]:
    """The model's own categorical outputs as global groups: (group name, value names, logit slice).

    Attribute classifiers (their task, :func:`facetool.tasks.task_of`; CONTRACTS.md "Tasks") give
    one group per attribute, named ``"<attribute> (predicted)"`` with the attribute's vocabulary; other
    classifiers (``output_kind`` classification, CONTRACTS.md "Models") with at most 12 classes give
    ``"predicted"`` with values ``class 0 ...``; identity/embedding models none."""
    from facetool.tasks import task_of

    cfg = getattr(model, "config", {}) or {}
    task = task_of(model)
    if task.kind in ("attribute", "attributes"):
        out, a = [], 0
        for name, k, vocab in zip(task.names, task.classes, task.vocab):
            out.append((f"{name} (predicted)", [str(v) for v in vocab][:k] or [str(i) for i in range(k)], slice(a, a + k)))
            a += k
        return out
    k = cfg.get("num_classes")
    is_classifier = getattr(model, "output_kind", "classification") == "classification"
    if is_classifier and isinstance(k, int) and 2 <= k <= MAX_PREDICTED_VALUES:
        return [("predicted", [f"class {i}" for i in range(k)], slice(0, k))]
    return []


class _TopK:
    """Running top-k (value, row) per unit."""

    def __init__(self, units: int, k: int) -> None:
        self.k = k
        self.val = torch.full((units, k), -math.inf)
        self.row = torch.full((units, k), -1, dtype=torch.long)

    def update(self, maxima: torch.Tensor, rows: torch.Tensor) -> None:  # maxima (B, U)
        v = torch.cat([self.val, maxima.T.float()], 1)
        r = torch.cat([self.row, rows[None].expand(maxima.shape[1], -1)], 1)
        top = v.topk(min(self.k, v.shape[1]), dim=1)
        self.val, self.row = top.values, r.gather(1, top.indices)


def _interpolation_blocks(weights: torch.Tensor, g: int = 1) -> list[torch.Tensor]:
    """For each tile of ``g`` map rows (columns) from j = t*g, the output rows (columns) whose interpolation
    starts in it: they read cells j .. j + g only (:func:`cell_weights` puts 1 - w on a first cell, w < 1 on
    the next)."""
    first = (weights > 0).to(torch.int8).argmax(1) // g
    return [torch.nonzero(first == t).flatten() for t in range(-(-weights.shape[1] // g))]


@dataclass
class BatchMasks:
    """A batch's concept masks in the form the IoU counts use: every pixel's *pattern* (which of the K masks
    hold it; a face has a few dozen patterns), built once per batch and shared by all layers."""

    size: tuple[int, int]
    pattern: torch.Tensor  # (B * H * W,) int64: pattern of pixel p of image b at b * H * W + p
    members: torch.Tensor  # (patterns, K) float64 0/1
    carry: torch.Tensor  # (B, K) float64 0/1: image b carries concept k
    area: torch.Tensor  # (K,) int64: pixels of the concept's masks

    @classmethod
    def of(cls, masks: torch.Tensor, size: tuple[int, int]) -> "BatchMasks":
        """From boolean ``masks`` (B, K, H, W) or (B, K, H*W)."""
        B, K = masks.shape[:2]
        flat = masks.reshape(B, K, -1).bool()
        if K <= 62:
            packed = (flat.to(torch.int64) << torch.arange(K, device=masks.device)[None, :, None]).sum(1)
            codes, pattern = torch.unique(packed.reshape(-1), return_inverse=True)
            members = (codes[:, None] >> torch.arange(K, device=masks.device)[None]) & 1
        else:
            members, pattern = torch.unique(flat.transpose(1, 2).reshape(-1, K), dim=0, return_inverse=True)
        return cls(size, pattern.reshape(-1), members.double(), flat.any(-1).double(), flat.sum((0, 2), dtype=torch.int64))


def unit_concept_counts(maps: torch.Tensor, masks: torch.Tensor | BatchMasks, thresholds: torch.Tensor,
                        size: tuple[int, int], input_size: tuple[int, int] | None = None, *,
                        mem_elements: int = 1 << 23) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The IoU counts of one batch, additive over batches (and over shards of the dictionary).

    ``maps`` (B, U, h, w) unit activations, ``masks`` (B, K, H, W) boolean concept masks (or their
    :class:`BatchMasks`), ``thresholds`` (U,). Each map is upsampled bilinearly onto the (H, W) image
    (:func:`upsample_maps`, ``input_size`` the model's input) and thresholded (``> threshold``). Returns int64
    counts on the maps' device: ``inter`` (U, K) = pixels where unit u is on inside concept k's mask,
    ``covered`` (U, K) = pixels where u is on in the images carrying k, ``area`` (K,) = pixels of k's masks.
    IoU(u, k) = inter / (covered + area - inter) over the summed counts.

    Vectorised and exact: the image is cut into one block of pixels per map cell (j, k), the pixels whose
    interpolation reads cells j..j+1 x k..k+1 only; a bilinear value is a convex combination of the cells it
    reads, so a block none of whose cells reaches the threshold (less the rounding of the interpolation) has
    no pixel above it. Per block position (tiles of blocks on fine maps), the (image, unit) maps that may pass
    are upsampled together on that block alone (the same einsum as :func:`upsample_maps` on a subset of its
    rows and columns: the same arithmetic, the same pixels pass); their pixels above threshold are counted per
    (unit, mask pattern) and per (image, unit), and two small products turn the counts into ``inter`` and
    ``covered``."""
    B, U, h, w = maps.shape
    H, W = size
    P = H * W
    dev = maps.device
    bm = masks if isinstance(masks, BatchMasks) else BatchMasks.of(masks.to(dev), size)
    n_pat = bm.members.shape[0]
    on_pattern = torch.zeros(U * n_pat, dtype=torch.int64, device=dev)  # pixels on, per (unit, pattern)
    on_image = torch.zeros(B * U, dtype=torch.int64, device=dev)  # pixels on, per (image, unit)
    if B and U:
        maps = maps.float()
        thresholds = thresholds.to(dev, torch.float32)
        mag = torch.maximum(maps.abs().reshape(B, U, -1).amax(-1), thresholds.abs()[None])
        hot = maps >= (thresholds[None] - 1e-5 * mag)[..., None, None]  # cells that may put a pixel above threshold
        hot[:, :, :-1] |= hot[:, :, 1:].clone()  # block (j, k) reads cells j..j+1, k..k+1
        hot[..., :-1] |= hot[..., 1:].clone()
        # blocks grouped in tiles of g x g (at most 8 x 8 tiles: few einsums on fine maps)
        g = -(-max(h, w) // 8)
        th, tw = -(-h // g), -(-w // g)
        hot = F.pad(hot, (0, tw * g - w, 0, th * g - h)).view(B, U, th, g, tw, g).any(5).any(3)
        wy, wx = upsample_weights((h, w), size, input_size)
        wy, wx = wy.to(maps), wx.to(maps)
        rows, cols = _interpolation_blocks(wy, g), _interpolation_blocks(wx, g)
        for j, k in hot.any(1).any(0).nonzero().tolist():  # tile positions where some map may pass
            rj, ck = rows[j].to(dev), cols[k].to(dev)
            if not len(rj) or not len(ck):
                continue
            bi, ui = hot[:, :, j, k].nonzero(as_tuple=True)
            step = max(1, mem_elements // (len(rj) * len(ck)))
            for s in range(0, len(bi), step):
                b, u = bi[s:s + step], ui[s:s + step]
                up = torch.einsum("ij,bajk,lk->bail", wy[rj], maps[b, u][None], wx[ck])[0]  # (n, |rj|, |ck|)
                pair, ii, ll = (up > thresholds[u][:, None, None]).nonzero(as_tuple=True)
                if len(pair):
                    bp, up_ = b[pair], u[pair]
                    pat = bm.pattern[bp * P + rj[ii] * W + ck[ll]]
                    on_pattern += torch.bincount(up_ * n_pat + pat, minlength=U * n_pat)
                    on_image += torch.bincount(bp * U + up_, minlength=B * U)
    # exact: integer counts far below 2**53
    inter = (on_pattern.view(U, n_pat).double() @ bm.members).round().long()
    covered = (on_image.view(B, U).double().T @ bm.carry).round().long()
    return inter, covered, bm.area


class _Scratch:
    """Per-layer scratch on disk: per-image max/min of every unit (HDF5, written in blocks of rows) and,
    within ``cache_bytes``, the activations themselves (a raw float32 file, one block per batch), so the IoU
    pass reads them back instead of running the model again. Page cache, not process memory, holds them."""

    def __init__(self, folder: Path, name: str, n: int, shape: tuple[int, int, int], h5, cache: bool,
                 block_elements: int = 1 << 19) -> None:
        U = shape[0]
        self.rows = max(1, min(n, block_elements // max(1, U)))
        ch = (self.rows, U)
        self.max = h5.create_dataset(f"{name}/max", (n, U), np.float32, chunks=ch)
        self.min = h5.create_dataset(f"{name}/min", (n, U), np.float32, chunks=ch)
        self.buf = np.empty((2, self.rows, U), np.float32)
        self.r0, self.fill = 0, 0
        self.shape = shape
        self.path = folder / f"{name.replace('/', '_')}.f32" if cache else None
        self.file = open(self.path, "wb") if cache else None

    def add(self, mx: np.ndarray, mn: np.ndarray, maps: torch.Tensor | None) -> None:
        """Append the next images' maxima/minima (B, U) and maps (B, U, h, w) (rows come in order)."""
        i = 0
        while i < len(mx):
            j = min(len(mx), i + self.rows - self.fill)
            self.buf[0, self.fill:self.fill + j - i] = mx[i:j]
            self.buf[1, self.fill:self.fill + j - i] = mn[i:j]
            self.fill += j - i
            i = j
            if self.fill == self.rows:
                self.flush()
        if self.file is not None and maps is not None:
            np.ascontiguousarray(maps.cpu().numpy(), np.float32).tofile(self.file)

    def flush(self) -> None:
        if self.fill:
            self.max[self.r0:self.r0 + self.fill] = self.buf[0, :self.fill]
            self.min[self.r0:self.r0 + self.fill] = self.buf[1, :self.fill]
            self.r0 += self.fill
            self.fill = 0

    def finish(self) -> None:
        self.flush()
        if self.file is not None:
            self.file.close()
            self.file = open(self.path, "rb")

    def maps(self, n: int, device) -> torch.Tensor:
        """The next ``n`` images' cached maps, in the order they were written."""
        count = n * int(np.prod(self.shape))
        a = np.fromfile(self.file, np.float32, count=count)
        if a.size != count:
            raise FacetoolError(f"dissection scratch file {self.path} is truncated")
        return torch.from_numpy(a.reshape(n, *self.shape)).to(device)

    def skip(self, n: int) -> None:
        """Pass over the next ``n`` images' cached maps (another rank counts them)."""
        self.file.seek(n * int(np.prod(self.shape)) * 4, 1)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def dissect_units(
    model,
    dictionary: FaceDictionary,
    layers: Sequence[str],
    *,
    quantile: float = QUANTILE,
    iou_threshold: float = IOU_THRESHOLD,
    batch_size: int = 32,
    device: str | None = None,
    top_images: int = 6,
    scratch_dir: str | Path | None = None,
    mem_elements: int = 1 << 23,
    cache_bytes: int = 4 << 30,
    progress=None,
    predictions: bool = True,
) -> Dissection | None:
    """Dissect the units of ``layers`` of ``model`` on ``dictionary`` (two passes, bounded memory).

    Pass 1 runs the model: thresholds, per-image maxima/minima and top images, and the activations to a
    scratch file when they take at most ``cache_bytes`` on disk; pass 2 reads them back (else runs the
    model again) with the concept masks and accumulates :func:`unit_concept_counts`.

    Under ``torchrun`` every rank runs pass 1 (its streaming quantile sketch depends on the batch order, so
    the thresholds are the one-process ones) and counts its share of pass 2's batches; the counts are
    integers, summed over the ranks exactly. Rank 0 gets the Dissection, the other ranks None."""
    import h5py

    if not 0.0 < quantile < 0.5:
        raise FacetoolError(f"--quantile must be in (0, 0.5), got {quantile}")
    if not 0.0 < iou_threshold < 1.0:
        raise FacetoolError(f"--iou-threshold must be in (0, 1), got {iou_threshold}")
    if batch_size < 1:
        raise FacetoolError(f"--batch-size must be >= 1, got {batch_size}")
    layers = _check_layers(model, layers)
    dev = torch.device(resolve_device(device))
    was_training = model.training
    model.eval()
    in_size = (getattr(model, "config", {}) or {}).get("input_size")
    H, W = dictionary.size
    in_size = int(in_size) if in_size and int(in_size) != H else None
    N, K = len(dictionary), len(dictionary.concepts)
    model_dev = next(iter(model.parameters()), torch.empty(0)).device
    moved = model_dev != dev and any(True for _ in model.parameters())
    if moved:
        model.to(dev)
    t0 = time.perf_counter()
    pred_groups: list[GlobalGroup] = []
    timing: dict[str, float] = {}
    sketches: dict[str, TopQuantile] = {}
    shapes: dict[str, tuple[int, int, int]] = {}
    scratch: dict[str, _Scratch] = {}
    topk: dict[str, _TopK] = {}
    tmp = tempfile.TemporaryDirectory(prefix="dissect_", dir=scratch_dir)
    h5 = h5py.File(Path(tmp.name) / "maxima.h5", "w")
    try:
        # ---- pass 1: per-unit thresholds, per-image max/min, top images, activations to the scratch file
        # (and the model's predictions, a global group of their own)
        heads = prediction_heads(model) if predictions else []
        pred = np.full((len(heads), N), -1, np.int64)
        cached = False
        with torch.no_grad(), taps(model, layers, detach=True, first=True) as found:
            for bi, b in enumerate(dictionary.batches(batch_size, masks=False)):
                out = model(_model_input(b.images, in_size, dev))
                if heads and isinstance(out, torch.Tensor) and out.dim() == 2:
                    for h, (_, _, sl) in enumerate(heads):
                        pred[h, b.rows] = out[:, sl].argmax(1).cpu().numpy()
                B = len(b.rows)
                for name in layers:
                    a = found[name]
                    if a.dim() != 4:
                        raise FacetoolError(f"layer {name} outputs shape {tuple(a.shape)}, not a (batch, units, h, w) map")
                    if name not in sketches:
                        sketches[name] = TopQuantile(a.shape[1])
                        shapes[name] = (int(a.shape[1]), int(a.shape[2]), int(a.shape[3]))
                if bi == 0:
                    cached = N * sum(4 * int(np.prod(s)) for s in shapes.values()) <= cache_bytes
                    for name in layers:
                        scratch[name] = _Scratch(Path(tmp.name), name, N, shapes[name], h5, cached)
                        topk[name] = _TopK(shapes[name][0], top_images)
                rows_t = torch.from_numpy(b.rows.astype(np.int64))
                for name in layers:
                    a = found[name].float()
                    U = a.shape[1]
                    sketches[name].update(a.transpose(0, 1).reshape(U, -1))
                    flat = a.reshape(B, U, -1)
                    mx = flat.amax(-1).cpu()
                    scratch[name].add(mx.numpy(), flat.amin(-1).cpu().numpy(), a if cached else None)
                    topk[name].update(mx, rows_t)
                if progress:
                    progress("thresholds", (bi + 1) * batch_size, N)
        for s in scratch.values():
            s.finish()
        thr = {n: sketches[n].quantile(quantile).to(dev) for n in layers}
        # a group (stored or predicted) needs at least two values present to contrast
        notes: list[str] = []
        for g in dictionary.groups:
            note = group_note(g, N)
            if note:
                notes.append(note)
        for h, (gname, vals, _) in enumerate(heads):
            g = GlobalGroup(gname, vals, pred[h])
            note = group_note(g, N, predicted=True) if (pred[h] >= 0).all() else \
                f"global group '{gname}' dropped: the model's output is not one row of logits per image"
            if note:
                notes.append(note)
            else:
                pred_groups.append(g)
        dictionary.groups.extend(pred_groups)
        timing["pass1_s"] = time.perf_counter() - t0
        # ---- pass 2: IoU counts from the cached activations (or a second forward pass) and the masks
        t1 = time.perf_counter()
        inter = {n: torch.zeros(shapes[n][0], K, dtype=torch.int64, device=dev) for n in layers}
        covered = {n: torch.zeros(shapes[n][0], K, dtype=torch.int64, device=dev) for n in layers}
        area = torch.zeros(K, dtype=torch.int64, device=dev)
        carry_all = np.zeros((N, K), bool)
        out_size = (in_size or H, in_size or W)
        with torch.no_grad(), (contextlib.nullcontext({}) if cached else
                               taps(model, layers, detach=True, first=True)) as found:
            mine = {int(r[0]) for r in fd.sharded_batches(N, batch_size, pad=False) if len(r)} \
                if fd.sharded() else None
            for bi, start in enumerate(range(0, N, batch_size)):
                rows = np.arange(start, min(N, start + batch_size))
                B = len(rows)
                if mine is not None and start not in mine:  # another rank's batch
                    if cached:
                        for name in layers:
                            scratch[name].skip(B)
                    continue
                b = dictionary.batch(rows)
                if not cached:
                    model(_model_input(b.images, in_size, dev))
                bm = BatchMasks.of(torch.from_numpy(b.masks).to(dev), (H, W))
                carry_all[b.rows] = b.masks.reshape(B, K, -1).any(-1)
                for li, name in enumerate(layers):
                    a = scratch[name].maps(B, dev) if cached else found[name]
                    i_, c_, a_ = unit_concept_counts(a, bm, thr[name], (H, W), out_size, mem_elements=mem_elements)
                    inter[name] += i_
                    covered[name] += c_
                    if li == 0:
                        area += a_
                if progress:
                    progress("IoU", (bi + 1) * batch_size, N)
        if mine is not None:  # the integer counts and carried concepts of every rank, summed exactly
            for t in [*inter.values(), *covered.values(), area]:
                fd.all_reduce(t)
            carried = torch.from_numpy(carry_all.astype(np.uint8))
            carry_all = fd.all_reduce(carried, "max").numpy().astype(bool)
            if not fd.is_main():
                return None
        timing["pass2_s"] = time.perf_counter() - t1
        timing["activations_cached"] = cached
        dictionary.carry = carry_all
        # ---- stage 1-3 from the accumulated counts and the scratch file
        t2 = time.perf_counter()
        results: dict[str, LayerResult] = {}
        for name in layers:
            i_ = inter[name].double()
            union = covered[name].double() + area.double()[None] - i_
            iou = torch.where(union > 0, i_ / union.clamp(min=1e-12), torch.zeros_like(union)).cpu().numpy()
            results[name] = _pair_layer(name, iou, scratch[name].max, scratch[name].min, dictionary,
                                        iou_threshold, thr[name].cpu().numpy(), topk[name], shapes[name])
        timing["pairing_s"] = time.perf_counter() - t2
    finally:
        for s in scratch.values():
            s.close()
        h5.close()
        tmp.cleanup()
        for g in pred_groups:
            dictionary.groups.remove(g)
        if moved:
            model.to(model_dev)
        model.train(was_training)
    timing["total_s"] = time.perf_counter() - t0
    timing["images"] = N
    timing["images_per_s"] = N / max(timing["pass1_s"] + timing["pass2_s"], 1e-9)
    settings = {"layers": list(layers), "quantile": quantile, "iou_threshold": iou_threshold,
                "keep_factor": KEEP_FACTOR, "batch_size": batch_size, "device": str(dev),
                "global_threshold": "1/k + 0.05, k = the group's values present in the dictionary "
                                    "(0.55 for 2 values, 0.3 for 4)"}
    summary = dictionary.summary()
    summary["groups"] += [{"name": g.name, "values": g.values, "predicted": True,
                           "images": {v: int((g.codes == i).sum()) for i, v in enumerate(g.values)}} for g in pred_groups]
    return Dissection(results, summary, settings, timing, notes)


def _read_block(ds, u0: int, u1: int) -> np.ndarray:
    return ds[:, u0:u1]


def _pair_layer(name, iou, ds_max, ds_min, dictionary: FaceDictionary, iou_threshold: float, thr: np.ndarray,
                topk: _TopK, shape, mem_elements: int = 1 << 19) -> LayerResult:
    concepts = dictionary.concepts
    carry = dictionary.carry
    U = iou.shape[0]
    N = carry.shape[0]
    K = len(concepts)
    regions = dictionary.regions
    region_rows = {r: np.flatnonzero(carry[:, ks].any(1)) for r, ks in regions.items()}
    best = iou.argmax(1) if K else np.zeros(U, int)
    units: list[UnitResult] = []
    for u in range(U):
        bi = float(iou[u, best[u]]) if K else 0.0
        units.append(UnitResult(u, concepts[best[u]].name if K else "", bi, "none", threshold=float(thr[u]),
                                top_images=[int(r) for r, v in zip(topk.row[u].tolist(), topk.val[u].tolist())
                                            if r >= 0 and math.isfinite(v)]))
    block = max(1, min(U, mem_elements // max(1, N)))
    for u0 in range(0, U, block):
        u1 = min(U, u0 + block)
        mx = _read_block(ds_max, u0, u1).astype(np.float64)  # (N, b)
        mn = _read_block(ds_min, u0, u1).astype(np.float64)
        lo_all, hi_all = mn.min(0), mx.max(0)
        # stage 2: local pairing in the best concept's region (the block's units of one region ranked at once)
        local = [j for j in range(u1 - u0) if K and units[u0 + j].best_iou >= iou_threshold]
        for reg in sorted({concepts[best[u0 + j]].region for j in local}):
            js = [j for j in local if concepts[best[u0 + j]].region == reg]
            ks = regions[reg]
            rows = region_rows[reg]
            carry_r = carry[np.ix_(rows, ks)]
            w = rank_activation_weights(mx[rows][:, js], lo_all[js], hi_all[js])
            for jj, j in enumerate(js):
                u = u0 + j
                ur = units[u]
                p = concept_probabilities(np.ascontiguousarray(w[:, jj]), carry_r, iou[u, ks])
                keep = kept(p)
                ur.kind, ur.region = "local", reg
                ur.probs = {concepts[k].name: float(p[i]) for i, k in enumerate(ks)}
                ur.ious = {concepts[k].name: float(iou[u, k]) for k in ks}
                ur.concepts = [concepts[k].name for i, k in enumerate(ks) if keep[i]]
        # stage 3: global groups (every unit)
        for g in dictionary.groups:
            known = np.flatnonzero(g.codes >= 0)
            present = present_values(g)
            if len(present) < 2:  # nothing to contrast (dissect_units notes it)
                continue
            k = len(g.values)
            lo, hi = mn[known].min(0), mx[known].max(0)
            w = rank_activation_weights(mx[known], lo, hi)  # (n, b)
            probs = group_probabilities(w, g.codes[known], k)  # (k, b)
            thr_g = global_threshold(len(present))  # over the values present, not the vocabulary
            for j, u in enumerate(range(u0, u1)):
                p = probs[:, j]
                units[u].globals[g.name] = {v: float(p[i]) for i, v in enumerate(g.values)}
                units[u].biased += [f"{g.name}={g.values[i]}" for i in present if p[i] >= thr_g]
    for ur in units:
        if ur.kind != "local" and ur.biased:
            ur.kind = "global"
    return LayerResult(name, units, tuple(shape), iou)


# ----------------------------------------------------------------------------------- comparison
def _group_sizes(d: Dissection) -> dict[str, int]:
    """k of every global group: its values present in the dictionary (the vocabulary size where the
    counts are not recorded)."""
    out = {}
    for g in d.dictionary.get("groups", []):
        n = g.get("images")
        out[g["name"]] = max(1, sum(1 for c in n.values() if c > 0)) if isinstance(n, dict) else len(g["values"])
    return out


def compare_dissections(a: Dissection, b: Dissection, names: tuple[str, str] = ("A", "B")) -> list[dict]:
    """Concept-subgroup links per layer in ``a`` vs ``b``: units holding a local concept and biased to a
    subgroup (count and share of the layer's units), and the mean P(subgroup) of the units holding the
    concept (1/k when none does). Ranked by the difference of the linked share, then of the mean P."""
    rows = []
    ka = {**_group_sizes(b), **_group_sizes(a)}
    for layer in a.layers:
        if layer not in b.layers:
            continue
        la, lb = a.layers[layer], b.layers[layer]
        xa, xb = la.links(), lb.links()
        pa, pb = la.subgroup_probs(), lb.subgroup_probs()
        ca, cb = la.concept_units(), lb.concept_units()
        for key in sorted(set(xa) | set(xb) | set(pa) | set(pb)):
            k = ka.get(key[1].split("=")[0], 2)
            na, nb = xa.get(key, 0), xb.get(key, 0)
            fa, fb = na / max(1, len(la.units)), nb / max(1, len(lb.units))
            ma = float(np.mean(pa[key])) if key in pa else 1.0 / k
            mb = float(np.mean(pb[key])) if key in pb else 1.0 / k
            rows.append({"layer": layer, "concept": key[0], "subgroup": key[1], f"units {names[0]}": na,
                         f"units {names[1]}": nb, f"holding {names[0]}": ca.get(key[0], 0),
                         f"holding {names[1]}": cb.get(key[0], 0),
                         f"mean P {names[0]}": round(ma, 4), f"mean P {names[1]}": round(mb, 4),
                         "difference": round(fa - fb, 5), "P difference": round(ma - mb, 4)})
    rows.sort(key=lambda r: (-abs(r["difference"]), -abs(r["P difference"]), r["layer"], r["concept"], r["subgroup"]))
    return rows


def link_strength(d: Dissection, concept: str, subgroup: str) -> dict[str, float]:
    """How strongly ``d``'s units tie a local concept to a subgroup, over all dissected layers:
    ``share`` = fraction of units holding the concept and biased to the subgroup; ``excess`` = mean over
    the units holding the concept of P(subgroup) - 1/k (0 when no unit holds it)."""
    k = _group_sizes(d).get(subgroup.split("=")[0], 2)
    n = sum(len(lr.units) for lr in d.layers.values())
    linked = sum(lr.links().get((concept, subgroup), 0) for lr in d.layers.values())
    ps = [p for lr in d.layers.values() for p in lr.subgroup_probs().get((concept, subgroup), [])]
    return {"share": linked / max(1, n), "excess": float(np.mean(ps)) - 1.0 / k if ps else 0.0,
            "units": len(ps), "linked": linked}


def as_serialisable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): as_serialisable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [as_serialisable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


# ----------------------------------------------------------------------------------- whole command
def parse_layers(text: str | Sequence[str]) -> list[str]:
    names = [x.strip() for x in (text.split(",") if isinstance(text, str) else text) if x and x.strip()]
    if not names:
        raise FacetoolError("--layers needs at least one layer name, e.g. layer3,layer4")
    return names
