"""PyTorch datasets over a face store and over a RecordIO pack. Files are opened lazily in each worker."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from facetool.data.recordio import VAL_FRACTION
from facetool.data.transforms import item_image
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
        img = item_image(self._images()[row], self.flip, self.size)
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


#: share of each identity's images in the test split of a RecordIO pack read directly (``--store X.rec``)
#: unless ``--val-fraction`` says otherwise: ``prepare``'s default ``--test-fraction``, so a pack and
#: ``prepare rec``'s store of it split alike
REC_TEST_FRACTION = VAL_FRACTION


class RecDataset(Dataset):
    """:class:`FaceDataset`'s items and attributes over a RecordIO pack (:mod:`facetool.data.recordio`).

    Rows (``index``, ``indices``, ``labels``) are positions in the pack's image list (record 0's identity
    ranges in order, or every key of a shuffled pack); labels are the identity ordinals (record 0) or the
    headers' labels. The split is per identity and deterministic (:func:`~facetool.data.recordio.split_per_identity`
    with ``test_fraction``). Images are decoded (JPEG/PNG, RGB) in the worker that reads them; the pack
    reopens its file in each worker process. Packs hold no attributes."""

    def __init__(
        self,
        path: str | Path,
        split: str | None = "train",
        *,
        flip: bool = False,
        attributes: Sequence[str] = (),
        size: int | None = None,
        indices: Sequence[int] | None = None,
        test_fraction: float = REC_TEST_FRACTION,
    ) -> None:
        from facetool.data.recordio import RecordPack, split_per_identity
        from facetool.errors import FacetoolError

        if attributes:
            raise FacetoolError(f"RecordIO pack {path} holds identities only, no attributes "
                                f"({', '.join(attributes)}); prepare a face store with them")
        if split not in (None, "train", "test"):
            raise FacetoolError(f"unknown split {split!r}; use train, test or all")
        self.path = str(path)
        self.pack = RecordPack(path)
        self.labels = self.pack.labels
        self.num_classes = self.pack.num_classes
        self.image_size = self.pack.image_size
        self.identities = [str(i) for i in range(self.num_classes)]
        if indices is not None:
            self.indices = np.asarray(indices, np.int64)
        elif split is None:
            self.indices = np.arange(len(self.labels), dtype=np.int64)
        else:
            sp = split_per_identity(self.labels, test_fraction)
            self.indices = np.flatnonzero(sp == (1 if split == "test" else 0)).astype(np.int64)
        self.attr_codes = None
        self.attr_values: dict = {}
        self.flip = flip
        self.size = size

    def __len__(self) -> int:
        return len(self.indices)

    def raw(self, row: int) -> np.ndarray:
        """The (H, W, 3) uint8 RGB image of pack row ``row``."""
        return self.pack.image(int(self.pack.keys[row]))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = int(self.indices[i])
        img = item_image(self.raw(row), self.flip, self.size)
        return {"image": img, "label": torch.tensor(int(self.labels[row])), "index": torch.tensor(row)}


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
