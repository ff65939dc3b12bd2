"""Validating relevance maps: perturbation curves (MoRF / LeRF / random, AOPC), relevance mass per
part mask, masking by relevance."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facetool.errors import FacetoolError
from facetool.explainers.relevance.targets import Explained, forward

FILLS = ("mean", "blur", "black")


ORDERS = ("morf", "lerf", "random")


def _fill(x: Tensor, fill: str) -> Tensor:
    from facetool.data.transforms import MEAN, STD

    if fill == "mean":
        return x.mean((2, 3), keepdim=True).expand_as(x)
    if fill == "black":
        return torch.full_like(x, (0.0 - MEAN) / STD)
    if fill == "blur":
        from torchvision.transforms.functional import gaussian_blur

        k = max(3, int(round(x.shape[-1] / 8)) | 1)
        return gaussian_blur(x, [k, k], [k / 3.0, k / 3.0])
    raise FacetoolError(f"unknown --fill {fill!r}; use one of {', '.join(FILLS)}")


def region_scores(maps: Tensor, patch: int) -> Tensor:
    """(B, h*w) region relevance: the map summed over ``patch`` x ``patch`` cells (patch 1 = pixels)."""
    if patch <= 1:
        return maps.flatten(1)
    return F.avg_pool2d(maps[:, None], patch, patch, ceil_mode=True)[:, 0].flatten(1)


def removal_masks(order: Tensor, counts: Sequence[int], grid: tuple[int, int], patch: int,
                  size: tuple[int, int]) -> Tensor:
    """(K, B, 1, H, W) masks (1 = removed) of the first ``counts[k]`` regions in ``order`` (B, R)."""
    B, R = order.shape
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(R).expand(B, R))
    out = []
    for n in counts:
        m = (rank < n).float().view(B, 1, *grid)
        if patch > 1:
            m = m.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[..., : size[0], : size[1]]
        out.append(m)
    return torch.stack(out)


def perturbation_curves(model: nn.Module, x: Tensor, maps: np.ndarray | Tensor, what: Explained, *,
                        steps: int = 10, max_fraction: float = 0.5, patch: int = 8, fill: str = "mean",
                        seed: int = 0, batch: int = 64, sharded: bool = False) -> dict | None:
    """Scores (B, steps + 1) after removing 0 .. ``max_fraction`` of the image in MoRF, LeRF and a
    random order; returns ``{"fractions", "morf", "lerf", "random", "aopc_*"}``.

    ``sharded`` (under ``torchrun``): the perturbed images' forward batches (the same ``batch``-sized
    batches as one process) are split over the ranks and gathered in order on rank 0, which gets the
    one-process result; the other ranks get None."""
    from facetool import distributed as fd
    from facetool.explainers.lrp import eval_mode

    if steps < 1 or not 0.0 < max_fraction <= 1.0:
        raise FacetoolError("--steps must be >= 1 and --max-fraction in (0, 1]")
    if patch < 1 or patch > min(x.shape[-2:]):
        raise FacetoolError(f"--patch must be between 1 and the image size {min(x.shape[-2:])}, got {patch}")
    maps_t = torch.as_tensor(np.asarray(maps), dtype=torch.float32)
    B, _, H, W = x.shape
    scores_r = region_scores(maps_t, patch)
    grid = (math.ceil(H / patch), math.ceil(W / patch)) if patch > 1 else (H, W)
    R = scores_r.shape[1]
    counts = [int(round(R * max_fraction * k / steps)) for k in range(steps + 1)]
    g = torch.Generator().manual_seed(int(seed) + 1)
    orders = {
        "morf": torch.sort(scores_r, dim=1, descending=True, stable=True).indices,
        "lerf": torch.sort(scores_r, dim=1, descending=False, stable=True).indices,
        "random": torch.stack([torch.randperm(R, generator=g) for _ in range(B)]),
    }
    filled = _fill(x, fill)
    res: dict = {"fractions": [c / R for c in counts]}
    with eval_mode(model), torch.no_grad():
        for name, order in orders.items():
            masks = removal_masks(order, counts, grid, patch, (H, W))  # (K, B, 1, H, W)
            xs = (x[None] * (1 - masks) + filled[None] * masks).flatten(0, 1)
            whats = [what] * (steps + 1)
            if sharded:
                parts = fd.map_sharded(len(xs), lambda idx: forward(model, xs[int(idx[0]):int(idx[-1]) + 1]),
                                       batch_size=batch)
                if parts is None:  # another rank's share, gathered on rank 0
                    continue
                out = torch.cat(parts)
            else:
                out = torch.cat([forward(model, xs[i:i + batch]) for i in range(0, len(xs), batch)])
            sc = torch.cat([w.score(out[k * B:(k + 1) * B]) for k, w in enumerate(whats)]).view(steps + 1, B).T
            res[name] = sc.numpy()
            res[f"aopc_{name}"] = float((sc[:, :1] - sc).mean().item())
    return res if fd.is_main() or not sharded else None


def part_mass(maps: np.ndarray, masks: dict[str, np.ndarray]) -> list[dict]:
    """Per part: mean share of the positive relevance inside the part, mean area share, their ratio
    (over the images where the part is visible)."""
    pos = np.clip(np.asarray(maps, np.float64), 0, None)
    total = pos.sum((1, 2))
    rows = []
    for part, m in masks.items():
        m = np.asarray(m, bool)
        area = m.mean((1, 2))
        ok = (area > 0) & (total > 0)
        if not ok.any():
            continue
        share = (pos * m).sum((1, 2))[ok] / total[ok]
        rows.append({"part": part, "images": int(ok.sum()), "relevance_share": float(share.mean()),
                     "area_share": float(area[ok].mean()), "ratio": float(share.mean() / area[ok].mean())})
    return rows


def resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of (B, H, W) boolean masks to ``size``."""
    if masks.shape[-1] == size:
        return masks
    t = torch.as_tensor(masks[:, None].astype(np.float32))
    return F.interpolate(t, size=(size, size), mode="nearest")[:, 0].numpy() > 0.5


Scorer = Callable[[Tensor], Tensor]


def mask_by_map(x: Tensor, maps: Tensor, fraction: float, patch: int, fill: str) -> Tensor:
    """``x`` with the ``fraction`` most relevant patches of ``maps`` (resized to x) replaced by ``fill``."""
    H, W = x.shape[-2:]
    m = maps[:, None].float()
    if m.shape[-2:] != (H, W):
        m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)
    scores = region_scores(m[:, 0], patch)
    grid = (math.ceil(H / patch), math.ceil(W / patch)) if patch > 1 else (H, W)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    k = int(round(scores.shape[1] * fraction))
    masks = removal_masks(order, [k], grid, patch, (H, W))[0]
    return x * (1 - masks) + _fill(x, fill) * masks
