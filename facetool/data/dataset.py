"""PyTorch dataset over a face store. The HDF5 file is opened lazily in each worker."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from facetool.data.transforms import MEAN, STD
from facetool.store import FaceStore


class FaceDataset(Dataset):
    """Items are dicts: ``image`` (3,H,W float, normalised), ``label`` (int64), ``index`` (int64,
    row in the store) and ``attrs`` (int64 codes of the requested attributes, -1 unknown).

    ``flip`` applies random horizontal flips (training augmentation); ``size`` resizes on the fly
    when the model wants another input size than the store holds.
    """

    def __init__(
        self,
        path: str | Path,
        split: str | None = "train",
        *,
        flip: bool = False,
        attributes: Sequence[str] = (),
        size: int | None = None,
        indices: Sequence[int] | None = None,
    ) -> None:
        self.path = str(path)
        with FaceStore(path) as s:
            self.indices = np.asarray(indices if indices is not None else s.indices(split), np.int64)
            self.labels = s.labels
            self.num_classes = s.num_classes
            self.image_size = s.image_size
            read = {a: s.attribute(a) for a in attributes}
            self.attr_codes = np.stack([read[a][0] for a in attributes], 1) if attributes else None
            self.attr_values = {a: read[a][1] for a in attributes}
        self.flip = flip
        self.size = size
        self._f: h5py.File | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def _images(self) -> h5py.Dataset:
        if self._f is None:
            self._f = h5py.File(self.path, "r")
        return self._f["images"]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = int(self.indices[i])
        img = torch.from_numpy(self._images()[row]).permute(2, 0, 1).float()
        if self.flip and torch.rand(()) < 0.5:
            img = img.flip(-1)
        img = (img - MEAN) / STD
        if self.size is not None and img.shape[-1] != self.size:
            img = torch.nn.functional.interpolate(
                img[None], size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
            )[0]
        item = {
            "image": img,
            "label": torch.tensor(int(self.labels[row])),
            "index": torch.tensor(row),
        }
        if self.attr_codes is not None:
            item["attrs"] = torch.from_numpy(self.attr_codes[row].astype(np.int64))
        return item

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_f"] = None  # never pickle an open HDF5 handle into a worker
        return d


def make_loader(
    ds: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    workers: int = 0,
    drop_last: bool = False,
    sampler=None,
    seed: int = 0,
) -> DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=g,
    )
