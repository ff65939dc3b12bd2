"""Face sources: the one way a command opens the faces it feeds a model.

:func:`open_dataset` is what training (``train *``, ``distill``), evaluation (``eval classify``) and
the explainers (``dissect relevance|attention|gates|units``, ``invert``) call for every face source, so
a new source format is added here once. Today a face source is a facetool face store (an HDF5 file,
``.h5``, written by ``facetool prepare``; layout in :mod:`facetool.store`); RecordIO comes next.
Commands that read a store's raw arrays rather than model inputs (the unit-dissection dictionary,
inversion inputs) check their path with :func:`face_source` first, so they refuse the same paths
with the same message. CONTRACTS.md "Face sources".

This module does not import torch; :func:`open_dataset` imports it when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from facetool.errors import FacetoolError
from facetool.io import STORE_SUFFIXES, file_head, is_hdf5_head

#: what a face source may be, for messages
ALLOWED = "a facetool face store (.h5, written by `facetool prepare`)"


def _is_hdf5(path: Path) -> bool:
    try:
        return is_hdf5_head(file_head(path))
    except OSError:
        return False


def face_source(path: str | Path, option: str = "--store") -> Path:
    """``path`` as a face store path, or a one-line :class:`FacetoolError` naming ``option`` and what a
    face source may be. A ``.h5``/``.hdf5`` path, or any file that is an HDF5 file, is a face store
    (whether it is a complete facetool store is checked when it is opened: :class:`facetool.store.FaceStore`)."""
    p = Path(path)
    if p.suffix.lower() in STORE_SUFFIXES or (p.is_file() and _is_hdf5(p)):
        return p
    if p.is_dir():
        raise FacetoolError(f"{option} {p} is a folder; a face source is {ALLOWED} "
                            "(make one from a folder with `facetool prepare folder`)")
    if not p.exists():
        raise FacetoolError(f"{option} {p}: no such file; a face source is {ALLOWED}")
    raise FacetoolError(f"{option} {p} is not a face source; a face source is {ALLOWED}")


def open_dataset(path: str | Path, split: str | None = "train", *, option: str = "--store", **kw: Any):
    """The faces of ``split`` (``train``, ``test``, or None for every image) of the face source ``path``
    as a dataset of model inputs: a :class:`facetool.data.dataset.FaceDataset` for a face store (``kw``
    are its keywords: ``flip``, ``attributes``, ``size``, ``indices``). Anything else is refused with a
    one-line error naming ``option`` and what a face source may be."""
    p = face_source(path, option)
    from facetool.data.dataset import FaceDataset

    return FaceDataset(p, split, **kw)


__all__ = ["ALLOWED", "STORE_SUFFIXES", "face_source", "open_dataset"]
