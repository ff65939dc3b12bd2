"""`prepare landmarks`: annotated landmark data sets (300W ``.pts``, WFLW list files) -> a face store.

Each face is cropped around the box of its landmarks (a square, ``margin`` of the box's longer side added on
every side), resized to ``size`` and its points moved by the same transform, so they are in the stored crop's
0-based pixel coordinates (:mod:`facetool.data.landmarks`). The store holds the crops, the landmark set(s)
(300W: ``ibug68``; WFLW: ``wflw98`` and its ``ibug68`` reduction), the 5 alignment points derived from them
(eye centres, nose tip, mouth corners) and the original box. Neither format has per-point visibility:
a point counts as visible when it lies inside the crop. Neither has identities: by default each image is its
own identity (``identities="image"``); ``"folder"`` takes the image's parent folder (300W: afw, helen/trainset,
...; WFLW: the WIDER event folder). The split puts a seeded ``test_fraction`` of the identities in test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from facetool.data.landmarks import WFLW_FLAGS, parse_wflw_line, read_pts, to_ibug68
from facetool.errors import FacetoolError, require_dir, require_file

FORMATS = ("300w", "wflw")
IDENTITY_MODES = ("image", "folder")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass
class _Item:
    path: Path  # the image file
    rel: str  # its path relative to the root (the store's source)
    points: np.ndarray  # (L, 2) in image pixels, 0-based
    convention: str
    box: np.ndarray | None = None  # the annotated box x1 y1 x2 y2 (WFLW), else None
    flags: dict[str, int] | None = None


def plan_300w(root: Path, list_file: Path | None = None) -> list[_Item]:
    """The 300W faces under ``root``: every image with a ``.pts`` beside it (``<stem>.pts``); with ``list_file``
    the images it names (one path relative to ``root`` a line). An image without its ``.pts`` is an error."""
    if list_file is not None:
        images = []
        for no, line in enumerate(require_file(list_file, "--list file").read_text(errors="replace").splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                p = root / line.strip()
                if not p.is_file():
                    raise FacetoolError(f"{list_file}:{no}: image not found: {p}")
                images.append(p)
    else:
        images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise FacetoolError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}; --root must hold the 300W images "
                            "with their .pts files beside them")
    items = []
    for img in images:
        pts_file = img.with_suffix(".pts")
        if not pts_file.is_file():
            raise FacetoolError(f"image {img} has no landmarks file {pts_file.name} beside it")
        items.append(_Item(img, img.relative_to(root).as_posix(), read_pts(pts_file, 68), "ibug68"))
    return items


def plan_wflw(root: Path, list_file: Path) -> list[_Item]:
    """The faces of a WFLW ``list_98pt_rect_attr_*.txt`` (``list_file``), images under ``root``."""
    items = []
    text = require_file(list_file, "--list file").read_text(errors="replace")
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        rec = parse_wflw_line(line, where=f"{list_file}:{no}")
        p = root / rec.path
        if not p.is_file():
            raise FacetoolError(f"{list_file}:{no}: image not found: {p}")
        items.append(_Item(p, rec.path, rec.points, "wflw98", rec.box, rec.flags))
    if not items:
        raise FacetoolError(f"{list_file} lists no faces")
    return items


def crop_transform(points: np.ndarray, size: int, margin: float) -> np.ndarray:
    """The (2, 3) affine map (scale + shift, 0-based pixel-centre coordinates) from the image to the ``size``
    crop of the square around the points' box: its side is the box's longer side times 1 + 2·``margin``, its
    centre the box's centre (which lands on the crop's centre, (size - 1) / 2)."""
    lo, hi = points.min(0), points.max(0)
    centre = (lo + hi) / 2
    side = float(max(hi - lo)) * (1 + 2 * margin)
    if not side > 0:
        raise FacetoolError("the landmarks have an empty box (all points equal)")
    s = size / side
    return np.array([[s, 0, s * (side / 2 - centre[0]) - 0.5], [0, s, s * (side / 2 - centre[1]) - 0.5]])


def apply_transform(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    return (np.asarray(points, np.float64) @ m[:, :2].T + m[:, 2]).astype(np.float32)


def crop(image: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """``image`` warped by ``m`` into a ``size`` square (black outside the image), low-passed first when it
    shrinks so that the crop does not alias."""
    s = float(m[0, 0])
    if s < 1:
        sigma = 0.5 * (1 / s - 1)
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(0, 0, 0))


def five_points(points: np.ndarray, convention: str) -> np.ndarray:
    """The 5 alignment points (image-left eye centre, image-right eye centre, nose tip, mouth corners)."""
    p68 = points if convention == "ibug68" else to_ibug68(points)
    return np.stack([p68[36:42].mean(0), p68[42:48].mean(0), p68[30], p68[48], p68[54]]).astype(np.float32)


def _read_rgb(path: Path) -> np.ndarray | None:
    try:
        data = np.fromfile(str(path), np.uint8)
    except OSError:
        return None
    im = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    return None if im is None else cv2.cvtColor(im, cv2.COLOR_BGR2RGB)


def prepare_landmarks(
    out: str | Path,
    *,
    fmt: str,
    root: str | Path,
    list_file: str | Path | None = None,
    size: int = 256,
    margin: float = 0.25,
    identities: str = "image",
    test_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
    resume: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Import 300W (``fmt="300w"``: ``.pts`` beside the images under ``root``, optional ``list_file`` of images)
    or WFLW (``fmt="wflw"``: ``list_file`` = a ``list_98pt_rect_attr_*.txt``, ``root`` = WFLW_images) into a
    face store; see the module docstring. Returns (store path, report); the report goes beside the store."""
    from facetool.data.imdbface import finish_report, guard_report
    from facetool.io import STORE_SUFFIXES, guard_output
    from facetool.prepare import build_store
    from facetool.store import Record

    list_file = Path(list_file) if list_file is not None else None
    out = guard_output(out, inputs=(root, list_file), overwrite=overwrite or resume, suffix=STORE_SUFFIXES)
    guard_report(out, overwrite, inputs=(root, list_file))
    if fmt not in FORMATS:
        raise FacetoolError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
    if identities not in IDENTITY_MODES:
        raise FacetoolError(f"unknown --identities {identities!r}; use one of {', '.join(IDENTITY_MODES)}")
    if not 0 <= margin <= 4:
        raise FacetoolError(f"--margin must be in [0, 4], got {margin}")
    root = require_dir(root, "--root")
    if fmt == "wflw" and list_file is None:
        raise FacetoolError("--format wflw needs --list (a list_98pt_rect_attr_*.txt file; --root is WFLW_images)")
    items = plan_300w(root, list_file) if fmt == "300w" else plan_wflw(root, list_file)  # type: ignore[arg-type]

    def identity_of(it: _Item) -> str:
        return it.rel if identities == "image" else (Path(it.rel).parent.as_posix() or ".")

    names = sorted({identity_of(it) for it in items})
    label = {n: i for i, n in enumerate(names)}
    rng = np.random.default_rng([seed, 19])
    n_test = int(round(test_fraction * len(names)))
    test_ids = set(rng.permutation(len(names))[:n_test].tolist()) if len(names) > 1 else set()
    sets = {"ibug68": 68} if fmt == "300w" else {"wflw98": 98, "ibug68": 68}

    def process(it: _Item) -> Record | str:
        image = _read_rgb(it.path)
        if image is None:
            return "unreadable"
        m = crop_transform(it.points, size, margin)
        pts = apply_transform(m, it.points)
        visible = (pts >= 0).all(1) & (pts <= size - 1).all(1)
        dense = {it.convention: (pts, visible)}
        if it.convention == "wflw98":
            dense["ibug68"] = (to_ibug68(pts), to_ibug68(visible[:, None])[:, 0])
        lo, hi = it.points.min(0), it.points.max(0)
        box = it.box if it.box is not None else np.concatenate([lo, hi])
        lab = label[identity_of(it)]
        return Record(image=crop(image, m, size), label=lab, split=int(lab in test_ids), source=it.rel,
                      bbox=np.asarray(box, np.float32), landmarks=five_points(pts, it.convention),
                      attributes=it.flags, landmark_sets=dense)

    settings = {"dataset": fmt, "root": str(root), "list": str(list_file) if list_file else None, "size": size,
                "margin": margin, "identities": identities, "test_fraction": test_fraction, "seed": seed,
                "landmark_sets": sorted(sets), "crop": "square around the landmarks' box, margin x longer side"}
    preprocessing = {k: v for k, v in settings.items() if k not in ("root", "list")}
    path, counters = build_store(
        out, items, process, overwrite=overwrite, resume=resume, label=f"{fmt} faces",
        writer_kwargs=dict(image_size=(size, size), identities=names, source=fmt, preprocessing=preprocessing,
                           landmark_sets=sets,
                           attribute_values={f: ["no", "yes"] for f in WFLW_FLAGS} if fmt == "wflw" else None),
    )
    return path, finish_report(path, counters, settings)

