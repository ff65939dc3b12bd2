"""The face dictionary of Hierarchical Network Dissection, built from any face store or a user CSV.

A dictionary is a set of images, each with

* **local concepts**: a binary mask per concept the image carries, each concept in one facial
  *region* (``eye``, ``cheek``, ``nose``, ``mouth``, ``chin``). Concepts are *parts* (left/right
  eye, left/right brow, nose, mouth, left/right cheek, chin) or *local attributes* (glasses, beard,
  smiling ...: the attribute's region mask on the images where the attribute is present);
* **global concepts**: the store's categorical attributes that have no location (age, gender,
  skin, group/race, ...), one *group* per attribute with its values (unknown = -1).

Where the masks come from:

* stores with part masks (``prepare synthetic``): the exact rendered masks. ``eyes``, ``brows`` and
  ``cheeks`` are split into image-left/right halves by the perpendicular bisector of the two eye
  landmarks (HND's dictionary has left/right parts); ``accessory`` (glasses frame) is hole-filled
  to the area the glasses cover; ``beard`` is the beard mask. The chin is geometric (below).
* stores with only the 5 landmarks (RetinaFace / arcface order: image-left eye, image-right eye,
  nose tip, image-left and image-right mouth corner): every part is drawn from the landmarks in a
  face frame of inter-ocular distance ``d``, axis ``u`` (left eye -> right eye) and ``v`` (u turned
  90 degrees, pointing down), see :data:`GEOMETRY` and :func:`landmark_parts`. The report draws
  them over a few faces.
* a user dictionary in the published HND layout: a CSV ``image,labels`` whose ``labels`` is a
  ``;``-separated list of mask PNG paths (relative to the CSV's folder); the concept is the PNG's
  file stem (``left_eye.png`` -> ``left_eye``), its region comes from HND's concept table
  (:data:`HND_REGIONS`; unknown names go to region ``other``). Missing files and masks of another
  size than their image are skipped and counted.

Local attributes come from categorical store attributes whose name (lower case) is in
:data:`LOCAL_ATTRIBUTES`; every other categorical attribute with 2..12 values is a global group.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

from facetool.errors import FacetoolError

REGIONS = ("eye", "cheek", "nose", "mouth", "chin")

#: HND's published concept -> region table (their 38 localisable concepts; facts of the paper's dictionary)
HND_REGIONS: dict[str, str] = {
    **{c: "eye" for c in ("AU_1", "AU_2", "AU_4", "AU_5", "left_brow", "right_brow", "left_eye", "right_eye",
                          "Arched_Eyebrows", "Bushy_Eyebrows", "Eyeglasses", "Narrow_Eyes", "glasses")},
    **{c: "cheek" for c in ("AU_6", "left_cheek", "right_cheek", "Bags_Under_Eyes", "High_Cheekbones",
                            "Rosy_Cheeks", "No_Beard", "5_o_Clock_Shadow")},
    **{c: "nose" for c in ("AU_9", "nose", "Big_Nose", "Pointy_Nose")},
    **{c: "mouth" for c in ("AU_12", "AU_15", "AU_20", "AU_25", "mouth", "Big_Lips", "Mouth_Slightly_Open",
                            "Mustache", "Smiling", "Wearing_Lipstick")},
    **{c: "chin" for c in ("AU_17", "AU_26", "Double_Chin", "Goatee", "chin", "beard")},
}

#: local attributes: lower-case attribute (or value) name -> (region, geometric part(s) giving its mask)
LOCAL_ATTRIBUTES: dict[str, tuple[str, tuple[str, ...]]] = {
    "glasses": ("eye", ("glasses",)),
    "eyeglasses": ("eye", ("glasses",)),
    "accessory": ("eye", ("glasses",)),
    "beard": ("chin", ("beard",)),
    "facial_hair": ("chin", ("beard",)),
    "goatee": ("chin", ("chin",)),
    "double_chin": ("chin", ("chin",)),
    "mustache": ("mouth", ("mustache",)),
    "smiling": ("mouth", ("mouth",)),
    "mouth_slightly_open": ("mouth", ("mouth",)),
    "big_lips": ("mouth", ("mouth",)),
    "wearing_lipstick": ("mouth", ("mouth",)),
    "arched_eyebrows": ("eye", ("left_brow", "right_brow")),
    "bushy_eyebrows": ("eye", ("left_brow", "right_brow")),
    "narrow_eyes": ("eye", ("left_eye", "right_eye")),
    "bags_under_eyes": ("cheek", ("left_cheek", "right_cheek")),
    "high_cheekbones": ("cheek", ("left_cheek", "right_cheek")),
    "rosy_cheeks": ("cheek", ("left_cheek", "right_cheek")),
    "5_o_clock_shadow": ("chin", ("chin", "left_cheek", "right_cheek")),
    "big_nose": ("nose", ("nose",)),
    "pointy_nose": ("nose", ("nose",)),
}

#: attribute values that mean "absent" for a local attribute
ABSENT = {"none", "no", "0", "-1", "false", "absent", "n", "without", "no_beard"}

#: landmark geometry of each part, in units of the inter-ocular distance d (u: left->right eye,
#: v: down). ``ellipse``: (anchor, offset_u, offset_v, semi-axis along u, semi-axis along v);
#: anchors: L, R = eyes, N = nose tip, M = mouth centre, E = eye midpoint.
GEOMETRY: dict[str, tuple] = {
    "left_eye": ("L", 0.0, 0.0, 0.24, 0.12),
    "right_eye": ("R", 0.0, 0.0, 0.24, 0.12),
    "left_brow": ("L", 0.0, -0.30, 0.30, 0.08),
    "right_brow": ("R", 0.0, -0.30, 0.30, 0.08),
    "left_cheek": ("L", -0.08, 0.62, 0.22, 0.20),
    "right_cheek": ("R", 0.08, 0.62, 0.22, 0.20),
    "chin": ("M", 0.0, 0.42, 0.36, 0.18),
    "mustache": ("M", 0.0, -0.16, 0.34, 0.07),
}
PART_NAMES = ("left_eye", "right_eye", "left_brow", "right_brow", "nose", "mouth", "left_cheek", "right_cheek", "chin")
PART_REGION = {"left_eye": "eye", "right_eye": "eye", "left_brow": "eye", "right_brow": "eye", "nose": "nose",
               "mouth": "mouth", "left_cheek": "cheek", "right_cheek": "cheek", "chin": "chin"}


@dataclass
class Concept:
    name: str
    kind: str  # "part" | "attribute"
    region: str
    source: str = ""  # where the mask comes from (store mask, landmarks, csv)


@dataclass
class GlobalGroup:
    name: str
    values: list[str]
    codes: np.ndarray  # (N,) int, -1 unknown


@dataclass
class DictBatch:
    rows: np.ndarray  # (B,) dictionary rows
    images: np.ndarray  # (B, H, W, 3) uint8
    masks: np.ndarray | None  # (B, K, H, W) bool (all False where the image does not carry the concept)


@dataclass
class FaceDictionary:
    """What dissection needs: images, local concept masks (streamed) and global groups."""

    concepts: list[Concept]
    groups: list[GlobalGroup]
    size: tuple[int, int]
    carry: np.ndarray  # (N, K) bool: image i carries concept k
    source: str = ""
    skipped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.carry.shape[0]) if self.carry is not None else int(len(self.index))

    def scan_carry(self, batch_size: int = 256) -> np.ndarray:
        """Fill ``carry`` with one pass over the masks (dissection does it during its IoU pass)."""
        if self.carry is None:
            carry = np.zeros((len(self), len(self.concepts)), bool)
            for b in self.batches(batch_size):
                carry[b.rows] = b.masks.any(axis=(2, 3))
            self.carry = carry
        return self.carry

    @property
    def regions(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for k, c in enumerate(self.concepts):
            out.setdefault(c.region, []).append(k)
        return out

    def batches(self, batch_size: int, masks: bool = True) -> Iterator[DictBatch]:
        for a in range(0, len(self), batch_size):
            yield self.batch(np.arange(a, min(a + batch_size, len(self))), masks)

    def batch(self, rows: np.ndarray, masks: bool = True) -> DictBatch:  # pragma: no cover - subclasses
        """Images and (unless ``masks`` is False: ``masks`` is then None) the concept masks of ``rows``."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def summary(self) -> dict:
        self.scan_carry()
        return {"source": self.source, "images": len(self), "size": list(self.size),
                "concepts": [{"name": c.name, "kind": c.kind, "region": c.region, "source": c.source,
                              "images": int(self.carry[:, k].sum())} for k, c in enumerate(self.concepts)],
                "groups": [{"name": g.name, "values": g.values,
                            "images": {v: int((g.codes == i).sum()) for i, v in enumerate(g.values)}}
                           for g in self.groups],
                "skipped": dict(self.skipped), "notes": list(self.notes)}


# ------------------------------------------------------------------------------ landmark geometry
def _frame(lm: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, float]:
    lm = np.asarray(lm, np.float64)
    L, R, N, ML, MR = lm
    d = float(np.linalg.norm(R - L))
    u = (R - L) / max(d, 1e-6)
    v = np.array([-u[1], u[0]])
    anchors = {"L": L, "R": R, "N": N, "M": (ML + MR) / 2, "E": (L + R) / 2}
    return anchors, u, v, d


def _ellipse_poly(c: np.ndarray, u: np.ndarray, v: np.ndarray, a: float, b: float, n: int = 32) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return c + np.outer(a * np.cos(t), u) + np.outer(b * np.sin(t), v)


def _fill(poly: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    m = np.zeros(size, np.uint8)
    cv2.fillPoly(m, [np.round(poly * 16).astype(np.int32).reshape(-1, 1, 2)], 1, cv2.LINE_8, 4)
    return m.astype(bool)


def landmark_polygons(lm: np.ndarray) -> dict[str, np.ndarray]:
    """The polygon (n, 2) of every geometric part (:data:`PART_NAMES` + mustache + glasses, beard)
    in image coordinates, from 5 landmarks."""
    A, u, v, d = _frame(lm)
    out: dict[str, np.ndarray] = {}
    for name, (anchor, du, dv, a, b) in GEOMETRY.items():
        out[name] = _ellipse_poly(A[anchor] + d * (du * u + dv * v), u, v, a * d, b * d)
    # nose: trapezoid from between the eyes down to the nostrils
    E, N = A["E"], A["N"]
    top = E + 0.12 * d * v
    out["nose"] = np.stack([top - 0.08 * d * u, top + 0.08 * d * u, N + 0.20 * d * u + 0.10 * d * v,
                            N - 0.20 * d * u + 0.10 * d * v])
    # mouth: ellipse through the corners
    ML, MR = lm[3].astype(np.float64), lm[4].astype(np.float64)
    w = float(np.linalg.norm(MR - ML))
    mu = (MR - ML) / max(w, 1e-6)
    out["mouth"] = _ellipse_poly((ML + MR) / 2, mu, np.array([-mu[1], mu[0]]), w / 2 + 0.04 * d, 0.14 * d)
    # glasses: a band over both eyes and brows; beard: jaw band below the mouth corners
    out["glasses"] = np.stack([A["L"] - 0.45 * d * u - 0.30 * d * v, A["R"] + 0.45 * d * u - 0.30 * d * v,
                               A["R"] + 0.45 * d * u + 0.22 * d * v, A["L"] - 0.45 * d * u + 0.22 * d * v])
    M = A["M"]
    out["beard"] = np.stack([ML - 0.25 * d * u - 0.05 * d * v, MR + 0.25 * d * u - 0.05 * d * v,
                             MR + 0.20 * d * u + 0.45 * d * v, M + 0.70 * d * v, ML - 0.20 * d * u + 0.45 * d * v])
    return out


def landmark_parts(lm: np.ndarray, size: tuple[int, int], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Boolean masks (H, W) of the geometric parts drawn from 5 landmarks."""
    polys = landmark_polygons(lm)
    return {n: _fill(polys[n], size) for n in (names or polys)}


@lru_cache(maxsize=4)
def _pixel_grid(H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    return xx + 0.5, yy + 0.5


def _left_side(lm: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pixels on the image-left side of the perpendicular bisector of the eye landmarks."""
    L, R = np.asarray(lm[0], np.float64), np.asarray(lm[1], np.float64)
    mid, u = (L + R) / 2, R - L
    xx, yy = _pixel_grid(*size)
    return (xx - mid[0]) * u[0] + (yy - mid[1]) * u[1] < 0


def _split_lr(mask: np.ndarray, lm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a mask into its image-left / image-right halves at the bisector of the eye landmarks."""
    left = _left_side(lm, mask.shape)
    return mask & left, mask & ~left


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of a mask (areas enclosed by it, e.g. glasses lenses)."""
    if not mask.any():
        return mask
    m = mask.astype(np.uint8)
    H, W = m.shape
    pad = np.zeros((H + 2, W + 2), np.uint8)
    pad[1:-1, 1:-1] = m
    flood = pad.copy()
    ff = np.zeros((H + 4, W + 4), np.uint8)
    cv2.floodFill(flood, ff, (0, 0), 1)
    holes = flood[1:-1, 1:-1] == 0
    return mask | holes


def _is_binary_present(values: list[str]) -> list[int]:
    """Codes of the values that mean 'present'."""
    return [i for i, v in enumerate(values) if str(v).strip().lower() not in ABSENT]


# ------------------------------------------------------------------------------ store dictionary
def stratified_sample(rows: np.ndarray, labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` of ``rows`` stratified by identity (``labels``): every identity gives the same number of
    images, one more for some when ``n`` does not divide evenly (an identity with too few gives all it
    has, the others make up the rest). The images of each identity and the identities that give one
    more are drawn with a fixed seed: the same sample on every run. Returned in store order.

    (The first ``n`` rows of a store are its first few identities: a dictionary of two people, whose
    global groups then lack most of their values.)"""
    rows, labels = np.asarray(rows), np.asarray(labels)
    if n >= len(rows):
        return rows.copy()
    rng = np.random.default_rng(seed)
    ids = np.unique(labels)
    per = [rng.permutation(rows[labels == ids[i]]) for i in rng.permutation(len(ids))]
    chosen: list[int] = []
    r = 0
    while len(chosen) < n:
        for lst in per:
            if r < len(lst) and len(chosen) < n:
                chosen.append(int(lst[r]))
        r += 1
    return np.sort(np.asarray(chosen, rows.dtype))


class StoreDictionary(FaceDictionary):
    """Face dictionary over a face store (part masks where the store has them, else landmarks)."""

    def __init__(self, path: str | Path, *, split: str = "all", limit: int | None = None,
                 local_attributes: bool = True, global_groups: Sequence[str] | None = None) -> None:
        from facetool.data.sources import face_source
        from facetool.store import FaceStore

        self.store = FaceStore(face_source(path))
        s = self.store
        idx = s.indices(split)
        sampled = limit is not None and int(limit) < len(idx)
        if sampled:
            n_all, n_ids = len(idx), len(np.unique(s.labels[idx]))
            idx = stratified_sample(idx, s.labels[idx], int(limit))
        if len(idx) == 0:
            raise FacetoolError(f"store {Path(path).name} has no images in split {split!r}")
        self.index = np.asarray(idx, np.int64)
        H, W = s.image_size
        lms = s.landmarks[self.index]
        self.lms = lms
        store_parts = s.parts
        have_lm = np.isfinite(lms).all(axis=(1, 2))
        has_masks = bool(store_parts) and all(p in store_parts for p in ("eyes", "nose", "mouth"))
        if not has_masks and not have_lm.any():
            raise FacetoolError(
                f"store {Path(path).name} has neither part masks nor 5-point landmarks; the face dictionary needs "
                "one of them (prepare synthetic writes masks; prepare folder/imdb-face with alignment writes landmarks)")
        self.store_parts = store_parts if has_masks else []
        self.have_lm = have_lm
        concepts: list[Concept] = []
        # parts
        for name in PART_NAMES:
            if has_masks and name != "chin":
                src = "store mask" + (" (split at the eye bisector)" if name.startswith(("left", "right")) else "")
            else:
                src = "landmarks"
            concepts.append(Concept(name, "part", PART_REGION[name], src))
        # local attributes
        self.attr_specs: list[tuple[int, np.ndarray, str]] = []  # (concept index, present (N,) bool, mask recipe)
        names_img = set(s.attribute_names("image")) | set(s.attribute_names("identity"))
        group_names: list[str] = []
        for a in sorted(names_img):
            codes, values = s.attribute(a)
            codes = codes[self.index]
            key = a.strip().lower()
            if local_attributes and key in LOCAL_ATTRIBUTES:
                region, recipe = LOCAL_ATTRIBUTES[key]
                for code in _is_binary_present(values):
                    vname = str(values[code]).strip()
                    vkey = vname.lower()
                    cname = vkey if vkey in LOCAL_ATTRIBUTES else (a if len(values) == 2 else f"{a}={vname}")
                    creg, crec = LOCAL_ATTRIBUTES.get(vkey, (region, recipe))
                    present = codes == code
                    if not present.any():
                        continue
                    mask_src = self._attr_source(crec)
                    concepts.append(Concept(cname, "attribute", creg, f"{a}={vname}: {mask_src}"))
                    self.attr_specs.append((len(concepts) - 1, present, crec[0] if len(crec) == 1 else "+".join(crec)))
            elif key not in LOCAL_ATTRIBUTES and 2 <= len(values) <= 12:
                group_names.append(a)
        if global_groups is not None:
            unknown = [g for g in global_groups if g not in names_img]
            if unknown:
                raise FacetoolError(f"store has no attribute {', '.join(map(repr, unknown))} for a global group "
                                    f"(has: {', '.join(sorted(names_img)) or 'none'})")
            group_names = list(global_groups)
        groups = []
        for a in group_names:
            codes, values = s.attribute(a)
            groups.append(GlobalGroup(a, list(values), codes[self.index].astype(np.int64)))
        self.concepts, self.groups, self.size = concepts, groups, (H, W)
        self.source = str(path)
        self.skipped = {"no landmarks (landmark parts empty)": int((~have_lm).sum())} if (~have_lm).any() else {}
        self.notes = []
        if sampled:
            self.notes.append(f"--limit {len(self.index)}: a fixed sample of the {n_all} images of split {split}, "
                              f"stratified by identity ({n_ids} identities)")
        if has_masks:
            self.notes.append("parts from the store's exact part masks; chin from the 5 landmarks")
        else:
            self.notes.append("parts drawn from the 5 landmarks (see the geometry figure)")
        # which image carries which concept: known exactly after one pass over the masks; dissection
        # fills it in during its IoU pass (see ``scan_carry`` for a standalone scan)
        self.carry = None  # type: ignore[assignment]

    def _attr_source(self, recipe: tuple[str, ...]) -> str:
        if self.store_parts and recipe == ("glasses",) and "accessory" in self.store_parts:
            return "store accessory mask, holes filled"
        if self.store_parts and recipe == ("beard",) and "beard" in self.store_parts:
            return "store beard mask"
        return "landmarks: " + "+".join(recipe)

    def _part(self, rows: np.ndarray, bits: np.ndarray | None, name: str, b: int, cache: dict) -> np.ndarray:
        H, W = self.size
        i = int(rows[b])
        if self.store_parts and name in ("left_eye", "right_eye", "left_brow", "right_brow", "left_cheek",
                                         "right_cheek", "nose", "mouth", "glasses", "beard"):
            pm = bits[b]
            store_name = {"left_eye": "eyes", "right_eye": "eyes", "left_brow": "brows", "right_brow": "brows",
                          "left_cheek": "cheeks", "right_cheek": "cheeks", "nose": "nose", "mouth": "mouth",
                          "glasses": "accessory", "beard": "beard"}[name]
            if store_name in self.store_parts:
                m = (pm & np.uint16(1 << self.store_parts.index(store_name))) > 0
                if name == "glasses":
                    return _fill_holes(m)
                if name.startswith(("left", "right")):
                    if not self.have_lm[i]:
                        return np.zeros((H, W), bool)
                    if "_left" not in cache:
                        cache["_left"] = _left_side(self.lms[i], (H, W))
                    return m & (cache["_left"] if name.startswith("left") else ~cache["_left"])
                return m
        if not self.have_lm[i]:
            return np.zeros((H, W), bool)
        if "_polys" not in cache:
            cache["_polys"] = landmark_polygons(self.lms[i])
        return _fill(cache["_polys"][name], (H, W))

    def _masks(self, rows: np.ndarray) -> np.ndarray:
        H, W = self.size
        K = len(self.concepts) if hasattr(self, "concepts") else 0
        out = np.zeros((len(rows), K, H, W), bool)
        bits = None
        if self.store_parts:
            sr = self.index[rows]
            order = np.argsort(sr)
            bits = np.empty((len(rows), H, W), np.uint16)
            bits[order] = self.store.f["part_masks"][np.sort(sr)] if len(np.unique(sr)) == len(sr) else \
                np.stack([self.store.f["part_masks"][int(r)] for r in np.sort(sr)])
        for b in range(len(rows)):
            cache: dict[str, np.ndarray] = {}

            def part(name: str) -> np.ndarray:
                if name not in cache:
                    cache[name] = self._part(rows, bits, name, b, cache)
                return cache[name]

            for k, c in enumerate(self.concepts):
                if c.kind == "part":
                    out[b, k] = part(c.name)
            for k, present, recipe in self.attr_specs:
                if present[rows[b]]:
                    m = np.zeros((H, W), bool)
                    for name in recipe.split("+"):
                        m |= part(name)
                    out[b, k] = m
        return out

    def batch(self, rows: np.ndarray, masks: bool = True) -> DictBatch:
        rows = np.asarray(rows)
        return DictBatch(rows, self.store.images(self.index[rows]), self._masks(rows) if masks else None)

    def close(self) -> None:
        self.store.close()


# ------------------------------------------------------------------------------ user CSV dictionary
def _read_image(path: Path, flags: int) -> np.ndarray | None:
    try:
        data = np.fromfile(str(path), np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    return cv2.imdecode(data, flags)


class CsvDictionary(FaceDictionary):
    """A user dictionary in the published HND layout: ``image,labels`` (``;``-separated mask PNGs).

    All images must have one size (the first readable image sets it); rows whose image is missing or
    of another size, and masks that are missing or of another size than their image, are skipped and
    counted in ``skipped``."""

    def __init__(self, csv_path: str | Path, *, limit: int | None = None) -> None:
        p = Path(csv_path)
        if not p.is_file():
            raise FacetoolError(f"dictionary CSV not found: {p}")
        root = p.parent
        try:
            with open(p, newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise FacetoolError(f"cannot read dictionary CSV {p}: {e}") from None
        if not rows or [c.strip().lower() for c in rows[0][:2]] != ["image", "labels"]:
            raise FacetoolError(f"dictionary CSV {p} must start with the header 'image,labels' "
                                "(labels: ';'-separated mask PNG paths, one per concept, as in HND's visual_dictionary)")
        skipped = {"missing image": 0, "image of another size": 0, "missing mask": 0, "mask of another size": 0}
        items: list[tuple[Path, dict[str, Path]]] = []
        size: tuple[int, int] | None = None
        for r in rows[1:]:
            if not r or not r[0].strip():
                continue
            if limit is not None and len(items) >= limit:
                break
            img_p = root / r[0].strip()
            img = _read_image(img_p, cv2.IMREAD_COLOR) if img_p.is_file() else None
            if img is None:
                skipped["missing image"] += 1
                continue
            if size is None:
                size = img.shape[:2]
            if img.shape[:2] != size:
                skipped["image of another size"] += 1
                continue
            masks: dict[str, Path] = {}
            for m in (r[1] if len(r) > 1 else "").split(";"):
                m = m.strip()
                if not m:
                    continue
                mp = root / m
                mk = _read_image(mp, cv2.IMREAD_GRAYSCALE) if mp.is_file() else None
                if mk is None:
                    skipped["missing mask"] += 1
                    continue
                if mk.shape[:2] != img.shape[:2]:
                    skipped["mask of another size"] += 1
                    continue
                masks[mp.stem] = mp
            items.append((img_p, masks))
        if not items or size is None:
            raise FacetoolError(f"dictionary CSV {p} has no readable image ({', '.join(f'{k}: {v}' for k, v in skipped.items() if v) or 'no rows'})")
        names = sorted({n for _, ms in items for n in ms}, key=lambda n: (REGIONS.index(HND_REGIONS[n]) if n in HND_REGIONS else 9, n))
        if not names:
            raise FacetoolError(f"dictionary CSV {p}: no readable concept mask ({', '.join(f'{k}: {v}' for k, v in skipped.items() if v)})")
        self.items = items
        self.concepts = [Concept(n, "part" if n in PART_REGION or n in ("nose", "mouth") else "attribute",
                                 HND_REGIONS.get(n, "other"), "csv mask") for n in names]
        self.groups = []
        self.size = (int(size[0]), int(size[1]))
        self.source = str(p)
        self.skipped = {k: v for k, v in skipped.items() if v}
        self.notes = ["user dictionary (HND layout); concept = mask file stem"]
        self._k = {n: k for k, n in enumerate(names)}
        self.index = np.arange(len(items))
        self.carry = None  # type: ignore[assignment]

    def batch(self, rows: np.ndarray, masks: bool = True) -> DictBatch:
        rows = np.asarray(rows)
        H, W = self.size
        imgs = np.empty((len(rows), H, W, 3), np.uint8)
        out = np.zeros((len(rows), len(self.concepts), H, W), bool) if masks else None
        for b, r in enumerate(rows):
            ip, ms = self.items[int(r)]
            imgs[b] = cv2.cvtColor(_read_image(ip, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            if out is not None:
                for n, mp in ms.items():
                    out[b, self._k[n]] = _read_image(mp, cv2.IMREAD_GRAYSCALE) > 127
        return DictBatch(rows, imgs, out)


def load_dictionary(store: str | Path | None = None, dictionary_csv: str | Path | None = None, *,
                    split: str = "all", limit: int | None = None,
                    global_groups: Sequence[str] | None = None) -> FaceDictionary:
    """A face dictionary from a store or (``dictionary_csv``) a user CSV."""
    if (store is None) == (dictionary_csv is None):
        raise FacetoolError("give exactly one of --store (a face store) or --dictionary (a user dictionary CSV)")
    if dictionary_csv is not None:
        return CsvDictionary(dictionary_csv, limit=limit)
    return StoreDictionary(store, split=split, limit=limit, global_groups=global_groups)
