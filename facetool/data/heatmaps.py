"""Landmark heatmaps for the FAN: store crops with their dense landmarks as (image in [0, 1], Gaussian
target heatmaps), and the coordinate maps between store pixels, the FAN input and its heatmap grid.

Coordinates. The store's landmarks are 0-based pixel coordinates of its C-px crops (pixel c has its
centre at x = c, :mod:`facetool.data.landmarks`). The FAN's decoding (:func:`facetool.models.fan.decode_heatmaps`)
puts heatmap cell c at ``c + 0.5`` heatmap units, ``4 (c + 0.5)`` input pixels: pixel *edges* at whole
numbers. So a store point x is ``(x + 0.5) S / C`` in the S-px input and ``(x + 0.5) S / (4 C) - 0.5`` in
cell indices (where its Gaussian peaks), and a decoded input point p maps back to ``p C / S - 0.5``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from facetool.data.dataset import FaceDataset
from facetool.data.transforms import MEAN, STD
from facetool.errors import FacetoolError


def store_to_input(points: np.ndarray | torch.Tensor, crop: int, size: int):
    """Store crop pixel coordinates -> FAN input coordinates (edge convention, see the module doc)."""
    return (points + 0.5) * (size / crop)


def input_to_store(points: np.ndarray | torch.Tensor, crop: int, size: int):
    """Inverse of :func:`store_to_input`."""
    return points * (crop / size) - 0.5


def gaussian_heatmaps(cells: torch.Tensor, size: int, sigma: float, peak: float = 1.0) -> torch.Tensor:
    """(..., L, size, size) maps ``peak exp(-d^2 / (2 sigma^2))`` peaking (value ``peak``) at ``cells`` (..., L, 2):
    the (x, y) positions in cell indices (fractional)."""
    grid = torch.arange(size, dtype=torch.float32)
    gx = torch.exp(-((grid - cells[..., 0:1]) ** 2) / (2 * sigma**2))  # (..., L, size) along x
    gy = torch.exp(-((grid - cells[..., 1:2]) ** 2) / (2 * sigma**2))
    maps = gy.unsqueeze(-1) * gx.unsqueeze(-2)
    return maps * peak if peak != 1.0 else maps


class LandmarkDataset(FaceDataset):
    """Store crops with one dense landmark set, for the FAN. Items: ``image`` (3, S, S) RGB in [0, 1] (the FAN's
    input, resized from the store's crop), ``points`` (L, 2) in input pixels (edge convention), ``visible`` (L,),
    ``heatmap`` (L, S/4, S/4) Gaussian targets (``sigma`` in heatmap cells, maximum ``peak``), ``label``, ``index``.
    ``peak`` > 1 weighs the few cells near the points against the many background cells of an L2 loss (see
    :data:`facetool.trainers.fan.DEFAULT_PEAK`); decoding (an argmax) does not depend on it.
    ``flip``: random horizontal flips, the points mirrored and their indices swapped by the convention's
    flip permutation."""

    def __init__(self, path: str | Path, split: str | None = "train", *, size: int = 256, sigma: float = 1.5,
                 convention: str | None = None, flip: bool = False, indices=None, peak: float = 1.0) -> None:
        from facetool.data.landmarks import CONVENTIONS
        from facetool.store import FaceStore

        super().__init__(path, split, size=size, indices=indices)
        with FaceStore(path) as s:
            pts, vis, self.convention = s.landmark_set(convention, self.indices)
        if self.convention not in CONVENTIONS:
            raise FacetoolError(f"store {Path(path).name}: landmark convention {self.convention!r} is not one facetool "
                                f"knows ({', '.join(CONVENTIONS)})")
        h, w = self.image_size
        if h != w:
            raise FacetoolError(f"store {Path(path).name} holds {h}x{w} crops; the FAN needs square ones")
        self.crop = int(w)
        self.points = torch.from_numpy(store_to_input(pts.astype(np.float32), self.crop, size))
        self.visible = torch.from_numpy(vis)
        self.perm = torch.tensor(CONVENTIONS[self.convention].flip_permutation)
        self.sigma = float(sigma)
        self.peak = float(peak)
        self.flip = flip

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        flip, self.flip = self.flip, False
        try:
            item = super().__getitem__(i)
        finally:
            self.flip = flip
        image = (item["image"] * STD + MEAN) / 255.0
        points, visible = self.points[i], self.visible[i]
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
            points = points[self.perm].clone()
            points[:, 0] = self.size - points[:, 0]  # edge convention: x -> S - x
            visible = visible[self.perm]
        hm = self.size // 4
        item.update(image=image, points=points, visible=visible,
                    heatmap=gaussian_heatmaps(points / 4.0 - 0.5, hm, self.sigma, self.peak))
        return item
