"""FairFace labels (``fairface_label_train.csv`` / ``fairface_label_val.csv``) -> store attributes.

CSV columns ``file,age,gender,race,service_test`` (``service_test`` is ignored); ``file`` is the
image path relative to the FairFace root, e.g. ``train/1.jpg``. The store must hold the FairFace
images (``facetool prepare folder ROOT --aligned`` on the FairFace root, whose ``train/`` and ``val/``
folders become the sources ``train/1.jpg`` ...). Rows are matched to store images by source path
(exactly, or by the trailing path components when the store was prepared from a parent folder);
rows naming an image that is not in the store are skipped and counted. Store images without a row
stay unknown (-1).

Attributes written per image, with the published vocabularies in this order:
``age`` (0-2 3-9 10-19 20-29 30-39 40-49 50-59 60-69 more than 70), ``gender`` (Male Female),
``race`` (White Black Latino_Hispanic East Asian Southeast Asian Indian Middle Eastern).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from facetool.errors import FacetoolError, require_file
from facetool.store import UNKNOWN, FaceStore

VOCAB = {
    "age": ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70"],
    "gender": ["Male", "Female"],
    "race": ["White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern"],
}
COLUMNS = ("file", "age", "gender", "race")


def read_fairface_csv(path: str | Path) -> list[tuple[str, dict[str, int]]]:
    """Rows ``(file, {attribute: code})``; a wrong header or value is a one-line error naming what is allowed."""
    p = require_file(path, "FairFace label CSV")
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise FacetoolError(f"{p.name} lacks column(s) {', '.join(missing)}; expected "
                                    f"file,age,gender,race,service_test (found {','.join(header) or 'nothing'})")
            col = {c: header.index(c) for c in COLUMNS}
            rows = []
            for i, row in enumerate(reader, start=2):
                if not any(x.strip() for x in row):
                    continue
                if len(row) < len(header):
                    raise FacetoolError(f"{p.name} line {i}: {len(row)} fields, expected {len(header)}")
                codes = {}
                for a, vocab in VOCAB.items():
                    v = row[col[a]].strip()
                    if v not in vocab:
                        raise FacetoolError(f"{p.name} line {i}: {a} {v!r} is not one of {', '.join(vocab)}")
                    codes[a] = vocab.index(v)
                rows.append((row[col["file"]].strip().replace("\\", "/"), codes))
    except UnicodeDecodeError as e:
        raise FacetoolError(f"cannot read {p}: {e}") from None
    return rows


def _match(sources: list[str]) -> dict[str, int]:
    """Lookup from every trailing path suffix of each source to its row (unambiguous suffixes only)."""
    full: dict[str, int] = {}
    seen: dict[str, int] = {}
    for i, s in enumerate(sources):
        parts = s.replace("\\", "/").split("/")
        for k in range(len(parts)):
            key = "/".join(parts[k:])
            seen[key] = seen.get(key, 0) + 1
            full.setdefault(key, i)
    return {k: v for k, v in full.items() if seen[k] == 1}


def annotate_fairface(store: str | Path, csv_paths: Sequence[str | Path], *, in_place: bool = False) -> dict:
    """Write age/gender/race from FairFace CSVs into ``store``; returns counts per attribute, rows
    matched, and rows skipped because their image is not in the store."""
    from facetool.store import open_for_update
    from facetool.io import sha256_file

    if not csv_paths:
        raise FacetoolError("give at least one --fairface CSV")
    parsed = [(Path(p), read_fairface_csv(p)) for p in csv_paths]
    with FaceStore(store) as s:
        lookup = _match(s.sources)
        n = len(s)
    codes = {a: np.full(n, UNKNOWN, np.int16) for a in VOCAB}
    matched, skipped = 0, 0
    missing_examples: list[str] = []
    for _, rows in parsed:
        for file, vals in rows:
            i = lookup.get(file.lstrip("./"))
            if i is None:
                skipped += 1
                if len(missing_examples) < 3:
                    missing_examples.append(file)
                continue
            matched += 1
            for a, c in vals.items():
                codes[a][i] = c
    if matched == 0:
        raise FacetoolError(f"none of the {skipped} FairFace rows names an image of {Path(store).name} "
                            f"(e.g. {', '.join(missing_examples)}); prepare the store from the FairFace root "
                            "(facetool prepare folder ROOT --aligned)")
    prov = "fairface:" + ",".join(f"{p.name}@{sha256_file(p)[:12]}" for p, _ in parsed)
    with open_for_update(store, in_place=in_place) as s:
        for a, vocab in VOCAB.items():
            s.set_attribute(a, codes[a], vocab, prov)
    return {"store": str(store), "rows": matched + skipped, "matched": matched, "skipped_missing_image": skipped,
            "missing_examples": missing_examples,
            "attributes": {a: {v: int((codes[a] == k).sum()) for k, v in enumerate(VOCAB[a])} | {
                "unknown": int((codes[a] == UNKNOWN).sum())} for a in VOCAB}}
