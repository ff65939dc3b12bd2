"""Attribute annotations for a face store: import from CSV, or estimate with an IIG model (Eq. 5).

CSV layouts (header required, column names are case-insensitive):

* long:  ``identity,feature,value[,annotator]`` (or ``source``/``index`` instead of ``identity``)
* wide:  ``identity,gender,age,...[,annotator]`` (one column per feature)

The key column decides the level: ``identity`` (a name in the store's ``/identities``) writes
per-identity attributes; ``source`` (a path as stored in ``/source``) or ``index`` (a row of the
store) write per-image attributes. Several rows for the same key and feature are votes: the
majority wins, a tie gives ``unknown``, ``unknown`` votes abstain, and with an ``annotator``
column only an annotator's last vote counts. Keys of the CSV that the store does not hold (e.g.
identities dropped by ``--min-images``) are skipped and counted.

Values are checked against the paper's vocabulary (:data:`PAPER_VOCAB`; the store's existing
vocabulary of the attribute is accepted too); anything else is refused unless ``extend_vocab``.
Annotations are merged into what the store already holds (keys the CSV names get the vote, the
others keep their value) unless ``replace``. An empty cell is no annotation: the stored value stays (write
``unknown`` to clear a value). The summary counts per-image features as the store resolves them (the image's
value, else its identity's), per-identity features per identity.

Writing is atomic: the store is copied to a temporary file beside it, modified and renamed over
the original, so an interruption leaves the original untouched. ``in_place=True`` skips the copy
for very large stores: only the small attribute datasets are rewritten, but an interruption
during that write may leave the store's attribute group unreadable (re-run the command then).
"""

from __future__ import annotations

import datetime as _dt
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from facetool.errors import FacetoolError, require_file
from facetool.io import sha256_file
from facetool.store import UNKNOWN, FaceStore, open_for_update, require_writable

#: The ConvNet-IIG annotation features and their values (``unknown`` is always allowed).
PAPER_VOCAB: dict[str, list[str]] = {
    "gender": ["female", "male"],
    "skin": ["light", "medium", "dark"],
    "eye_colour": ["brown", "blue", "green", "grey", "hazel"],
    "facial_hair": ["none", "moustache", "beard"],
    "race": ["white", "black", "latino_hispanic", "east_asian", "southeast_asian", "indian", "middle_eastern"],
    "age": ["0-20", "20-40", "40-60", "60+"],
}
FEATURE_ALIASES = {
    "sex": "gender",
    "skin_colour": "skin",
    "skin_color": "skin",
    "skin_tone": "skin",
    "eye_color": "eye_colour",
    "eyes": "eye_colour",
    "beard": "facial_hair",
    "ethnicity": "race",
    "age_bracket": "age",
    "age_group": "age",
}
UNKNOWN_TOKENS = {"", "unknown", "?", "na", "n/a", "nan", "-1"}
KEY_COLUMNS = ("identity", "source", "index")
_LONG = {"feature", "value"}


def _token(s: str) -> str:
    return "_".join(str(s).strip().lower().replace("-", " - ").split()).replace("_-_", "-")


def canonical_feature(name: str) -> str:
    """``"Skin colour"`` -> ``"skin"``; other names are lower-cased with ``_`` for spaces."""
    t = _token(name).replace("-", "_")
    return FEATURE_ALIASES.get(t, t)


def age_bracket(age: float) -> str:
    for lo, hi, name in ((0, 20, "0-20"), (20, 40, "20-40"), (40, 60, "40-60")):
        if lo <= age < hi:
            return name
    return "60+"


def canonical_value(feature: str, value: str) -> str:
    """Normalise a value (case, spaces; a numeric age becomes its bracket). ``"unknown"`` for blanks."""
    v = str(value).strip()
    if v.lower() in UNKNOWN_TOKENS:
        return "unknown"
    if feature == "age":
        try:
            return age_bracket(float(v))
        except ValueError:
            pass
        return v.replace(" ", "")
    return _token(v)


def majority_vote(votes: Sequence[str]) -> str:
    """The most frequent known value; ``unknown`` when there is none or the top count is tied."""
    c = Counter(v for v in votes if v != "unknown")
    if not c:
        return "unknown"
    top = c.most_common(2)
    if len(top) > 1 and top[0][1] == top[1][1]:
        return "unknown"
    return top[0][0]


# -- reading CSVs ------------------------------------------------------------------------------


def read_annotation_csv(path: str | Path) -> tuple[str, dict[str, dict[str, list[tuple[str | None, str]]]]]:
    """Parse one CSV -> (key column, {feature: {key: [(annotator, value), ...]}}), values normalised."""
    p = require_file(path, "annotation CSV")
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise FacetoolError(f"cannot read annotation CSV {p}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    df.columns = [_token(c).replace("-", "_") for c in df.columns]
    cols = list(df.columns)
    keys = [c for c in cols if c in KEY_COLUMNS]
    if len(keys) != 1:
        what = "no" if not keys else "more than one"
        raise FacetoolError(
            f"annotation CSV {p} has {what} key column (need exactly one of identity, source, index; columns: {', '.join(cols)})"
        )
    key = keys[0]
    if df.empty:
        raise FacetoolError(f"annotation CSV {p} has no rows")
    has_ann = "annotator" in cols
    out: dict[str, dict[str, list[tuple[str | None, str]]]] = defaultdict(lambda: defaultdict(list))
    if _LONG & set(cols):
        extra = [c for c in cols if c not in (key, "feature", "value", "annotator")]
        if not _LONG <= set(cols) or extra:
            raise FacetoolError(
                f"annotation CSV {p}: a long-format file has columns {key},feature,value[,annotator]; "
                f"got {', '.join(cols)}"
            )
        for k, f, v, a in zip(df[key], df["feature"], df["value"], df["annotator"] if has_ann else [None] * len(df)):
            if not v.strip():
                continue  # an empty cell is no annotation (the stored value stays); write unknown to clear one
            feat = canonical_feature(f)
            out[feat][k.strip()].append((a, canonical_value(feat, v)))
    else:
        feats = [c for c in cols if c not in (key, "annotator")]
        if not feats:
            raise FacetoolError(f"annotation CSV {p} has no feature columns (columns: {', '.join(cols)})")
        for c in feats:
            feat = canonical_feature(c)
            for k, v, a in zip(df[key], df[c], df["annotator"] if has_ann else [None] * len(df)):
                if not v.strip():
                    continue  # an empty cell is no annotation (the stored value stays); write unknown to clear one
                out[feat][k.strip()].append((a, canonical_value(feat, v)))
    if not out:
        raise FacetoolError(f"annotation CSV {p} has no values (every value cell is empty)")
    return key, {f: dict(d) for f, d in out.items()}


def _resolve_votes(votes: list[tuple[str | None, str]]) -> str:
    last: dict[str, str] = {}
    anon: list[str] = []
    for a, v in votes:
        if a is None or str(a).strip() == "":
            anon.append(v)
        else:
            last[str(a).strip()] = v
    return majority_vote(anon + list(last.values()))


# -- writing -----------------------------------------------------------------------------------
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def annotate_store(
    store: str | Path,
    csv_paths: Sequence[str | Path],
    *,
    extend_vocab: bool = False,
    replace: bool = False,
    in_place: bool = False,
) -> dict:
    """Import attribute annotations from CSV files into ``store``; returns a summary per feature."""
    if not csv_paths:
        raise FacetoolError("no annotation CSV given")
    parsed = [(Path(p), *read_annotation_csv(p)) for p in csv_paths]
    with FaceStore(store) as s:
        identities = {n: i for i, n in enumerate(s.identities)}
        n_images, n_ids = len(s), s.num_classes
        by_source: dict[str, list[int]] = defaultdict(list)
        if any(k == "source" for _, k, _ in parsed):
            for i, src in enumerate(s.sources):
                by_source[src.removeprefix("./")].append(i)
        existing = {
            lvl: {n: s.attribute(n, per_image=False) if lvl == "identity" else _image_attr(s, n)
                  for n in s.attribute_names(lvl)}
            for lvl in ("image", "identity")
        }

    # votes[(level, feature)][row] -> list of (annotator, value)
    votes: dict[tuple[str, str], dict[int, list[tuple[str | None, str]]]] = defaultdict(lambda: defaultdict(list))
    skipped: Counter = Counter()
    for path, key, feats in parsed:
        level = "identity" if key == "identity" else "image"
        for feat, per_key in feats.items():
            for k, vs in per_key.items():
                rows = _rows_for_key(path, key, k, identities, by_source, n_images)
                if not rows:
                    skipped[key] += 1
                for r in rows:
                    votes[(level, feat)][r].extend(vs)
    if not votes or all(not d for d in votes.values()):
        raise FacetoolError(
            "none of the annotated keys are in the store (check the identity names / sources / indices)"
        )

    # vocabulary check before anything is written
    plans = {}
    bad: list[str] = []
    for (level, feat), rows in votes.items():
        old_codes, old_vals = existing[level].get(feat, (None, None)) if not replace else (None, None)
        vals = list(old_vals or [])
        if feat not in PAPER_VOCAB and not old_vals and not extend_vocab:
            bad.append(f"feature {feat!r} is not in the paper vocabulary ({', '.join(PAPER_VOCAB)})")
            continue
        vals += [v for v in PAPER_VOCAB.get(feat, []) if v not in vals]
        seen = sorted({v for vs in rows.values() for _, v in vs} - {"unknown"})
        new = [v for v in seen if v not in vals]
        if new and not extend_vocab:
            bad.append(f"unknown {feat} values {', '.join(repr(v) for v in new)} (allowed: {', '.join(vals)}, unknown)")
            continue
        vals += new
        plans[(level, feat)] = (old_codes, vals)
    if bad:
        raise FacetoolError("; ".join(bad) + "; pass --extend-vocab to accept them")

    prov = json.dumps({"tool": "facetool annotate", "files": [str(p) for p, _, _ in parsed], "time": _now()})
    summary: dict = {"store": str(store), "files": [str(p) for p, _, _ in parsed], "skipped_keys": dict(skipped),
                     "features": {}}
    with open_for_update(store, in_place) as s:
        for (level, feat), rows in votes.items():
            old_codes, vals = plans[(level, feat)]
            n = n_ids if level == "identity" else n_images
            codes = np.full(n, UNKNOWN, np.int64) if old_codes is None else np.asarray(old_codes, np.int64).copy()
            ties = 0
            for r, vs in rows.items():
                win = _resolve_votes(vs)
                if win == "unknown" and any(v != "unknown" for _, v in vs):
                    ties += 1
                codes[r] = UNKNOWN if win == "unknown" else vals.index(win)
            s.set_attribute(feat, codes, vals, prov, level=level)
            summary["features"][feat] = {"level": level, "annotated": len(rows), "ties": ties, "values": vals}
        for (level, feat) in votes:
            # counted as the store resolves them: per image, the image's value, else its identity's
            codes, vals = s.attribute(feat, per_image=level == "image")
            summary["features"][feat]["counts"] = {v: int((codes == i).sum()) for i, v in enumerate(vals)} | {
                "unknown": int((codes == UNKNOWN).sum())}
    return summary


def _image_attr(s: FaceStore, name: str) -> tuple[np.ndarray, list[str]]:
    d = s.f[f"attributes/{name}"]
    return d[:].astype(np.int64), json.loads(d.attrs["values"])


def _rows_for_key(path: Path, key: str, k: str, identities: dict[str, int], by_source: dict[str, list[int]],
                  n_images: int) -> list[int]:
    if key == "identity":
        return [identities[k]] if k in identities else []
    if key == "source":
        return by_source.get(k.removeprefix("./"), [])
    try:
        i = int(k)
    except ValueError:
        raise FacetoolError(f"annotation CSV {path}: index {k!r} is not an integer") from None
    if not 0 <= i < n_images:
        raise FacetoolError(f"annotation CSV {path}: index {i} is outside the store (0..{n_images - 1})")
    return [i]


# -- estimation with an IIG model --------------------------------------------------------------
def estimate_from_model(
    store: str | Path,
    model_path: str | Path,
    feature: str,
    *,
    as_name: str | None = None,
    batch_size: int = 64,
    in_place: bool = False,
    device: str | None = None,
    arch: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Run an IIG model over every image of ``store``, estimate ``feature`` by Eq. 5 (the value whose
    gate mask is nearest to the executed gate pattern) and write it as a per-image attribute
    ``<feature>_estimated`` (or ``as_name``) with the model's path and sha256 as provenance.
    ``arch`` names the architecture of a bare state_dict no matcher recognises.
    Returns counts and, where the store has ground truth for ``feature``, the accuracy."""
    import torch

    from facetool.eval.classification import predict
    from facetool.trainers.iig import estimate_attribute, masks_from_meta
    from facetool.models import load_model

    require_file(model_path, "model")
    feature = canonical_feature(feature)
    name = as_name or f"{feature}_estimated"
    with FaceStore(store) as s:
        split = s.split
        has_gt = feature in set(s.attribute_names("image")) | set(s.attribute_names("identity"))
        if name == feature and has_gt:
            raise FacetoolError(f"--as {name} would overwrite the store's ground truth {feature!r}; choose another name")
        existing = set(s.attribute_names("image")) | set(s.attribute_names("identity"))
        if name in existing and not overwrite:
            raise FacetoolError(f"--as {name}: the store already has an attribute {name!r}; pass --overwrite to "
                                "replace it, or choose another name")
        gt = s.attribute(feature) if has_gt else None
    require_writable(store)  # before the model runs over every image
    model = load_model(model_path, name=arch)
    masks, vocab = masks_from_meta(getattr(model, "meta", {}))
    if feature not in masks:
        raise FacetoolError(f"IIG model {model_path} has no gate masks for {feature!r} (has: {', '.join(masks)})")
    pred = predict(model, store, split="all", batch_size=batch_size, device=device)
    if pred.gates is None:
        raise FacetoolError(f"model {model_path} reports no gates; --from-model needs an IIG model")
    values = list(vocab[feature])
    codes = estimate_attribute(torch.as_tensor(pred.gates, dtype=torch.float32), {feature: masks[feature]},
                               {feature: values})[feature].numpy().astype(np.int64)
    prov = json.dumps({"tool": "facetool annotate --from-model", "model": str(Path(model_path).resolve()),
                       "sha256": sha256_file(model_path), "feature": feature, "method": "Eq. 5 nearest gate mask",
                       "time": _now()})
    full = np.full(len(pred.indices), UNKNOWN, np.int64)
    full[pred.indices] = codes
    with open_for_update(store, in_place) as s:
        s.set_attribute(name, full, values, prov, level="image")
    out: dict = {"store": str(store), "model": str(model_path), "feature": feature, "attribute": name,
                 "values": values, "counts": {v: int((full == i).sum()) for i, v in enumerate(values)}}
    if gt is not None:
        gt_codes, gt_vals = gt
        # compare by value name: the model's vocabulary may be ordered differently from the store's
        remap = np.array([gt_vals.index(v) if v in gt_vals else -2 for v in values] + [-2])
        est_in_gt = remap[full]
        known = gt_codes != UNKNOWN
        out["ground_truth_images"] = int(known.sum())
        if known.any():
            out["accuracy"] = float((est_in_gt[known] == gt_codes[known]).mean())
            for sname, sid in (("train", 0), ("test", 1)):
                m = known & (split == sid)
                if m.any():
                    out[f"accuracy_{sname}"] = float((est_in_gt[m] == gt_codes[m]).mean())
    return out

