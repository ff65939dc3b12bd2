"""Images and references a relevance run reads: store rows, image files, pairs files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from facetool.errors import FacetoolError


def load_images(store_path: Path, rows: np.ndarray, size: int) -> Tensor:
    from facetool.data.sources import open_dataset

    ds = open_dataset(store_path, None, size=size, indices=rows)
    return torch.stack([ds[i]["image"] for i in range(len(ds))]) if len(ds) else torch.zeros(0, 3, size, size)


def image_file(path: Path, size: int) -> Tensor:
    from facetool.data.transforms import MEAN, STD
    from facetool.detect.retinaface import read_rgb

    img = read_rgb(path)
    if img is None:
        raise FacetoolError(f"--reference {path}: not a readable image file")
    t = (torch.from_numpy(img).permute(2, 0, 1).float() - MEAN) / STD
    return F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _read_pairs(path: Path, n: int) -> np.ndarray:
    pairs = []
    for ln, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        try:
            a, b = int(parts[0]), int(parts[1])
        except (ValueError, IndexError):
            raise FacetoolError(f"{path}:{ln}: expected two store indices 'i j', got {line.strip()!r}") from None
        if not (0 <= a < n and 0 <= b < n):
            raise FacetoolError(f"{path}:{ln}: index out of range (the store has {n} images)")
        pairs.append((a, b))
    if not pairs:
        raise FacetoolError(f"{path} holds no pairs (lines 'i j' of store indices)")
    return np.asarray(pairs, np.int64)


def select_rows(store, split: str, limit: int, reference: str | None, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows to explain and, for ``same-identity`` / pairs references, the reference row of each."""
    if reference and reference.endswith(".txt") and Path(reference).is_file():
        pairs = _read_pairs(Path(reference), len(store))[:limit]
        return pairs[:, 0], pairs[:, 1]
    rows = store.indices(split)
    if len(rows) == 0:
        raise FacetoolError(f"the {split} split of {store.path.name} is empty")
    if reference == "same-identity":
        ref = []
        keep = []
        for r in rows:
            same = rows[(labels[rows] == labels[r]) & (rows != r)]
            if len(same):
                keep.append(r)
                ref.append(same[(same > r).argmax()] if (same > r).any() else same[0])
        if not keep:
            raise FacetoolError(f"--reference same-identity: no identity has two images in the {split} split")
        return np.asarray(keep[:limit]), np.asarray(ref[:limit])
    return rows[:limit], None
