"""What to invert: a face store, a folder of aligned crops or an embeddings file, read into
:class:`InversionInputs` (used by ``facetool invert``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from facetool.errors import FacetoolError


@dataclass
class InversionInputs:
    """What to invert: real faces and/or their embeddings, with identities where known."""

    images: np.ndarray | None  # (N, S, S, 3) uint8 RGB
    embeddings: np.ndarray | None  # (N, D) float32
    labels: np.ndarray  # (N,) index into identities
    identities: list[str]
    sources: list[str]
    split: np.ndarray  # (N,) 0 train / 1 test
    store: Path | None = None  # the face store they came from (for --pairs)
    rows: np.ndarray | None = None  # their rows in that store

    def __len__(self) -> int:
        return len(self.labels)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _spread_rows(labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Reorder ``rows`` so the identities alternate (first image of every identity, then the second ...)."""
    lab = labels[rows]
    rank = np.zeros(len(rows), int)
    seen: dict[int, int] = {}
    for i, y in enumerate(lab):
        rank[i] = seen.get(int(y), 0)
        seen[int(y)] = rank[i] + 1
    return rows[np.lexsort((lab, rank))]


def load_inputs(
    images: str | Path | None = None,
    embeddings: str | Path | None = None,
    *,
    split: str | None = "test",
    limit: int | None = 8,
    size: int = 112,
) -> InversionInputs:
    """Read a face store (``.h5``: ``limit`` images of ``split``, identities interleaved), a folder of
    aligned crops (resized to ``size`` where needed) (``<folder>/<identity>/<img>`` or flat: one identity per file) or an embeddings
    file (HDF5 with ``embeddings`` (N, D) and optional ``images`` (N, S, S, 3) uint8, ``labels``,
    ``identities``)."""
    import h5py

    if (images is None) == (embeddings is None):
        raise FacetoolError("give exactly one of --images (store or folder) and --embeddings")
    if limit is not None and limit < 1:
        raise FacetoolError(f"--limit must be at least 1, got {limit}")
    lim = slice(None, limit)
    if embeddings is not None:
        p = Path(embeddings)
        if not p.is_file():
            raise FacetoolError(f"embeddings file not found: {p}")
        try:
            with h5py.File(p, "r") as f:
                shapes = {k: f[k].shape for k in ("embeddings", "images", "labels", "identities")
                          if isinstance(f.get(k), h5py.Dataset)}
                if "embeddings" not in shapes:
                    raise FacetoolError(f"{p} has no dataset 'embeddings' (N, D)")
                _check_embeddings_file(p, shapes, size)  # the file's own shapes, before --limit takes its rows
                emb = np.asarray(f["embeddings"][lim], np.float32)
                imgs = np.asarray(f["images"][lim], np.uint8) if "images" in shapes else None
                labels = np.asarray(f["labels"][lim], np.int64) if "labels" in shapes else np.arange(len(emb))
                names = [x.decode() if isinstance(x, bytes) else str(x) for x in f["identities"][:]] \
                    if "identities" in shapes else None
        except OSError:
            raise FacetoolError(f"not an HDF5 file (corrupt or wrong file): {p}") from None
        if not np.isfinite(emb).all():
            raise FacetoolError(f"{p}: 'embeddings' holds NaN or infinite values")
        if names is None:
            names = [str(i) for i in range(int(labels.max()) + 1)]
        if labels.min() < 0 or labels.max() >= len(names):
            raise FacetoolError(f"{p}: 'labels' must be (N,) indices into 'identities' (0 to {len(names) - 1}), "
                                f"found {int(labels.min())} to {int(labels.max())}")
        return InversionInputs(imgs, emb, labels, names, [f"{p.name}:{i}" for i in range(len(emb))],
                               np.ones(len(emb), np.uint8))
    p = Path(images)
    if p.is_dir():
        return _load_folder(p, limit, size)
    from facetool.data.sources import face_source
    from facetool.store import FaceStore

    with FaceStore(face_source(p, "--images")) as s:
        labels_all = s.labels
        rows = _spread_rows(labels_all, s.indices(split))[lim]
        if len(rows) == 0:
            raise FacetoolError(f"store {p} has no images in split {split!r}")
        srcs = s.sources
        return InversionInputs(_resize(s.images(rows), size), None, labels_all[rows], s.identities, [srcs[int(r)] for r in rows],
                               s.split[rows], store=p, rows=rows)


def _check_embeddings_file(p: Path, shapes: dict[str, tuple], size: int) -> None:
    """The datasets of an embeddings file agree with each other, judged on the file's own shapes (an error
    names those, not the shape of the first ``--limit`` rows)."""
    e = shapes["embeddings"]
    if len(e) != 2 or e[0] == 0 or e[1] == 0:
        raise FacetoolError(f"{p}: 'embeddings' must be a non-empty (N, D) array, got shape {e}")
    n = e[0]
    if "images" in shapes and shapes["images"] != (n, size, size, 3):
        raise FacetoolError(f"{p}: 'images' must be (N, {size}, {size}, 3) uint8 with N = {n} (one per embedding, at "
                            f"the model's input size), got {shapes['images']}")
    if "labels" in shapes and shapes["labels"] != (n,):
        raise FacetoolError(f"{p}: 'labels' must be (N,) = ({n},) indices into 'identities', got {shapes['labels']}")
    if "identities" in shapes and (len(shapes["identities"]) != 1 or shapes["identities"][0] == 0):
        raise FacetoolError(f"{p}: 'identities' must be a non-empty list of names, got shape {shapes['identities']}")


def _resize(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) faces resized to (N, size, size, 3) where needed (area interpolation)."""
    import cv2

    return np.stack([im if im.shape[:2] == (size, size) else cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA)
                     for im in images])


def _load_folder(root: Path, limit: int | None, size: int) -> InversionInputs:
    import cv2

    files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())[:limit]
    if not files:
        raise FacetoolError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {root}")
    nested = all(f.parent != root for f in files)
    names = [str(f.parent.relative_to(root)) if nested else f.stem for f in files]
    identities = sorted(set(names))
    imgs = []
    for f in files:
        bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FacetoolError(f"cannot read image {f}")
        imgs.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return InversionInputs(_resize(imgs, size), None, np.array([identities.index(n) for n in names], np.int64), identities,
                           [str(f.relative_to(root)) for f in files], np.ones(len(files), np.uint8))
