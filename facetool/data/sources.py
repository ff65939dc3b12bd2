"""Face sources: the one way a command opens the faces it feeds a model.

:func:`open_dataset` is what training (``train *``, ``distill``), evaluation (``eval classify``) and
the explainers (``dissect relevance|attention|gates|units``, ``invert``) call for every face source, so
a new source format is added here once. Today a face source is a facetool face store (an HDF5 file,
``.h5``, written by ``facetool prepare``; layout in :mod:`facetool.store`) or an MXNet RecordIO pack
(``.rec`` with its ``.idx`` beside it, :mod:`facetool.data.recordio`; model inputs only).
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
#: what a face source for model inputs may be (open_dataset)
ALLOWED_REC = ("a facetool face store (.h5, written by `facetool prepare`) or a RecordIO pack "
               "(.rec with its .idx beside it)")


def _is_hdf5(path: Path) -> bool:
    try:
        return is_hdf5_head(file_head(path))
    except OSError:
        return False


def face_source(path: str | Path, option: str = "--store", *, rec: bool = False) -> Path:
    """``path`` as a face store path, or a one-line :class:`FacetoolError` naming ``option`` and what a
    face source may be. A ``.h5``/``.hdf5`` path, or any file that is an HDF5 file, is a face store
    (whether it is a complete facetool store is checked when it is opened: :class:`facetool.store.FaceStore`).
    ``rec``: a RecordIO pack (a ``.rec`` path or a file starting with its magic) is accepted too; where it is
    not (raw store arrays), it is refused with a pointer to ``facetool prepare rec``."""
    from facetool.data.recordio import is_rec_path

    p = Path(path)
    if p.suffix.lower() in STORE_SUFFIXES or (p.is_file() and _is_hdf5(p)):
        return p
    if is_rec_path(p):
        if rec:
            return p
        raise FacetoolError(f"{option} {p} is a RecordIO pack; this command reads a face store: convert it with "
                            f"`facetool prepare rec --rec {p} --out {p.with_suffix('.h5').name}`")
    allowed = ALLOWED_REC if rec else ALLOWED
    if p.is_dir():
        raise FacetoolError(f"{option} {p} is a folder; a face source is {allowed} "
                            "(make one from a folder with `facetool prepare folder`)")
    if not p.exists():
        raise FacetoolError(f"{option} {p}: no such file; a face source is {allowed}")
    raise FacetoolError(f"{option} {p} is not a face source; a face source is {allowed}")


def open_dataset(path: str | Path, split: str | None = "train", *, option: str = "--store", **kw: Any):
    """The faces of ``split`` (``train``, ``test``, or None for every image) of the face source ``path``
    as a dataset of model inputs: a :class:`facetool.data.dataset.FaceDataset` for a face store (``kw``
    are its keywords: ``flip``, ``attributes``, ``size``, ``indices``), a
    :class:`facetool.data.dataset.RecDataset` for a RecordIO pack (the same keywords and items; the split is
    per identity, deterministic). Anything else is refused with a one-line error naming ``option`` and what
    a face source may be."""
    from facetool.data.recordio import is_rec_path

    p = face_source(path, option, rec=True)
    if p.suffix.lower() not in STORE_SUFFIXES and is_rec_path(p):
        from facetool.data.dataset import RecDataset

        return RecDataset(p, split, **kw)
    from facetool.data.dataset import FaceDataset

    return FaceDataset(p, split, **kw)


__all__ = ["ALLOWED", "ALLOWED_REC", "STORE_SUFFIXES", "face_source", "open_dataset"]
