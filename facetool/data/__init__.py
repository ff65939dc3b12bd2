"""Data: the PyTorch dataset over a face store, :func:`open_dataset` (the one way commands open a face
source for a model, :mod:`facetool.data.sources`), transforms and dataset loaders.

The names below are resolved on first access, so importing a light submodule (or
``facetool.data`` itself) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "FaceDataset": "facetool.data.dataset",
    "open_dataset": "facetool.data.sources",
    "face_source": "facetool.data.sources",
    "make_loader": "facetool.data.dataset",
    "normalize": "facetool.data.transforms",
    "denormalize": "facetool.data.transforms",
}

__all__ = ["FaceDataset", "open_dataset", "face_source", "make_loader", "normalize", "denormalize"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'facetool.data' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
