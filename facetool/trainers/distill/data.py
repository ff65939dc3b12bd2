"""What a distillation run reads besides the face store: unlabeled images (a store or a folder),
labeled/unlabeled pairs, the first N labeled images per identity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from facetool.errors import FacetoolError, require_file

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


# -- data ------------------------------------------------------------------------------------------
class FolderImages(Dataset):
    """Unlabeled aligned face crops from a folder tree (any depth), resized to ``size``."""

    def __init__(self, root: str | Path, size: int, flip: bool = False) -> None:
        self.root = Path(root)
        self.files = sorted(f for f in self.root.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file())
        if not self.files:
            raise FacetoolError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) under {self.root}")
        self.size, self.flip = size, flip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        import cv2

        from facetool.data.transforms import normalize
        from facetool.detect.retinaface import read_rgb

        img = read_rgb(self.files[i])
        if img is None:
            raise FacetoolError(f"unreadable image in the unlabeled folder: {self.files[i]}")
        if img.shape[:2] != (self.size, self.size):
            interp = cv2.INTER_AREA if max(img.shape[:2]) > self.size else cv2.INTER_LINEAR
            img = cv2.resize(img, (self.size, self.size), interpolation=interp)
        x = normalize(img)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"image": x}


class WithUnlabeled(Dataset):
    """Labeled items with one random unlabeled image each (``u_image``), drawn from torch's global
    generator (restored on resume; reproducible per worker seed with loader workers)."""

    def __init__(self, labeled: Dataset, unlabeled: Dataset) -> None:
        self.labeled, self.unlabeled = labeled, unlabeled

    @property
    def flip(self) -> bool:
        return bool(getattr(self.labeled, "flip", False))

    @flip.setter
    def flip(self, value: bool) -> None:
        for d in (self.labeled, self.unlabeled):
            if hasattr(d, "flip"):
                d.flip = value

    def __len__(self) -> int:
        return len(self.labeled)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.labeled[i])
        item["u_image"] = self.unlabeled[int(torch.randint(len(self.unlabeled), ()))]["image"]
        return item


def open_unlabeled(path: str | Path, size: int, notes: list[str]) -> Dataset:
    """A face store (all splits, labels ignored) or a folder of aligned crops, at ``size`` px."""
    from facetool.data.sources import face_source, open_dataset
    from facetool.store import FaceStore

    p = Path(path)
    if p.is_dir():
        ds = FolderImages(p, size)
        notes.append(f"unlabeled: {len(ds)} images from folder {p}, resized to {size} px where they differ")
        return ds
    face_source(require_file(p, "unlabeled store"), "--unlabeled")
    with FaceStore(p) as s:
        own = int(s.image_size[0])
    ds = open_dataset(p, None, option="--unlabeled", size=size if own != size else None)
    if own != size:
        notes.append(f"unlabeled store {p} holds {own} px images; resized to {size} px")
    notes.append(f"unlabeled: {len(ds)} images from {p} (labels ignored)")
    return ds


def first_per_identity(labels: np.ndarray, indices: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` of ``indices`` (store order) of every identity."""
    keep, seen = [], {}
    for i in indices:
        c = int(labels[i])
        if seen.get(c, 0) < n:
            keep.append(i)
            seen[c] = seen.get(c, 0) + 1
    return np.asarray(keep, np.int64)
