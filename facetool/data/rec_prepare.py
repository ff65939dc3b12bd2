"""`facetool prepare rec`: a RecordIO pack (or a deterministic subset of it) -> a face store.

The packs hold aligned 112x112 crops, so images are copied (decoded, RGB), not re-aligned; ``size``
resizes them (INTER_AREA). Identities keep their pack labels as names. The split is the pack's
per-identity split (:func:`facetool.data.recordio.split_per_identity`): with seed 0 and no subset, the
store's train/test rows are those ``--store X.rec`` trains and validates on.

The conversion is :func:`rec_record` over a planned item list; :func:`prepare_rec` runs it over
``items[start:stop]`` so that the index range can be split across processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from facetool.data.recordio import RecordPack
from facetool.errors import FacetoolError
from facetool.io import STORE_SUFFIXES, guard_output
from facetool.store import Record

#: one planned image: (pack row, store label, split code)
Item = tuple[int, int, int]


def plan_rec(pk: RecordPack, *, identities: int | None = None, per_identity: int | None = None,
             test_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[Item]]:
    """(pack labels of the kept identities, items). ``identities``: that many identities drawn with
    ``seed`` (kept in label order); ``per_identity``: at most that many images each, drawn and split as
    ``prepare``'s sampling does (:func:`facetool.data.imdbface.sample_split`)."""
    from facetool.data.imdbface import sample_split

    labels = pk.labels
    present = np.unique(labels)
    if identities is not None and identities < len(present):
        present = np.sort(np.random.default_rng(seed).choice(present, identities, replace=False))
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    rows = {int(labels[g[0]]): g.tolist() for g in np.split(order, bounds) if len(g)}
    groups = {int(lab): rows[int(lab)] for lab in present}
    chosen = sample_split(groups, per_identity, test_fraction, seed)
    items = [(row, new, split) for new, lab in enumerate(present.tolist()) for row, split in chosen[lab]]
    return present.tolist(), items


def rec_record(pk: RecordPack, item: Item, size: int | None = None) -> Record:
    """The store record of one planned item: the pack's image (resized to ``size`` if given)."""
    import cv2

    row, label, split = item
    key = int(pk.keys[row])
    img = pk.image(key)
    if size is not None and img.shape[:2] != (size, size):
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return Record(image=img, label=label, split=split, source=f"{pk.rec.name}#{key}")


def prepare_rec(rec: str | Path, out: str | Path, *, identities: int | None = None, per_identity: int | None = None,
                size: int | None = None, test_fraction: float = 0.2, seed: int = 0, overwrite: bool = False,
                resume: bool = False, start: int = 0, stop: int | None = None) -> tuple[Path, dict[str, Any]] | None:
    """Convert ``rec`` (all, or ``identities`` x ``per_identity`` of it) to the face store ``out``; the
    planned items ``start:stop`` only when given. Returns (store path, report dict; the report is also
    written beside the store). Under ``torchrun`` (a process group of several) the items are split over
    the ranks and rank 0 alone writes the store one process writes (:func:`facetool.prepare.build_store`);
    the other ranks return None."""
    from facetool.data.imdbface import finish_report, guard_report
    from facetool.data.sources import input_paths
    from facetool.prepare import build_store

    for name, v in (("--identities", identities), ("--per-identity", per_identity), ("--size", size)):
        if v is not None and v < 1:
            raise FacetoolError(f"{name} must be >= 1, got {v}")
    if not 0.0 <= test_fraction < 1.0:
        raise FacetoolError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    inputs = input_paths(rec)  # .rec, .idx and property; the output is checked before the pack is read
    out = guard_output(out, inputs=inputs, overwrite=overwrite or resume, suffix=STORE_SUFFIXES)
    guard_report(out, overwrite, inputs=inputs)
    pk = RecordPack(rec)
    kept, items = plan_rec(pk, identities=identities, per_identity=per_identity, test_fraction=test_fraction,
                           seed=seed)
    items = items[start:stop]
    if not items:
        raise FacetoolError(f"{pk.rec} has no images to convert")
    h, w = (size, size) if size is not None else pk.image_size
    settings = {"dataset": "rec", "rec": str(pk.rec), "identities": identities, "per_identity": per_identity,
                "size": size, "test_fraction": test_fraction, "seed": seed, "start": start, "stop": stop,
                "identity ranges (record 0)": pk.identity_ranges is not None}
    built = build_store(
        out, items, lambda it: rec_record(pk, it, size),
        writer_kwargs=dict(image_size=(h, w), identities=[str(k) for k in kept], source=f"rec:{pk.rec.name}",
                           preprocessing={k: v for k, v in settings.items() if k != "rec"}),
        overwrite=overwrite, resume=resume, label=f"rec {pk.rec.name}")
    pk.close()
    if built is None:  # another torchrun rank: rank 0 writes the store and the report
        return None
    path, counters = built
    return path, finish_report(path, counters, settings)
