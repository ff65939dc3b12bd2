"""How well clusters match labels (thesis ch. 5, Table 5.1), and the thesis's attribute cohort code.

:func:`cluster_purity` and :func:`cluster_scores` (purity, AMI and NMI, sklearn's 'arithmetic' average)
score any clustering against true labels; samples whose true label is negative (unknown) are left out.
:func:`cohort_codes` gives each image its cohort: age x gender x race x pitch bin x yaw bin, 3 * 2 * 5 *
3 * 3 = 270 cohorts, as the thesis codes FairFace attributes and RetinaFace pose:

- age: 0-19 -> 0, 20-49 -> 1, 50+ -> 2, by the lower bound of the age bracket (FairFace's 0-2, 3-9,
  10-19 -> 0; 20-29, 30-39, 40-49 -> 1; 50-59, 60-69, more than 70 -> 2). The synthetic (and
  ``annotate``) brackets 0-20, 20-40, 40-60, 60+ map by the same rule to 0, 1, 1, 2 (40-60 straddles 50).
- gender: female 0, male 1.
- race: Black 0, East and Southeast Asian 1, Indian 2, Latino_Hispanic 3, Middle Eastern and White 4.
  A store with no ``race`` but the synthetic ``group`` (face-shape families A, B, C, no real-world
  meaning) uses group A/B/C as race codes 0/1/2.
- pitch and yaw (degrees): < -30 -> 0, > 30 -> 1, else 2.

cohort = (((age * 2 + gender) * 5 + race) * 3 + pitch) * 3 + yaw; -1 where any part is unknown.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from facetool.errors import FacetoolError
from facetool.store import UNKNOWN, FaceStore

#: the parts of the cohort code, in the order of its digits, and how many values each takes
COHORT_PARTS: dict[str, int] = {"age": 3, "gender": 2, "race": 5, "pitch": 3, "yaw": 3}
NUM_COHORTS = int(np.prod(list(COHORT_PARTS.values())))  # 270

_GENDER = {"female": 0, "f": 0, "woman": 0, "male": 1, "m": 1, "man": 1}
_RACE = {"black": 0, "east_asian": 1, "southeast_asian": 1, "indian": 2, "latino_hispanic": 3, "latino": 3,
         "hispanic": 3, "middle_eastern": 4, "white": 4}
_GROUP = {"a": 0, "b": 1, "c": 2}  # synthetic face-shape families (documented above)
_UNKNOWN_VALUES = {"", "unknown", "?", "na", "n/a", "nan", "none", "-1"}


def _labels(labels_true: Any, labels_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both label arrays as 1-D int64, restricted to samples with a known (>= 0) true label."""
    t, p = np.asarray(labels_true), np.asarray(labels_pred)
    if t.ndim != 1 or p.ndim != 1 or len(t) != len(p):
        raise FacetoolError(f"cluster labels must be two 1-D arrays of one length, got shapes {t.shape} and {p.shape}")
    for name, a in (("true", t), ("predicted", p)):
        if len(a) and not (np.issubdtype(a.dtype, np.integer) or np.all(np.mod(a, 1) == 0)):
            raise FacetoolError(f"{name} cluster labels must be integers")
    t, p = t.astype(np.int64), p.astype(np.int64)
    keep = t >= 0
    if not keep.any():
        raise FacetoolError("no sample has a known true label (all are negative = unknown), nothing to score")
    return t[keep], p[keep]


def cluster_purity(labels_true: Any, labels_pred: Any) -> float:
    """Purity = (1/N) sum over clusters k of max_j |c_k & t_j|: the fraction of samples whose cluster's
    majority label is their own. Samples with a negative (unknown) true label are left out."""
    t, p = _labels(labels_true, labels_pred)
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    table = np.zeros((pi.max() + 1, ti.max() + 1), np.int64)
    np.add.at(table, (pi, ti), 1)
    return float(table.max(axis=1).sum() / len(t))


def cluster_scores(labels_true: Any, labels_pred: Any) -> dict[str, float]:
    """``{"purity", "ami", "nmi"}`` of a clustering against true labels: :func:`cluster_purity` and
    sklearn's adjusted and normalised mutual information with the 'arithmetic' average (sklearn's
    default since 0.22; 'max' before). Samples with a negative (unknown) true label are left out."""
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    t, p = _labels(labels_true, labels_pred)
    return {"purity": cluster_purity(t, p),
            "ami": float(adjusted_mutual_info_score(t, p, average_method="arithmetic")),
            "nmi": float(normalized_mutual_info_score(t, p, average_method="arithmetic"))}


def _norm(value: str) -> str:
    return re.sub(r"[\s\-]+", "_", str(value).strip().lower())


def _age_code(value: str) -> int:
    m = re.match(r"\D*(\d+)", value)
    if m is None:
        raise ValueError
    low = int(m.group(1))
    return 0 if low < 20 else 1 if low < 50 else 2


def _map_value(part: str, value: str) -> int:
    """Cohort digit of one vocabulary value (``part``: age, gender, race or group); ValueError if unknown."""
    v = _norm(value)
    if v in _UNKNOWN_VALUES:
        return UNKNOWN
    if part == "age":
        return _age_code(v)
    table = {"gender": _GENDER, "race": _RACE, "group": _GROUP}[part]
    if v not in table:
        raise ValueError
    return table[v]


def _attribute_digits(part: str, values: Any, vocab: Sequence[str] | None) -> np.ndarray:
    """Cohort digits of an attribute given as vocabulary strings, or as integer codes into ``vocab``
    (-1 = unknown)."""
    a = np.asarray(values)
    if a.ndim != 1:
        raise FacetoolError(f"cohort {part} must be a 1-D array, got shape {a.shape}")
    if vocab is None:
        if a.dtype.kind not in "USO":
            raise FacetoolError(f"cohort {part} given as numbers needs its vocabulary (vocab={{{part!r}: [...]}})")
        vocab = sorted({str(x) for x in a})
        a = np.array([vocab.index(str(x)) for x in a], np.int64)
    elif not np.issubdtype(a.dtype, np.integer):
        raise FacetoolError(f"cohort {part} with a vocabulary must be integer codes into it")
    lut = []
    for v in vocab:
        try:
            lut.append(_map_value(part, v))
        except ValueError:
            raise FacetoolError(f"cannot place {part} value {v!r} in the cohort code "
                                f"(vocabulary: {', '.join(map(str, vocab))})") from None
    a = a.astype(np.int64)
    if len(a) and (a.max() >= len(vocab) or a.min() < UNKNOWN):
        raise FacetoolError(f"cohort {part} codes must be in -1..{len(vocab) - 1}")
    return np.where(a < 0, UNKNOWN, np.array(lut + [UNKNOWN], np.int64)[a])


def _pose_digits(degrees: Any, part: str) -> np.ndarray:
    d = np.asarray(degrees, np.float64)
    if d.ndim != 1:
        raise FacetoolError(f"cohort {part} must be a 1-D array of degrees, got shape {d.shape}")
    return np.where(np.isnan(d), UNKNOWN, np.where(d < -30, 0, np.where(d > 30, 1, 2))).astype(np.int64)


def _store_arrays(store: FaceStore) -> dict[str, Any]:
    """Age, gender, race (or synthetic group) codes with vocabularies, and yaw/pitch, from a face store."""
    have = set(store.attribute_names("image")) | set(store.attribute_names("identity"))
    race = "race" if "race" in have else "group" if "group" in have else None
    missing = [n for n in ("age", "gender") if n not in have] + ([] if race else ["race (or group)"])
    if missing:
        raise FacetoolError(f"store {store.path.name} has no {', '.join(missing)} attribute for the cohort code "
                            f"(has: {', '.join(sorted(have)) or 'none'}); add it with `facetool annotate`")
    out: dict[str, Any] = {"vocab": {}}
    for part, name in (("age", "age"), ("gender", "gender"), (race, race)):
        out[part], out["vocab"][part] = store.attribute(name)
    metas = set(store.f["meta"].keys()) if "meta" in store.f else set()
    if "pose" in metas:
        pose = store.meta("pose")
        prep = store.metadata.get("preprocessing")
        cols = list((prep.get("pose") if isinstance(prep, dict) else None) or ["yaw", "pitch", "roll"])
        if pose.ndim != 2 or "yaw" not in cols or "pitch" not in cols or pose.shape[1] < len(cols):
            raise FacetoolError(f"store {store.path.name}: per-image pose has shape {pose.shape}, "
                                f"columns {cols}; need yaw and pitch")
        out["yaw"], out["pitch"] = pose[:, cols.index("yaw")], pose[:, cols.index("pitch")]
    elif {"yaw", "pitch"} <= metas:
        out["yaw"], out["pitch"] = store.meta("yaw").reshape(-1), store.meta("pitch").reshape(-1)
    else:
        raise FacetoolError(f"store {store.path.name} has no per-image pose (meta 'pose' or 'yaw' and 'pitch') "
                            "for the cohort code's pitch and yaw bins")
    return out


def cohort_parts(store: str | Path | FaceStore | None = None, *, age: Any = None, gender: Any = None,
                 race: Any = None, group: Any = None, yaw: Any = None, pitch: Any = None,
                 vocab: dict[str, Sequence[str]] | None = None) -> dict[str, np.ndarray]:
    """Each image's digit of each cohort part (``COHORT_PARTS``: age, gender, race, pitch, yaw; -1 =
    unknown), from a face store (path or open :class:`FaceStore`: its age, gender and race -- or the
    synthetic group -- attributes and per-image pose) or from arrays: attributes as vocabulary strings,
    or integer codes into ``vocab[name]`` (-1 = unknown); ``group`` instead of ``race`` for synthetic
    codes; yaw and pitch in degrees (NaN = unknown)."""
    if store is not None:
        if any(x is not None for x in (age, gender, race, group, yaw, pitch)):
            raise FacetoolError("cohort codes come from a store or from arrays, not both")
        if isinstance(store, FaceStore):
            arrays = _store_arrays(store)
        else:
            with FaceStore(store) as s:
                arrays = _store_arrays(s)
        vocab = arrays.pop("vocab")
        age, gender, yaw, pitch = arrays["age"], arrays["gender"], arrays["yaw"], arrays["pitch"]
        race, group = arrays.get("race"), arrays.get("group")
    given = {"age": age, "gender": gender, "yaw": yaw, "pitch": pitch}
    missing = [k for k, v in given.items() if v is None] + ([] if (race is None) != (group is None) else ["race"])
    if missing:
        raise FacetoolError(f"cohort codes need age, gender, race (or group), yaw and pitch; "
                            f"missing or ambiguous: {', '.join(missing)}")
    vocab = vocab or {}
    rname, rvals = ("race", race) if race is not None else ("group", group)
    parts = {"age": _attribute_digits("age", age, vocab.get("age")),
             "gender": _attribute_digits("gender", gender, vocab.get("gender")),
             "race": _attribute_digits(rname, rvals, vocab.get(rname)),
             "pitch": _pose_digits(pitch, "pitch"), "yaw": _pose_digits(yaw, "yaw")}
    n = {len(v) for v in parts.values()}
    if len(n) != 1:
        raise FacetoolError(f"cohort arrays must have one length, got {sorted(n)}")
    return parts


def cohort_codes(store: str | Path | FaceStore | None = None, **arrays: Any) -> np.ndarray:
    """The thesis's cohort of each image (0..269, int64; -1 where any part is unknown, which
    :func:`cluster_scores` leaves out): from a face store or arrays, as :func:`cohort_parts` takes them."""
    parts = cohort_parts(store, **arrays)
    code = np.zeros(len(parts["age"]), np.int64)
    for name, n in COHORT_PARTS.items():
        code = code * n + parts[name]
    known = np.all([parts[name] >= 0 for name in COHORT_PARTS], axis=0)
    return np.where(known, code, UNKNOWN)


def cohort_digits(code: int) -> str:
    """The five digits (age, gender, race, pitch, yaw) of a cohort code, as the thesis writes cohorts
    ('10422'); '-' for -1."""
    if code < 0:
        return "-"
    if code >= NUM_COHORTS:
        raise FacetoolError(f"cohort code must be below {NUM_COHORTS}, got {code}")
    digits = []
    for n in reversed(COHORT_PARTS.values()):
        code, d = divmod(int(code), n)
        digits.append(str(d))
    return "".join(reversed(digits))


__all__ = ["COHORT_PARTS", "NUM_COHORTS", "cluster_purity", "cluster_scores", "cohort_parts", "cohort_codes",
           "cohort_digits"]
