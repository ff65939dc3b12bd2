"""IMDb-Face as the ConvNet-IIG paper prepared it: box crops resized to 128x128.

The distributed CSV has the columns ``name,index,image,rect,height width,url``: ``rect`` is
``x1 y1 x2 y2`` in the frame ``height width`` (``h w``), which may differ from the size of the file on
disk, so boxes are rescaled to the actual image. Images live under ``<root>/<index>/<image>`` (also
``<root>/<name>_<index>/`` or ``<root>/<name>/``).

Filters, in order, each counted by reason (rows): unparsable row (``bad row``), box aspect ratio w/h
outside [0.75, 1.25] (``aspect``), file not on disk (``missing file``), identity with fewer than
``min_images`` remaining rows (``too few images``). Then, per identity, the rows are tried in a seeded
order (a per-identity stream of ``seed``): a file that does not decode (``unreadable``) or, with
``align="retinaface"``, shows no face in the box (``no face``) is *replaced* by the identity's next
row, until ``per_identity`` usable images are found (at least ``min_images``: with
``per_identity < min_images`` the first ``per_identity`` of them are kept); the rows never tried are
``not sampled``. An identity that ends with fewer than ``min_images`` usable images is dropped (its
other rows: ``too few readable images``). Only then are the identity's images split train/test (seeded), so a
kept identity has ``min(per_identity, usable rows)`` images and the split counts of that number.
"""

from __future__ import annotations

import os
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Hashable

import numpy as np

from facetool.detect.align import align_5pt, bbox_crop, template, transform_points
from facetool.errors import FacetoolError, require_dir, require_file
from facetool.io import STORE_SUFFIXES, guard_output, write_json
from facetool.store import Record

COLUMNS = ("name", "index", "image", "rect", "height width")
ASPECT = (0.75, 1.25)
ALIGN_MODES = ("bbox", "retinaface")


def sample_split(
    groups: dict[Hashable, list[Any]], per_identity: int | None, test_fraction: float, seed: int
) -> dict[Hashable, list[tuple[Any, int]]]:
    """Per identity (in the given order): keep at most ``per_identity`` items (seeded, original order
    kept) and mark ``round(n·test_fraction)`` of them test (1), the rest train (0)."""
    rng = np.random.default_rng(seed)
    out: dict[Hashable, list[tuple[Any, int]]] = {}
    for key, items in groups.items():
        idx = np.arange(len(items))
        if per_identity and len(items) > per_identity:
            idx = np.sort(rng.choice(len(items), per_identity, replace=False))
        test = set(rng.permutation(idx)[: int(round(len(idx) * test_fraction))].tolist())
        out[key] = [(items[i], int(i in test)) for i in idx]
    return out


def check_options(min_images: int, per_identity: int | None, test_fraction: float, size: int, seed: int = 0) -> None:
    if seed < 0:
        raise FacetoolError(f"--seed must be >= 0, got {seed}")
    if min_images < 1:
        raise FacetoolError(f"--min-images must be >= 1, got {min_images}")
    if per_identity is not None and per_identity < 1:
        raise FacetoolError(f"--per-identity must be >= 1, got {per_identity}")
    if not 0.0 <= test_fraction < 1.0:
        raise FacetoolError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    if size < 16:
        raise FacetoolError(f"--size must be >= 16, got {size}")


def read_csv(csv: str | Path):
    """Read the IMDb-Face CSV as strings; missing columns raise a FacetoolError naming them."""
    import pandas as pd

    require_file(csv, "IMDb-Face CSV")
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise FacetoolError(f"cannot read {csv}: {str(e).splitlines()[0][:200]}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise FacetoolError(
            f"{csv} is missing column(s) {', '.join(repr(c) for c in missing)}; expected {','.join(COLUMNS)},url "
            f"(found {','.join(df.columns)})"
        )
    return df


def _floats(text: str, n: int) -> list[float] | None:
    try:
        v = [float(x) for x in str(text).replace(",", " ").split()]
    except ValueError:
        return None
    return v if len(v) == n and all(np.isfinite(v)) else None


def plan(df, root: str | Path, *, min_images: int) -> tuple[list[str], list[tuple], Counter]:
    """Apply the row filters. Returns (identity names, items, counters); an item is one identity
    ``(label, key, rows)`` with rows ``(path relative to root, rect x1 y1 x2 y2, frame (h, w))`` in CSV
    order; sampling and split happen while reading (:class:`_Identity`)."""
    root = Path(root)
    dirs = {e.name for e in os.scandir(root) if e.is_dir()}
    counters: Counter[str] = Counter()
    groups: dict[str, list[tuple]] = {}
    names: dict[str, str] = {}
    for name, index, image, rect, frame in zip(*(df[c].tolist() for c in COLUMNS)):
        box, hw = _floats(rect, 4), _floats(frame, 2)
        unsafe = not image or not index or "/" in image or "\\" in image or image.startswith(".") or index.startswith(".")
        if unsafe or box is None or hw is None or box[2] <= box[0] or box[3] <= box[1] or min(hw) <= 0:
            counters["bad row"] += 1
            continue
        aspect = (box[2] - box[0]) / (box[3] - box[1])
        if not ASPECT[0] <= aspect <= ASPECT[1]:
            counters["aspect"] += 1
            continue
        rel = None
        for d in (index, f"{name}_{index}", name):
            if d in dirs and (root / d / image).is_file():
                rel = f"{d}/{image}"
                break
        if rel is None:
            counters["missing file"] += 1
            continue
        groups.setdefault(index, []).append((rel, tuple(box), tuple(hw)))
        names.setdefault(index, f"{name}_{index}" if name else index)
    identities, items = [], []
    for key in sorted(groups):
        if len(groups[key]) < min_images:
            counters["too few images"] += len(groups[key])
        else:
            items.append((len(identities), key, groups[key]))
            identities.append(names[key])
    return identities, items, counters


def identity_rng(seed: int, key: str) -> np.random.Generator:
    """The sampling/split stream of one identity: depends on ``seed`` and the identity's key only."""
    return np.random.default_rng([int(seed) % 2**63, zlib.crc32(str(key).encode())])


class _Identity:
    """Turns one planned identity into its Records and skip reasons: rows are tried in a seeded order,
    unusable ones replaced by the next, until ``per_identity`` usable images; then the split.
    ``pool`` (optional) decodes each wave of rows in parallel."""

    def __init__(self, row: "_Processor", *, min_images: int, per_identity: int | None, test_fraction: float,
                 seed: int, pool: ThreadPoolExecutor | None = None) -> None:
        self.row, self.min_images, self.per_identity = row, min_images, per_identity
        self.test_fraction, self.seed, self.pool = test_fraction, seed, pool

    def __call__(self, item: tuple) -> list[Record | str]:
        label, key, rows = item
        rng = identity_rng(self.seed, key)
        n = len(rows)
        want = min(self.per_identity or n, n)
        need = min(max(want, self.min_images), n)  # usable images to find (min_images is checked too)
        order = rng.permutation(n).tolist() if want < n else list(range(n))
        got: dict[int, Record] = {}  # in the order drawn
        out: list[Record | str] = []
        pos = 0
        # a wave asks for exactly the missing images; stop early once min_images is out of reach
        while len(got) < need and pos < n and len(got) + (n - pos) >= self.min_images:
            wave = order[pos : pos + need - len(got)]
            pos += len(wave)
            fn = lambda i: self.row((label, *rows[i]))  # noqa: E731
            results = self.pool.map(fn, wave) if self.pool is not None and len(wave) > 1 else map(fn, wave)
            for i, res in zip(wave, results):
                if isinstance(res, str):
                    out.append(res)
                else:
                    got[i] = res
        untried = n - pos
        if len(got) < self.min_images:
            return out + ["too few readable images"] * (len(got) + untried)
        keep = sorted(list(got)[:want])  # the first `want` drawn, in CSV order
        test = set(rng.permutation(keep)[: int(round(len(keep) * self.test_fraction))].tolist())
        for i in keep:
            got[i].split = int(i in test)
        return [got[i] for i in keep] + out + ["not sampled"] * (untried + len(got) - len(keep))


def _iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    ix = np.clip(np.minimum(boxes[:, 2:], box[2:]) - np.maximum(boxes[:, :2], box[:2]), 0, None).prod(1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return ix / (area(boxes) + area(box) - ix)


class _Processor:
    """Turns one row ``(label, rel, rect, frame)`` into a Record (split 0) or a skip reason. Thread-safe."""

    def __init__(self, root: Path, size: int, align: str, detector=None) -> None:
        self.root, self.size, self.align, self.detector = root, size, align, detector

    def __call__(self, item: tuple) -> Record | str:
        from facetool.detect.retinaface import read_rgb

        label, rel, rect, (fh, fw) = item
        split = 0
        img = read_rgb(self.root / rel)
        if img is None:
            return "unreadable"
        H, W = img.shape[:2]
        box = np.asarray(rect, np.float32) * np.array([W / fw, H / fh, W / fw, H / fh], np.float32)
        if self.align == "bbox":
            crop, _ = bbox_crop(img, box, self.size)
            return Record(image=crop, label=label, split=split, source=rel, bbox=box.tolist())
        # detect within the box (with a margin), keep the face overlapping the box most, align on 5 points
        bw, bh = box[2] - box[0], box[3] - box[1]
        x0, y0 = int(max(0, box[0] - bw / 2)), int(max(0, box[1] - bh / 2))
        x1, y1 = int(min(W, box[2] + bw / 2)), int(min(H, box[3] + bh / 2))
        det = self.detector.detect(img[y0:y1, x0:x1])
        if not len(det):
            return "no face"
        iou = _iou(det.boxes + [x0, y0, x0, y0], box)
        k = int(np.argmax(iou))
        if iou[k] < 0.3:
            return "no face"
        lm = det.landmarks[k] + [x0, y0]
        crop, M = align_5pt(img, lm, self.size)
        return Record(image=crop, label=label, split=split, source=rel,
                      bbox=(det.boxes[k] + [x0, y0, x0, y0]).tolist(), landmarks=transform_points(lm, M))


def guard_report(out: Path, overwrite: bool, inputs: tuple = ()) -> Path:
    """Guard the JSON report beside the store (a rerun of prepare may replace its own report)."""
    return guard_output(report_path(out), inputs=(*inputs, out), overwrite=overwrite, option="--out (report)",
                        owner=f"prepare {Path(out).resolve()}")


def report_path(out: str | Path) -> Path:
    """The JSON report written beside a store: ``imdb.h5`` -> ``imdb.json``."""
    return Path(out).with_suffix(".json")


def finish_report(path: Path, counters: dict[str, int], settings: dict[str, Any]) -> dict[str, Any]:
    """Summarise a written store + skip counters and write the JSON report beside it."""
    from facetool.store import FaceStore

    with FaceStore(path) as s:
        summ = s.summary()
    rep = {
        "store": str(path),
        "identities": summ["identities"],
        "images": summ["images"],
        "train": summ["train"],
        "test": summ["test"],
        "dropped": {k: int(v) for k, v in sorted(counters.items()) if v},
        "settings": settings,
    }
    guard_output(report_path(path), inputs=(path,), overwrite=True, option="--out (report)",
                 owner=f"prepare {Path(path).resolve()}")  # claim it: a rerun may replace it
    write_json(report_path(path), rep)
    return rep


def prepare_imdbface(
    csv: str | Path | None,
    root: str | Path,
    out: str | Path,
    *,
    min_images: int = 100,
    per_identity: int | None = 100,
    size: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    align: str = "bbox",
    overwrite: bool = False,
    resume: bool = False,
    workers: int = 1,
    detector_model: str | Path | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Build an IMDb-Face store. ``csv`` defaults to ``<root>/IMDb-Face.csv``; ``size`` defaults to
    128 (``align="bbox"``) or 112 (``align="retinaface"``, 5-point alignment of the face in the box).
    Returns (store path, report dict); the report is also written to ``<out stem>.json``."""
    from facetool.prepare import build_store

    if align not in ALIGN_MODES:
        raise FacetoolError(f"unknown --align {align!r}; use one of {', '.join(ALIGN_MODES)}")
    size = size if size is not None else (128 if align == "bbox" else 112)
    check_options(min_images, per_identity, test_fraction, size, seed)
    if workers < 1:
        raise FacetoolError(f"--workers must be >= 1 (threads), got {workers}")
    root = require_dir(root, "IMDb-Face image root")
    csv = Path(csv) if csv else root / "IMDb-Face.csv"
    out = guard_output(out, inputs=(csv, root, detector_model), overwrite=overwrite or resume,
                       suffix=STORE_SUFFIXES)
    guard_report(out, overwrite, inputs=(csv, root, detector_model))
    df = read_csv(csv)
    identities, items, counters = plan(df, root, min_images=min_images)
    if not items:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(counters.items()) if v) or "empty CSV"
        raise FacetoolError(f"no images left after filtering {len(df)} rows ({reasons}); check --root and --min-images")
    detector = None
    if align == "retinaface":
        from facetool.detect.retinaface import RetinaFace

        detector = RetinaFace(detector_model, score=0.5, input_size=320).require_landmarks()
    settings = {
        "dataset": "imdb-face", "csv": str(csv), "root": str(root), "align": align, "size": size,
        "min_images": min_images, "per_identity": per_identity, "test_fraction": test_fraction, "seed": seed,
        "aspect": list(ASPECT), "sampling": "per-identity, unusable rows replaced",
    }
    preprocessing = {k: v for k, v in settings.items() if k not in ("csv", "root")}
    if detector is not None:
        preprocessing["detector"] = detector.source
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        built = build_store(
            out,
            items,
            _Identity(_Processor(root, size, align, detector), min_images=min_images, per_identity=per_identity,
                      test_fraction=test_fraction, seed=seed, pool=pool),
            writer_kwargs=dict(
                image_size=(size, size), identities=identities, source="imdb-face", preprocessing=preprocessing,
                template=template(size) if align == "retinaface" else None,
            ),
            overwrite=overwrite,
            resume=resume,
            workers=1,  # one identity at a time (resume unit); its rows are decoded by the pool
            label="imdb-face identities",
            initial_counters=dict(counters),
            extra_attrs={"rows": len(df)},
        )
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if built is None:  # another torchrun rank: rank 0 writes the store and the report
        return None
    path, final = built
    return path, finish_report(path, final, {**settings, "rows": len(df)})
