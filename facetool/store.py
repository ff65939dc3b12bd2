"""The facetool HDF5 face store: one format shared by every command.

Layout (all per-image arrays have length N, per-identity arrays length M)::

    /images                 uint8  (N, H, W, 3)  aligned RGB crops, chunked one image per chunk
    /labels                 int64  (N,)          identity index into /identities
    /identities             str    (M,)          identity names
    /split                  uint8  (N,)          0 = train, 1 = test (attr ``names``)
    /source                 str    (N,)          source path (relative to the dataset root)
    /bbox                   float32(N, 4)        original box x1 y1 x2 y2 in source pixels (NaN: unknown)
    /landmarks              float32(N, 5, 2)     5 points in crop coordinates (NaN: unknown)
    /attributes/<name>      int16  (N,)          per-image categorical codes, -1 = unknown;
                                                 attrs: ``values`` (JSON list), ``provenance``
    /identity_attributes/<name> int16 (M,)       per-identity codes, same conventions
    /part_masks             uint16 (N, H, W)     optional; bit p set where part ``parts[p]`` is
    /meta/<name>            float32(N, ...)      optional per-image numbers (e.g. pose yaw/pitch/roll)
    /landmark_sets/<conv>/points  float32(N, L, 2)  optional dense landmarks of a convention of
                                                 :mod:`facetool.data.landmarks` (``ibug68``: L = 68, ``wflw98``:
                                                 98) in crop pixel coordinates (0-based; NaN: unknown); attrs
                                                 ``convention``, ``num_points``
    /landmark_sets/<conv>/visible bool   (N, L)  whether each point is visible (not occluded / self-occluded)

Root attributes: ``format`` = "facetool-store", ``format_version``, ``source``, ``tool_version``,
``created``, ``image_size`` (H, W), ``preprocessing`` (JSON), ``template`` (JSON), ``complete``.

Writes go to ``<out>.partial`` and are renamed onto ``<out>`` by :meth:`StoreWriter.finalize`, so a
store on disk under its real name is always complete. An interrupted writer can be reopened with
``resume=True``; it continues after the last flushed record (see :attr:`StoreWriter.cursor`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import h5py
import numpy as np

from facetool import __version__
from facetool.errors import FacetoolError, clip_message
from facetool.io import STORE_SUFFIXES, atomic_path, guard_output, note_kept, partial_path, record_output

FORMAT = "facetool-store"
FORMAT_VERSION = 1
SPLITS = ("train", "test")
UNKNOWN = -1
_STR = h5py.string_dtype("utf-8")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _decode(a: Any) -> Any:
    if isinstance(a, bytes):
        return a.decode("utf-8")
    return a


@dataclass
class Record:
    """One aligned face to append to a store."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    label: int
    split: int = 0
    source: str = ""
    bbox: Sequence[float] | None = None
    landmarks: np.ndarray | None = None  # (5, 2) crop coordinates
    attributes: dict[str, int] | None = None  # name -> code
    part_mask: np.ndarray | None = None  # (H, W) uint16 bitmask
    meta: dict[str, Sequence[float] | float] | None = None
    landmark_sets: dict[str, tuple[np.ndarray, np.ndarray]] | None = None  # conv -> (points (L, 2), visible (L,))


class StoreWriter:
    """Streaming writer. Memory stays bounded: records are buffered ``flush_every`` at a time.

    ``cursor`` is an opaque integer the caller advances (e.g. the index into its list of planned
    inputs, including skipped ones) and reads back on resume; ``counters`` holds skip counts.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        image_size: tuple[int, int],
        identities: Sequence[str],
        attribute_values: dict[str, Sequence[str]] | None = None,
        identity_attributes: dict[str, tuple[Sequence[str], Sequence[int]]] | None = None,
        parts: Sequence[str] | None = None,
        meta_shapes: dict[str, tuple[int, ...]] | None = None,
        landmark_sets: dict[str, int] | None = None,
        source: str = "",
        preprocessing: dict | None = None,
        template: Any = None,
        overwrite: bool = False,
        resume: bool = False,
        flush_every: int = 256,
    ) -> None:
        self.path = Path(path)
        guard_output(self.path, overwrite=overwrite, suffix=STORE_SUFFIXES)
        self.tmp = partial_path(self.path)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.attribute_values = {k: list(v) for k, v in (attribute_values or {}).items()}
        self.parts = list(parts) if parts else []
        self.meta_shapes = {k: tuple(v) for k, v in (meta_shapes or {}).items()}
        self.landmark_sets = {str(k): int(v) for k, v in (landmark_sets or {}).items()}  # convention -> L
        self.flush_every = flush_every
        self._buf: list[Record] = []
        self.preprocessing = preprocessing or {}
        settings_d: dict[str, Any] = {"preprocessing": self.preprocessing, "image_size": self.image_size,
                                      "identities": len(identities)}
        if self.landmark_sets:  # only then, so that the settings of stores without them stay as they were
            settings_d["landmark_sets"] = self.landmark_sets
        settings = json.dumps(settings_d, sort_keys=True, default=str)
        self.resumed = False
        if resume and self.tmp.exists():
            try:
                self.f = h5py.File(self.tmp, "a")
            except OSError:
                raise FacetoolError(f"cannot resume: {self.tmp} is corrupt; delete it to start over") from None
            if self.f.attrs.get("settings") != settings:
                self.f.close()
                raise FacetoolError(
                    f"cannot resume {self.tmp}: it was started with other settings; delete it or use the same options"
                )
            self.resumed = True
            # Drop anything written after the last consistent flush.
            n = int(self.f.attrs["n_flushed"])
            for name in self._row_datasets():
                if self.f[name].shape[0] != n:
                    self.f[name].resize(n, axis=0)
            return
        if self.tmp.exists():
            self.tmp.unlink()
        try:
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            self.f = h5py.File(self.tmp, "w")
        except OSError as e:
            raise FacetoolError(f"cannot write store {self.tmp}: {e}") from None
        H, W = self.image_size
        f = self.f
        f.attrs.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            source=source,
            tool_version=__version__,
            created=_now(),
            image_size=np.array(self.image_size),
            preprocessing=json.dumps(self.preprocessing, default=str),
            template=json.dumps(np.asarray(template).tolist() if template is not None else None),
            complete=False,
            settings=settings,
            n_flushed=0,
            cursor=0,
            counters="{}",
        )
        f.create_dataset("images", (0, H, W, 3), np.uint8, maxshape=(None, H, W, 3), chunks=(1, H, W, 3))
        f.create_dataset("labels", (0,), np.int64, maxshape=(None,), chunks=(4096,))
        f.create_dataset("split", (0,), np.uint8, maxshape=(None,), chunks=(4096,))
        f["split"].attrs["names"] = json.dumps(list(SPLITS))
        f.create_dataset("source", (0,), _STR, maxshape=(None,), chunks=(1024,))
        f.create_dataset("bbox", (0, 4), np.float32, maxshape=(None, 4), chunks=(4096, 4))
        f.create_dataset("landmarks", (0, 5, 2), np.float32, maxshape=(None, 5, 2), chunks=(4096, 5, 2))
        f.create_dataset("identities", data=np.array(list(identities), dtype=object), dtype=_STR)
        g = f.create_group("attributes")
        for name, values in self.attribute_values.items():
            d = g.create_dataset(name, (0,), np.int16, maxshape=(None,), chunks=(4096,))
            d.attrs["values"] = json.dumps(list(values))
            d.attrs["provenance"] = source
        gi = f.create_group("identity_attributes")
        for name, (values, codes) in (identity_attributes or {}).items():
            d = gi.create_dataset(name, data=np.asarray(codes, dtype=np.int16))
            d.attrs["values"] = json.dumps(list(values))
            d.attrs["provenance"] = source
        if self.parts:
            d = f.create_dataset("part_masks", (0, H, W), np.uint16, maxshape=(None, H, W), chunks=(1, H, W))
            d.attrs["parts"] = json.dumps(self.parts)
        gm = f.create_group("meta")
        for name, shape in self.meta_shapes.items():
            gm.create_dataset(name, (0, *shape), np.float32, maxshape=(None, *shape))
        if self.landmark_sets:
            gl = f.create_group("landmark_sets")
            for conv, L in self.landmark_sets.items():
                g = gl.create_group(conv)
                g.attrs.update(convention=conv, num_points=L)
                g.create_dataset("points", (0, L, 2), np.float32, maxshape=(None, L, 2), chunks=(1024, L, 2))
                g.create_dataset("visible", (0, L), bool, maxshape=(None, L), chunks=(1024, L))

    # -- state for resume ---------------------------------------------------------------
    def _row_datasets(self) -> list[str]:
        names = ["images", "labels", "split", "source", "bbox", "landmarks"]
        names += [f"attributes/{k}" for k in self.f["attributes"]]
        names += [f"meta/{k}" for k in self.f["meta"]]
        for conv in self.f.get("landmark_sets", {}):
            names += [f"landmark_sets/{conv}/points", f"landmark_sets/{conv}/visible"]
        if "part_masks" in self.f:
            names.append("part_masks")
        return names

    @property
    def cursor(self) -> int:
        return int(self.f.attrs["cursor"])

    @property
    def counters(self) -> dict[str, int]:
        return json.loads(self.f.attrs["counters"])

    def __len__(self) -> int:
        return int(self.f.attrs["n_flushed"]) + len(self._buf)

    # -- writing --------------------------------------------------------------------------
    def append(self, rec: Record) -> None:
        if rec.image.shape != (*self.image_size, 3) or rec.image.dtype != np.uint8:
            raise ValueError(f"image must be uint8 {(*self.image_size, 3)}, got {rec.image.dtype} {rec.image.shape}")
        for conv, (pts, vis) in (rec.landmark_sets or {}).items():
            L = self.landmark_sets.get(conv)
            if L is None:
                raise ValueError(f"landmark set {conv!r} was not declared (declared: {sorted(self.landmark_sets)})")
            if np.shape(pts) != (L, 2) or np.shape(vis) != (L,):
                raise ValueError(f"landmark set {conv!r} needs points ({L}, 2) and visible ({L},), "
                                 f"got {np.shape(pts)} and {np.shape(vis)}")
        self._buf.append(rec)

    def checkpoint(self, cursor: int, counters: dict[str, int] | None = None, force: bool = False) -> None:
        """Record progress; buffered rows are written when the buffer is full (or ``force``)."""
        if force or len(self._buf) >= self.flush_every:
            self._flush(cursor, counters)
        else:
            self._pending = (cursor, dict(counters or {}))

    def _flush(self, cursor: int, counters: dict[str, int] | None) -> None:
        f = self.f
        n0 = int(f.attrs["n_flushed"])
        k = len(self._buf)
        if k:
            n1 = n0 + k
            for name in self._row_datasets():
                f[name].resize(n1, axis=0)
            f["images"][n0:n1] = np.stack([r.image for r in self._buf])
            f["labels"][n0:n1] = [r.label for r in self._buf]
            f["split"][n0:n1] = [r.split for r in self._buf]
            f["source"][n0:n1] = [r.source for r in self._buf]
            nan4 = [np.nan] * 4
            f["bbox"][n0:n1] = np.array([r.bbox if r.bbox is not None else nan4 for r in self._buf], np.float32)
            nan_lm = np.full((5, 2), np.nan, np.float32)
            f["landmarks"][n0:n1] = np.stack(
                [np.asarray(r.landmarks, np.float32) if r.landmarks is not None else nan_lm for r in self._buf]
            )
            for name in f["attributes"]:
                f[f"attributes/{name}"][n0:n1] = [
                    (r.attributes or {}).get(name, UNKNOWN) for r in self._buf
                ]
            for name, shape in self.meta_shapes.items():
                f[f"meta/{name}"][n0:n1] = np.array(
                    [
                        np.asarray((r.meta or {}).get(name, np.full(shape, np.nan)), np.float32).reshape(shape)
                        for r in self._buf
                    ],
                    np.float32,
                )
            for conv, L in self.landmark_sets.items():
                got = [(r.landmark_sets or {}).get(conv) for r in self._buf]
                f[f"landmark_sets/{conv}/points"][n0:n1] = np.stack(
                    [np.asarray(g[0], np.float32) if g is not None else np.full((L, 2), np.nan, np.float32)
                     for g in got])
                f[f"landmark_sets/{conv}/visible"][n0:n1] = np.stack(
                    [np.asarray(g[1], bool) if g is not None else np.zeros(L, bool) for g in got])
            if "part_masks" in f:
                H, W = self.image_size
                zero = np.zeros((H, W), np.uint16)
                f["part_masks"][n0:n1] = np.stack(
                    [r.part_mask.astype(np.uint16) if r.part_mask is not None else zero for r in self._buf]
                )
            self._buf.clear()
            f.attrs["n_flushed"] = n1
        f.attrs["cursor"] = int(cursor)
        f.attrs["counters"] = json.dumps(counters or {})
        f.flush()
        self._pending = None

    def finalize(self, extra_attrs: dict | None = None, drop_empty_identities: bool = False) -> Path:
        """Flush, mark complete and rename ``<out>.partial`` onto ``<out>``."""
        pending = getattr(self, "_pending", None)
        self._flush(pending[0] if pending else self.cursor, pending[1] if pending else self.counters)
        f = self.f
        n = int(f.attrs["n_flushed"])
        if n == 0:
            skipped = {k: v for k, v in self.counters.items() if v}
            self.abort(keep=False)
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "no input"
            raise FacetoolError(f"no images left after filtering ({reasons}); nothing was written")
        if drop_empty_identities:
            labels = f["labels"][:]
            used = np.unique(labels)
            if len(used) < len(f["identities"]):
                remap = np.full(len(f["identities"]), -1, np.int64)
                remap[used] = np.arange(len(used))
                names = [_decode(x) for x in f["identities"][:]]
                f["labels"][:] = remap[labels]
                del f["identities"]
                f.create_dataset("identities", data=np.array([names[i] for i in used], dtype=object), dtype=_STR)
                for name in list(f["identity_attributes"]):
                    d = f[f"identity_attributes/{name}"]
                    codes, attrs = d[:], dict(d.attrs)
                    del f[f"identity_attributes/{name}"]
                    d2 = f["identity_attributes"].create_dataset(name, data=codes[used])
                    d2.attrs.update(attrs)
        for k, v in (extra_attrs or {}).items():
            f.attrs[k] = v if isinstance(v, (int, float, str, np.ndarray)) else json.dumps(v, default=str)
        f.attrs["complete"] = True
        f.close()
        os.replace(self.tmp, self.path)
        record_output(self.path)
        return self.path

    def abort(self, keep: bool = True) -> None:
        """Close after an interruption. ``keep`` leaves ``<out>.partial`` for ``resume``."""
        try:
            pending = getattr(self, "_pending", None)
            if keep and pending is not None:
                self._flush(*pending)
            self.f.close()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        if not keep and self.tmp.exists():
            self.tmp.unlink()
        elif keep and self.tmp.exists():
            note_kept(self.tmp)


class FaceStore:
    """Read access to a complete store. Cheap to open; arrays are read lazily.

    Opening validates the layout (THE check every command relies on): required datasets, their shapes
    and lengths, identity labels inside ``0..M-1``, split codes 0/1. A damaged store is a one-line
    :class:`FacetoolError` naming the file and what is wrong. ``mode="a"`` (writing attributes) on a
    read-only file is refused as read-only, never reported as corrupt.
    """

    def __init__(self, path: str | Path, mode: str = "r") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            hint = " (an interrupted run left a .partial file; rerun with --resume)" if partial_path(self.path).exists() else ""
            raise FacetoolError(f"face store not found: {self.path}{hint}")
        if mode != "r":
            require_writable(self.path)
        try:
            self.f = h5py.File(self.path, mode)
        except OSError as e:
            raise FacetoolError(f"not an HDF5 face store (corrupt or wrong file): {self.path} "
                                f"({clip_message(e, 120)})") from None
        try:
            if self.f.attrs.get("format") != FORMAT:
                raise FacetoolError(f"not a facetool face store: {self.path}")
            if not bool(self.f.attrs.get("complete", False)):
                raise FacetoolError(f"face store is incomplete: {self.path}")
            self._validate()
        except FacetoolError:
            self.f.close()
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:  # h5py on damaged metadata
            self.f.close()
            raise FacetoolError(f"face store {self.path} is corrupt: {clip_message(e, 160)}") from None

    def _validate(self) -> None:
        """Refuse a store whose layout would fail (or silently mislead) later: see the module doc."""
        f, where = self.f, f"face store {self.path}"

        def dataset(name: str) -> h5py.Dataset:
            d = f.get(name)
            if not isinstance(d, h5py.Dataset):
                raise FacetoolError(f"{where} has no {name!r} dataset; it is damaged or was not written by facetool")
            return d

        version = int(f.attrs.get("format_version", FORMAT_VERSION))
        if version > FORMAT_VERSION:
            raise FacetoolError(f"{where} has format version {version}; this facetool reads up to "
                                f"{FORMAT_VERSION} (upgrade facetool)")
        size = tuple(int(x) for x in np.ravel(f.attrs.get("image_size", ())))
        images, labels, ids = dataset("images"), dataset("labels"), dataset("identities")
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
            raise FacetoolError(f"{where}: 'images' must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if len(size) != 2 or images.shape[1:3] != size:
            raise FacetoolError(f"{where}: 'images' are {images.shape[1]}x{images.shape[2]} but the store records "
                                f"image_size {size}")
        n = images.shape[0]
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise FacetoolError(f"{where}: 'labels' must be (N,) integers, got {labels.dtype} {labels.shape}")
        if ids.ndim != 1 or ids.shape[0] < 1:
            raise FacetoolError(f"{where}: 'identities' must be a non-empty (M,) list of names, got shape {ids.shape}")
        m = ids.shape[0]
        shapes = {"labels": (), "split": (), "source": (), "bbox": (4,), "landmarks": (5, 2)}
        if "part_masks" in f:
            shapes["part_masks"] = size
        for name, tail in shapes.items():
            d = dataset(name)
            if d.shape != (n, *tail):
                raise FacetoolError(f"{where}: {name!r} has shape {d.shape}, expected {(n, *tail)} "
                                    f"(one row per image, {n} images)")
        for group, rows, what in (("attributes", n, "image"), ("identity_attributes", m, "identity"),
                                  ("meta", n, "image")):
            for name, d in (f[group].items() if group in f else ()):
                if not isinstance(d, h5py.Dataset) or d.ndim < 1 or d.shape[0] != rows:
                    raise FacetoolError(f"{where}: '{group}/{name}' must have one row per {what} ({rows}), "
                                        f"got shape {getattr(d, 'shape', None)}")
        for conv, g in (f["landmark_sets"].items() if "landmark_sets" in f else ()):
            pts = g.get("points") if isinstance(g, h5py.Group) else None
            vis = g.get("visible") if isinstance(g, h5py.Group) else None
            ok = isinstance(pts, h5py.Dataset) and isinstance(vis, h5py.Dataset) and pts.ndim == 3
            if not ok or pts.shape != (n, pts.shape[1], 2) or vis.shape != (n, pts.shape[1]):
                raise FacetoolError(f"{where}: landmark set {conv!r} must hold 'points' (N, L, 2) and 'visible' "
                                    f"(N, L) with one row per image ({n})")
        self.identities  # noqa: B018 - reading the names checks their storage
        first: dict[str, tuple[int, int]] = {}
        count: dict[str, int] = {"labels": 0, "split": 0}
        step = 1 << 20
        for a in range(0, n, step):  # bounded memory on huge stores
            for name, block, bad in (("labels", lab := labels[a : a + step], (lab < 0) | (lab >= m)),
                                     ("split", sp := f["split"][a : a + step], (sp < 0) | (sp > 1))):
                rows = np.flatnonzero(bad)
                if len(rows) and name not in first:
                    first[name] = (a + int(rows[0]), int(block[rows[0]]))
                count[name] += len(rows)
        if "labels" in first:
            i, v = first["labels"]
            raise FacetoolError(f"{where}: labels must be identity indices 0..{m - 1} ({m} identities), but "
                                f"{count['labels']} row(s) are not (row {i} has {v})")
        if "split" in first:
            i, v = first["split"]
            raise FacetoolError(f"{where}: split codes must be 0 (train) or 1 (test), but {count['split']} row(s) "
                                f"are not (row {i} has {v})")

    # context manager
    def __enter__(self) -> "FaceStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.f.close()
        except Exception:  # noqa: BLE001
            pass

    def __len__(self) -> int:
        return int(self.f["labels"].shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(int(x) for x in self.f.attrs["image_size"])  # type: ignore[return-value]

    @property
    def identities(self) -> list[str]:
        return [_decode(x) for x in self.f["identities"][:]]

    @property
    def num_classes(self) -> int:
        return int(self.f["identities"].shape[0])

    @property
    def labels(self) -> np.ndarray:
        return self.f["labels"][:]

    @property
    def split(self) -> np.ndarray:
        return self.f["split"][:]

    @property
    def sources(self) -> list[str]:
        return [_decode(x) for x in self.f["source"][:]]

    @property
    def landmarks(self) -> np.ndarray:
        return self.f["landmarks"][:]

    @property
    def landmark_conventions(self) -> list[str]:
        """Names of the dense landmark sets this store holds (e.g. ``["ibug68"]``); the 5 alignment points
        (:attr:`landmarks`) are always there and are not one of them."""
        return sorted(self.f["landmark_sets"]) if "landmark_sets" in self.f else []

    def landmark_set(self, convention: str | None = None,
                     idx: Sequence[int] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, str]:
        """``(points (N, L, 2) float32, visible (N, L) bool, convention)`` of one dense landmark set (rows
        ``idx``, default all). ``None`` takes the only set there is; a store without the asked set is a
        one-line error naming what it has and how to get landmarks."""
        have = self.landmark_conventions
        how = ("`facetool prepare synthetic` stores iBUG 68-point landmarks for every image; "
               "`facetool prepare landmarks --format 300w|wflw` imports annotated ones")
        if convention is None:
            if len(have) != 1:
                if not have:
                    raise FacetoolError(f"store {self.path.name} has no dense landmarks (only the 5 alignment "
                                        f"points); {how}")
                raise FacetoolError(f"store {self.path.name} has several landmark sets ({', '.join(have)}); "
                                    "name the convention")
            convention = have[0]
        if convention not in have:
            raise FacetoolError(f"store {self.path.name} has no {convention} landmarks (has: "
                                f"{', '.join(have) or 'only the 5 alignment points'}); {how}")
        g = self.f[f"landmark_sets/{convention}"]
        if idx is None:
            return g["points"][:], g["visible"][:].astype(bool), convention
        idx = np.asarray(idx, np.int64)
        order = np.argsort(idx, kind="stable")
        pts = np.empty((len(idx), *g["points"].shape[1:]), np.float32)
        vis = np.empty((len(idx), g["visible"].shape[1]), bool)
        if len(idx):
            uniq, inv = np.unique(idx[order], return_inverse=True)
            pts[order] = g["points"][uniq][inv]
            vis[order] = g["visible"][uniq][inv]
        return pts, vis, convention

    @property
    def bboxes(self) -> np.ndarray:
        return self.f["bbox"][:]

    @property
    def metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in self.f.attrs.items():
            v = _decode(v)
            if k in ("preprocessing", "template", "counters") and isinstance(v, str):
                v = json.loads(v)
            elif isinstance(v, np.ndarray):
                v = v.tolist()
            elif isinstance(v, np.generic):
                v = v.item()
            out[k] = v
        return out

    def indices(self, split: str | None = None) -> np.ndarray:
        if split in (None, "all"):
            return np.arange(len(self))
        if split not in SPLITS:
            raise FacetoolError(f"unknown split {split!r}; use one of {', '.join(SPLITS)} or all")
        return np.flatnonzero(self.split == SPLITS.index(split))

    def images(self, idx: Iterable[int] | slice | None = None) -> np.ndarray:
        if idx is None:
            return self.f["images"][:]
        if isinstance(idx, slice):
            return self.f["images"][idx]
        idx = np.asarray(list(idx) if not isinstance(idx, np.ndarray) else idx)
        order = np.argsort(idx)
        out = np.empty((len(idx), *self.f["images"].shape[1:]), np.uint8)
        if len(idx):
            out[order] = self.f["images"][np.sort(idx)] if len(np.unique(idx)) == len(idx) else np.stack(
                [self.f["images"][int(i)] for i in np.sort(idx)]
            )
        return out

    # -- attributes -----------------------------------------------------------------------
    def attribute_names(self, level: str = "image") -> list[str]:
        g = "attributes" if level == "image" else "identity_attributes"
        return list(self.f[g].keys()) if g in self.f else []

    def attribute(self, name: str, per_image: bool = True) -> tuple[np.ndarray, list[str]]:
        """Codes and vocabulary of an attribute. Per-image codes fall back to the identity's value
        where the image's own label is unknown (or absent)."""
        vals: list[str] | None = None
        codes: np.ndarray | None = None
        if name in self.f.get("attributes", {}):
            d = self.f[f"attributes/{name}"]
            codes, vals = d[:].astype(np.int64), json.loads(d.attrs["values"])
        if name in self.f.get("identity_attributes", {}):
            d = self.f[f"identity_attributes/{name}"]
            icodes, ivals = d[:].astype(np.int64), json.loads(d.attrs["values"])
            if not per_image:
                return icodes, ivals
            from_id = icodes[self.labels]
            if codes is None:
                codes, vals = from_id, ivals
            else:
                if ivals != vals:
                    remap = np.array([vals.index(v) if v in vals else UNKNOWN for v in ivals] + [UNKNOWN])
                    from_id = remap[from_id]
                codes = np.where(codes == UNKNOWN, from_id, codes)
        if codes is None or vals is None:
            have = sorted(set(self.attribute_names("image")) | set(self.attribute_names("identity")))
            raise FacetoolError(
                f"store {self.path.name} has no attribute {name!r} (has: {', '.join(have) or 'none'}); "
                "add it with `facetool annotate`"
            )
        return codes, vals

    def set_attribute(
        self, name: str, codes: np.ndarray, values: Sequence[str], provenance: str, level: str = "image"
    ) -> None:
        """Add or replace an attribute (store must be opened with mode='a')."""
        g = self.f.require_group("attributes" if level == "image" else "identity_attributes")
        n = len(self) if level == "image" else self.num_classes
        codes = np.asarray(codes, np.int16)
        if codes.shape != (n,):
            raise FacetoolError(f"attribute {name!r} needs {n} codes, got {codes.shape[0]}")
        if name in g:
            del g[name]
        d = g.create_dataset(name, data=codes)
        d.attrs["values"] = json.dumps(list(values))
        d.attrs["provenance"] = provenance

    # -- masks / meta -----------------------------------------------------------------------
    @property
    def parts(self) -> list[str]:
        return json.loads(self.f["part_masks"].attrs["parts"]) if "part_masks" in self.f else []

    def part_masks(self, idx: Sequence[int], part: str) -> np.ndarray:
        """Boolean masks (len(idx), H, W) of one part."""
        if part not in self.parts:
            raise FacetoolError(f"store has no part mask {part!r} (has: {', '.join(self.parts) or 'none'})")
        bit = np.uint16(1 << self.parts.index(part))
        idx = np.asarray(idx)
        return np.stack([(self.f["part_masks"][int(i)] & bit) > 0 for i in idx]) if len(idx) else np.zeros((0,) + self.image_size, bool)

    def meta(self, name: str) -> np.ndarray:
        if name not in self.f.get("meta", {}):
            raise FacetoolError(f"store has no per-image value {name!r}")
        return self.f[f"meta/{name}"][:]

    def summary(self) -> dict[str, Any]:
        split = self.split
        s: dict[str, Any] = {
            "path": str(self.path),
            "images": len(self),
            "identities": self.num_classes,
            "train": int((split == 0).sum()),
            "test": int((split == 1).sum()),
            "image_size": list(self.image_size),
            "source": _decode(self.f.attrs.get("source", "")),
            "attributes": {},
            "parts": self.parts,
        }
        if self.landmark_conventions:
            s["landmark_sets"] = {}
            for conv in self.landmark_conventions:
                g = self.f[f"landmark_sets/{conv}"]
                vis = g["visible"][:]
                s["landmark_sets"][conv] = {"points": int(g["points"].shape[1]),
                                            "visible": round(float(vis.mean()), 4) if vis.size else 0.0}
        for name in sorted(set(self.attribute_names("image")) | set(self.attribute_names("identity"))):
            codes, vals = self.attribute(name)
            s["attributes"][name] = {v: int((codes == i).sum()) for i, v in enumerate(vals)} | {
                "unknown": int((codes == UNKNOWN).sum())
            }
        return s


def require_writable(path: str | Path) -> Path:
    """Refuse to modify a read-only store: no write permission for this user, or no write bit at all (root may
    write anyway; a file marked read-only is still not changed)."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except OSError:
        return p
    if not os.access(p, os.W_OK) or not mode & 0o222:
        raise FacetoolError(f"face store {p} is read-only; facetool does not change a read-only file (make it "
                            "writable, e.g. chmod u+w, or work on a copy)")
    return p


@contextlib.contextmanager
def open_for_update(path: str | Path, in_place: bool = False) -> Iterator[FaceStore]:
    """A store opened for writing. By default a copy is modified and renamed over ``path`` only if
    the block succeeds; ``in_place`` modifies ``path`` directly (the annotate commands default to the copy: see :mod:`facetool.annotate`)."""
    FaceStore(path).close()  # validates: exists, is a complete store
    require_writable(path)
    if in_place:
        with FaceStore(path, "a") as s:
            yield s
        return
    with atomic_path(path) as tmp:
        shutil.copyfile(path, tmp)
        shutil.copymode(path, tmp)
        with FaceStore(tmp, "a") as s:
            yield s
