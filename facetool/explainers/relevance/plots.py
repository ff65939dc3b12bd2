"""Figures of a relevance run: overlay grid, mean maps per attribute value, perturbation curves."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from torch import Tensor

from facetool.explainers.relevance.maps import normalise
from facetool.explainers.relevance.metrics import ORDERS


def plot_overlays(out: Path, images: Tensor, maps: np.ndarray, signed: bool, grid: int, title: str) -> Path:
    from facetool.explainers.dissect import _plt, _savefig

    plt = _plt()
    n = min(grid, len(maps))
    cols = min(8, n)
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows), squeeze=False)
    nm = normalise(maps[:n])
    imgs = ((images[:n].permute(0, 2, 3, 1).numpy() + 1) / 2).clip(0, 1)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(imgs[i].mean(-1), cmap="gray", vmin=0, vmax=1)
        ax.imshow(nm[i], cmap="bwr" if signed else "jet", vmin=-1 if signed else 0, vmax=1, alpha=0.55)
    fig.suptitle(title, fontsize=8)
    return _savefig(fig, out)


def plot_mean_maps(out: Path, means: dict, signed: bool) -> Path | None:
    from facetool.explainers.dissect import _plt, _savefig

    if not means:
        return None
    plt = _plt()
    rows = len(means)
    cols = max(len(v) for v in means.values())
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 1.8 * rows), squeeze=False)
    for r, (attr, vals) in enumerate(means.items()):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(vals):
                (val, (m, cnt)) = list(vals.items())[c]
                v = np.abs(m).max() or 1.0
                ax.imshow(m / v, cmap="bwr" if signed else "jet", vmin=-1 if signed else 0, vmax=1)
                ax.set_title(f"{attr}={val} ({cnt})", fontsize=7)
    return _savefig(fig, out)


def plot_curves(out: Path, res: dict, title: str) -> Path:
    from facetool.explainers.dissect import _plt, _savefig

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    for name in ORDERS:
        ax.plot(res["fractions"], np.asarray(res[name]).mean(0), marker="o", ms=3,
                label=f"{name} (AOPC {res[f'aopc_{name}']:.3f})")
    ax.set_xlabel("fraction of the image removed")
    ax.set_ylabel(res.get("score_name", "score"))
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    return _savefig(fig, out)
