"""The unit dissection as it was before vectorisation (facetool 0.3 development, commit b784f86), frozen
verbatim as the reference that :mod:`facetool.explainers.units.dissect` must reproduce exactly: per-batch
upsampling of every unit map in chunks of units, thresholding, a (B, U, P) x (B, P, K) product per chunk,
a second forward pass for the IoU, and a per-unit rank loop in the pairing. Not used by facetool."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from facetool.devices import resolve_device
from facetool.errors import FacetoolError
from facetool.explainers.placement import upsample_maps
from facetool.explainers.units.dictionary import FaceDictionary, GlobalGroup
from facetool.explainers.units.dissect import (
    IOU_THRESHOLD,
    KEEP_FACTOR,
    QUANTILE,
    Dissection,
    LayerResult,
    UnitResult,
    _check_layers,
    _model_input,
    concept_probabilities,
    global_threshold,
    group_note,
    kept,
    prediction_heads,
    present_values,
)
from facetool.hooks import taps


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
        idx = torch.floor((x - self.lo[:, None]) / self.width[:, None])
        keep = idx >= 0
        idx = idx.clamp(0, B - 1).long() + (torch.arange(U)[:, None] * B)
        flat = torch.bincount(idx[keep], minlength=U * B).to(torch.float64)
        self.counts += flat.view(U, B)
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



def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ascending ranks; tied values share the mean of their positions."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    _, start, counts = np.unique(xs, return_index=True, return_counts=True)
    mean_pos = start + (counts + 1) / 2.0  # mean of 1-based positions start+1 .. start+count
    r = np.empty(len(x), np.float64)
    r[order] = np.repeat(mean_pos, counts)
    return r


def rank_activation_weights(maxima: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """rank_i * s_i for each image (rows) and unit (columns): images ranked ascending by max
    activation, rank = (position+1)/N (tied maxima share their mean rank); s = (max - lo) / (hi - lo) (0 for a constant unit)."""
    maxima = np.asarray(maxima, np.float64)
    N = maxima.shape[0]
    rank = np.empty_like(maxima)
    for j in range(maxima.shape[1]):
        rank[:, j] = average_ranks(maxima[:, j]) / N
    span = np.asarray(hi, np.float64) - np.asarray(lo, np.float64)
    s = np.where(span > 0, (maxima - lo) / np.where(span > 0, span, 1.0), 0.0)
    return rank * s



def group_probabilities(weights: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
    """HND global stage for one unit and group: ``weights`` (N,) rank*s over the images with a known
    value, ``codes`` (N,) in 0..k-1. P(v) = [sum_{code=v} w / #code=v] normalised over values."""
    codes = np.asarray(codes)
    sums = np.bincount(codes, weights=weights, minlength=k)
    n = np.bincount(codes, minlength=k)
    score = np.where(n > 0, sums / np.maximum(n, 1), 0.0)
    tot = score.sum()
    return score / tot if tot > 0 else np.zeros(k)


def iou_counts(maps, masks, thresholds, size, input_size=None, mem_elements=1 << 23):
    """The per-batch IoU sums exactly as the reference ``dissect_units`` accumulates them (inter, covered, area)."""
    B, U = maps.shape[:2]
    H, W = size
    P = H * W
    cm = masks.reshape(B, -1, P).float()
    carry = cm.amax(-1)
    inter = torch.zeros(U, cm.shape[1], dtype=torch.float64)
    mcar = torch.zeros(U, cm.shape[1], dtype=torch.float64)
    step = max(1, min(U, mem_elements // max(1, B * P)))
    for u0 in range(0, U, step):
        u1 = min(U, u0 + step)
        up = upsample_maps(maps[:, u0:u1].float(), (H, W), input_size)
        m = (up > thresholds[u0:u1, None, None]).reshape(B, u1 - u0, P).float()
        inter[u0:u1] += torch.bmm(m, cm.transpose(1, 2)).sum(0).double()
        mcar[u0:u1] += (m.sum(-1).T @ carry).double()
    return inter, mcar, cm.sum((0, 2)).double()


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
    progress=None,
    predictions: bool = True,
) -> Dissection:
    """Dissect the units of ``layers`` of ``model`` on ``dictionary`` (two passes, bounded memory)."""
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
    try:
        # ---- pass 1: per-unit thresholds (and the model's predictions, a global group of their own)
        heads = prediction_heads(model) if predictions else []
        pred = np.full((len(heads), N), -1, np.int64)
        with torch.no_grad(), taps(model, layers, detach=True, first=True) as found:
            for bi, b in enumerate(dictionary.batches(batch_size, masks=False)):
                out = model(_model_input(b.images, in_size, dev))
                if heads and isinstance(out, torch.Tensor) and out.dim() == 2:
                    for h, (_, _, sl) in enumerate(heads):
                        pred[h, b.rows] = out[:, sl].argmax(1).cpu().numpy()
                for name in layers:
                    a = found[name]
                    if a.dim() != 4:
                        raise FacetoolError(f"layer {name} outputs shape {tuple(a.shape)}, not a (batch, units, h, w) map")
                    if name not in sketches:
                        sketches[name] = TopQuantile(a.shape[1])
                        shapes[name] = (int(a.shape[1]), int(a.shape[2]), int(a.shape[3]))
                    sketches[name].update(a.float().transpose(0, 1).reshape(a.shape[1], -1))
                if progress:
                    progress("thresholds", (bi + 1) * batch_size, N)
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
        # ---- pass 2: IoU, per-image max/min (scratch), top images
        t1 = time.perf_counter()
        tmp = tempfile.TemporaryDirectory(prefix="dissect_", dir=scratch_dir)
        scratch = h5py.File(Path(tmp.name) / "maxima.h5", "w")
        inter = {n: torch.zeros(shapes[n][0], K, dtype=torch.float64, device=dev) for n in layers}
        mcar = {n: torch.zeros(shapes[n][0], K, dtype=torch.float64, device=dev) for n in layers}
        carea = torch.zeros(K, dtype=torch.float64, device=dev)
        topk = {n: _TopK(shapes[n][0], top_images) for n in layers}
        for n in layers:
            U = shapes[n][0]
            ch = (max(1, min(N, 256)), U)
            scratch.create_dataset(f"{n}/max", (N, U), np.float32, chunks=ch)
            scratch.create_dataset(f"{n}/min", (N, U), np.float32, chunks=ch)
        P = H * W
        carry_all = np.zeros((N, K), bool)
        with torch.no_grad(), taps(model, layers, detach=True, first=True) as found:
            for bi, b in enumerate(dictionary.batches(batch_size)):
                model(_model_input(b.images, in_size, dev))
                B = len(b.rows)
                cm = torch.from_numpy(b.masks.reshape(B, K, P)).to(dev, torch.float32)  # (B, K, P)
                carry = cm.amax(-1)  # (B, K)
                carry_all[b.rows] = carry.cpu().numpy() > 0
                carea += cm.sum((0, 2)).double()
                rows_t = torch.from_numpy(b.rows.astype(np.int64))
                r0, r1 = int(b.rows[0]), int(b.rows[-1]) + 1
                for name in layers:
                    a = found[name].float()
                    U = a.shape[1]
                    flat = a.reshape(B, U, -1)
                    mx, mn = flat.amax(-1), flat.amin(-1)
                    scratch[f"{name}/max"][r0:r1] = mx.cpu().numpy()
                    scratch[f"{name}/min"][r0:r1] = mn.cpu().numpy()
                    topk[name].update(mx.cpu(), rows_t)
                    step = max(1, min(U, mem_elements // max(1, B * P)))
                    for u0 in range(0, U, step):
                        u1 = min(U, u0 + step)
                        up = upsample_maps(a[:, u0:u1], (H, W), (in_size or H, in_size or W))
                        m = (up > thr[name][u0:u1, None, None]).reshape(B, u1 - u0, P).float()
                        inter[name][u0:u1] += torch.bmm(m, cm.transpose(1, 2)).sum(0).double()
                        mcar[name][u0:u1] += (m.sum(-1).T @ carry).double()
                if progress:
                    progress("IoU", (bi + 1) * batch_size, N)
        timing["pass2_s"] = time.perf_counter() - t1
        dictionary.carry = carry_all
        # ---- stage 1-3 from the accumulated sums and the scratch file
        t2 = time.perf_counter()
        results: dict[str, LayerResult] = {}
        for name in layers:
            union = mcar[name] + carea[None] - inter[name]
            iou = torch.where(union > 0, inter[name] / union.clamp(min=1e-12), torch.zeros_like(union)).cpu().numpy()
            results[name] = _pair_layer(name, iou, scratch[f"{name}/max"], scratch[f"{name}/min"], dictionary,
                                        iou_threshold, thr[name].cpu().numpy(), topk[name], shapes[name])
        timing["pairing_s"] = time.perf_counter() - t2
        scratch.close()
        tmp.cleanup()
    finally:
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
                topk: _TopK, shape, mem_elements: int = 1 << 24) -> LayerResult:
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
        # stage 2: local pairing in the best concept's region
        for j, u in enumerate(range(u0, u1)):
            ur = units[u]
            if K == 0 or ur.best_iou < iou_threshold:
                continue
            reg = concepts[best[u]].region
            ks = regions[reg]
            rows = region_rows[reg]
            w = rank_activation_weights(mx[rows, j:j + 1], lo_all[j], hi_all[j])[:, 0]
            p = concept_probabilities(w, carry[np.ix_(rows, ks)], iou[u, ks])
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
            codes = g.codes[known]
            thr_g = global_threshold(len(present))  # over the values present, not the vocabulary
            for j, u in enumerate(range(u0, u1)):
                p = group_probabilities(w[:, j], codes, k)
                units[u].globals[g.name] = {v: float(p[i]) for i, v in enumerate(g.values)}
                units[u].biased += [f"{g.name}={g.values[i]}" for i in present if p[i] >= thr_g]
    for ur in units:
        if ur.kind != "local" and ur.biased:
            ur.kind = "global"
    return LayerResult(name, units, tuple(shape), iou)


