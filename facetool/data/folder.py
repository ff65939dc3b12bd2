"""Folder-per-identity datasets (VGGFace2 ``n000001/0001_01.jpg``, CASIA-WebFace, LFW-style trees).

Each image is detected with RetinaFace, the main face (largest, most central) is aligned on its 5
points to ``size`` (112); ``aligned=True`` takes images that are already aligned crops and only
resizes them. Filters and the seeded split are those of IMDb-Face; counters: ``too few images``,
``not sampled``, ``unreadable``, ``no face``, ``too few readable images``.

With ``per_identity`` the sampling is IMDb-Face's (:class:`facetool.data.imdbface._Identity`): an
identity's files are tried in a seeded order (its own stream of ``seed``), a file that does not decode
or shows no face is *replaced* by the identity's next file until ``per_identity`` usable images are
found, an identity with fewer than ``min_images`` usable images is dropped, and only then are its
images split train/test. Without ``per_identity`` every file is used, one file at a time (memory stays
bounded on huge folders such as FairFace's ``train/``): the seeded split is planned over the files
and an unusable file is dropped (there is no other file to take its place).

A FairFace root (``train/`` and ``val/`` folders of images and its ``fairface_label_train.csv`` /
``fairface_label_val.csv`` beside them, :func:`is_fairface`) keeps FairFace's own split: ``train/`` -> train,
``val/`` -> test, every file used, under one identity ``unknown`` (FairFace has no identities; ``annotate
--fairface`` adds its labels). ``--test-fraction`` and ``--seed`` do not apply there and ``--per-identity`` is refused.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2

from facetool.data.imdbface import _Identity, check_options, finish_report, guard_report, sample_split
from facetool.detect.align import align_5pt, template, transform_points
from facetool.errors import FacetoolError, require_dir
from facetool.io import STORE_SUFFIXES, guard_output
from facetool.store import Record

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


#: FairFace's folders and the store split each becomes (0 train, 1 test).
FAIRFACE_SPLITS = {"train": 0, "val": 1}


def is_fairface(root: Path) -> bool:
    """True for FairFace's layout: exactly the sub-folders ``train/`` and ``val/`` and a FairFace label CSV
    (``fairface_label_train.csv`` or ``fairface_label_val.csv``) in ``root``."""
    subdirs = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return subdirs == set(FAIRFACE_SPLITS) and any(
        (root / f"fairface_label_{k}.csv").is_file() for k in FAIRFACE_SPLITS)


def _images_under(d: Path, root: Path) -> list[str]:
    return sorted(str(f.relative_to(root)) for f in d.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file())


def plan(
    root: Path, *, min_images: int, per_identity: int | None, test_fraction: float, seed: int, fairface: bool = False
) -> tuple[list[str], list[tuple], Counter]:
    """Identities = sub-folders of ``root`` (sorted). Without ``per_identity`` an item is one file
    ``(label, path relative to root, split)`` with its split planned here; with it, one identity
    ``(label, name, [(path,), ...])`` whose sampling and split happen while reading (``_Identity``).
    ``fairface``: one identity, the split from the folder (:data:`FAIRFACE_SPLITS`)."""
    counters: Counter[str] = Counter()
    if fairface:
        items = [(0, rel, code) for name, code in FAIRFACE_SPLITS.items() for rel in _images_under(root / name, root)]
        if len(items) < min_images:
            counters["too few images"] += len(items)
            items = []
        return ["unknown"], items, counters
    groups: dict[str, list[str]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _images_under(d, root)
        if not files:
            continue
        if len(files) < min_images:
            counters["too few images"] += len(files)
        else:
            groups[d.name] = files
    identities = list(groups)
    if per_identity:
        return identities, [(label, key, [(rel,) for rel in groups[key]]) for label, key in enumerate(groups)], counters
    chosen = sample_split(groups, None, test_fraction, seed)
    items = [(label, rel, split) for label, key in enumerate(groups) for rel, split in chosen[key]]
    return identities, items, counters


class _Processor:
    """One file ``(label, rel[, split])`` -> a Record (split 0 unless given) or a skip reason. Thread-safe."""

    def __init__(self, root: Path, size: int, detector=None) -> None:
        self.root, self.size, self.detector = root, size, detector

    def __call__(self, item: tuple) -> Record | str:
        from facetool.detect.retinaface import read_rgb

        label, rel, *rest = item
        split = rest[0] if rest else 0
        img = read_rgb(self.root / rel)
        if img is None:
            return "unreadable"
        if self.detector is None:
            interp = cv2.INTER_AREA if max(img.shape[:2]) > self.size else cv2.INTER_LINEAR
            crop = cv2.resize(img, (self.size, self.size), interpolation=interp)
            return Record(image=crop, label=label, split=split, source=rel)
        det = self.detector.detect(img)
        k = det.pick(img.shape)
        if k is None:
            return "no face"
        crop, M = align_5pt(img, det.landmarks[k], self.size)
        return Record(image=crop, label=label, split=split, source=rel, bbox=det.boxes[k].tolist(),
                      landmarks=transform_points(det.landmarks[k], M))


def prepare_folder(
    root: str | Path,
    out: str | Path,
    *,
    aligned: bool = False,
    size: int = 112,
    min_images: int = 1,
    per_identity: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    detector_model: str | Path | None = None,
    det_size: int | None = 640,
    score: float = 0.8,
    overwrite: bool = False,
    resume: bool = False,
    workers: int = 1,
) -> tuple[Path, dict[str, Any]]:
    """Build a store from ``root/<identity>/<images>``. Returns (store path, report dict); the report
    is also written to ``<out stem>.json``. ``det_size``: longer image side the detector sees."""
    from facetool.prepare import build_store

    check_options(min_images, per_identity, test_fraction, size, seed)
    if det_size is not None and det_size < 0:
        raise FacetoolError(f"--det-size must be >= 0 (0: the image's own size), got {det_size}")
    if not 0.0 <= score <= 1.0:
        raise FacetoolError(f"--score must be in [0, 1], got {score}")
    if workers < 1:
        raise FacetoolError(f"--workers must be >= 1 (threads), got {workers}")
    root = require_dir(root, "dataset folder")
    out = guard_output(out, inputs=(root, detector_model), overwrite=overwrite or resume, suffix=STORE_SUFFIXES)
    guard_report(out, overwrite, inputs=(root, detector_model))
    fairface = is_fairface(root)
    if fairface and per_identity:
        raise FacetoolError(f"{root} is a FairFace folder (train/, val/ and its label CSVs), which has no identities: "
                            "--per-identity does not apply (every image is used, with FairFace's own train/val split)")
    identities, items, counters = plan(
        root, min_images=min_images, per_identity=per_identity, test_fraction=test_fraction, seed=seed,
        fairface=fairface,
    )
    if not items:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(counters.items()) if v) or "no images in sub-folders"
        raise FacetoolError(f"no images left in {root} ({reasons}); expected {root}/<identity>/<image>.jpg")
    detector = None
    if not aligned:
        from facetool.detect.retinaface import RetinaFace

        detector = RetinaFace(detector_model, score=score, input_size=det_size).require_landmarks()
    settings = {
        "dataset": "folder", "root": str(root), "aligned": aligned, "size": size, "min_images": min_images,
        "per_identity": per_identity, "test_fraction": test_fraction, "seed": seed,
        "detector": detector.source if detector else None, "det_size": det_size, "score": score,
    }
    if per_identity:
        settings["sampling"] = "per-identity, unusable files replaced"
    if fairface:
        settings["split"] = "fairface: train/ -> train, val/ -> test"
    row = _Processor(root, size, detector)
    pool = ThreadPoolExecutor(workers) if per_identity and workers > 1 else None
    try:
        built = build_store(
            out,
            items,
            _Identity(row, min_images=min_images, per_identity=per_identity, test_fraction=test_fraction, seed=seed,
                      pool=pool) if per_identity else row,
            writer_kwargs=dict(
                image_size=(size, size), identities=identities, source=f"folder:{root.name}",
                preprocessing={k: v for k, v in settings.items() if k != "root"},
                template=None if aligned else template(size),
            ),
            overwrite=overwrite,
            resume=resume,
            workers=1 if per_identity else workers,  # per identity: one identity at a time, its files on the pool
            label=f"folder {root.name}" + (" identities" if per_identity else ""),
            initial_counters=dict(counters),
        )
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if built is None:  # another torchrun rank: rank 0 writes the store and the report
        return None
    path, final = built
    return path, finish_report(path, final, settings)
