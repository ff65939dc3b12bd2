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

from facetool.data.recordio import VAL_FRACTION
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


def is_pack(path: str | Path) -> bool:
    """``path`` (a face source) is a RecordIO pack rather than a face store."""
    from facetool.data.recordio import is_rec_path

    p = Path(path)
    return p.suffix.lower() not in STORE_SUFFIXES and is_rec_path(p)


def input_paths(path: str | Path | None) -> tuple[Path, ...]:
    """Every file the face source ``path`` reads: a store itself; a pack's ``.rec``, its ``.idx`` and its
    ``property`` (where present); nothing for None. Commands pass these to ``guard_output`` /
    ``guard_run_folder`` as inputs, so an output never replaces or sits over any of them."""
    if path is None or str(path) == "":
        return ()
    p = Path(path)
    if not is_pack(p):
        return (p,)
    from facetool.data.recordio import rec_paths

    rec, idx, prop = rec_paths(p)
    return (rec, idx, *([prop] if prop.exists() else []))


def check_val_fraction(path: str | Path, val_fraction: float | None, option: str = "--val-fraction") -> float:
    """The held-out share of each identity for the face source ``path``: ``val_fraction`` (default
    :data:`VAL_FRACTION`) in [0, 1) for a pack. A face store's split is fixed at prepare time (``eval classify
    --split test`` and the explainers read the same one), so another value is refused in one line that
    says how to make a store with that split."""
    import math

    f = VAL_FRACTION if val_fraction is None else float(val_fraction)
    if not (math.isfinite(f) and 0.0 <= f < 1.0):
        raise FacetoolError(f"{option} must be in [0, 1), got {val_fraction}")
    if f != VAL_FRACTION and not is_pack(path):
        raise FacetoolError(f"{option} {f:g} splits a RecordIO pack; face store {path} carries its own train/test "
                            f"split, fixed at prepare time: drop {option}, or prepare the store again with "
                            f"`facetool prepare ... --test-fraction {f:g}`")
    return f


def open_dataset(path: str | Path, split: str | None = "train", *, option: str = "--store",
                 val_fraction: float | None = None, **kw: Any):
    """The faces of ``split`` (``train``, ``test``, or None for every image) of the face source ``path``
    as a dataset of model inputs: a :class:`facetool.data.dataset.FaceDataset` for a face store (``kw``
    are its keywords: ``flip``, ``attributes``, ``size``, ``indices``), a
    :class:`facetool.data.dataset.RecDataset` for a RecordIO pack (the same keywords and items; the split is
    per identity and deterministic, ``val_fraction`` of each identity's images in ``test``, the same on
    every rank). ``val_fraction`` other than :data:`VAL_FRACTION` is refused for a face store
    (:func:`check_val_fraction`). Anything else is refused with a one-line error naming ``option`` and what
    a face source may be."""
    p = face_source(path, option, rec=True)
    f = check_val_fraction(p, val_fraction)
    if is_pack(p):
        from facetool.data.dataset import RecDataset

        return RecDataset(p, split, test_fraction=f, **kw)
    from facetool.data.dataset import FaceDataset

    return FaceDataset(p, split, **kw)


__all__ = ["ALLOWED", "ALLOWED_REC", "STORE_SUFFIXES", "VAL_FRACTION", "check_val_fraction", "face_source",
           "input_paths", "is_pack", "open_dataset"]
