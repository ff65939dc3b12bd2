"""LFW-family 1:1 verification: insightface ``.bin`` packs and LFW ``pairs.txt`` + image folder.

Protocol (arcface_torch ``eval/verification.py``): embedding = L2-normalise(f(x) + f(flip x)); squared L2
distance of each pair; thresholds 0..4 in steps of 0.01; 10-fold ``KFold(shuffle=False)``: the best
threshold on 9 folds is applied to the 10th; accuracy mean ± std over the folds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from facetool.errors import FacetoolError
from facetool.eval import BIN_SETS  # noqa: F401  (defined beside the package, re-exported here)
from facetool.eval.embed import ImageFiles, extract
from facetool.models.features import input_size_of, require_embedder
from facetool.io import restricted_loads

THRESHOLDS = np.arange(0, 4, 0.01)


class BinImages(Dataset):
    """The encoded images of a ``.bin`` pack, decoded (BGR -> RGB) and resized to ``size`` lazily."""

    def __init__(self, bins: list[bytes], size: int = 112, source: str = ".bin") -> None:
        self.bins = bins
        self.size = size
        self.source = source

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> torch.Tensor:
        import cv2

        img = cv2.imdecode(np.frombuffer(self.bins[i], np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise FacetoolError(f"{self.source}: image {i} is not a decodable JPEG/PNG")
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if img.shape[:2] != (self.size, self.size):
            img = cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return torch.from_numpy(np.ascontiguousarray(img))


def load_bin(path: str | Path, size: int = 112) -> tuple[BinImages, np.ndarray]:
    """Read an insightface ``.bin`` pack without executing code: (images dataset, issame (N,) bool)."""
    p = Path(path)
    if not p.is_file():
        raise FacetoolError(f"verification pack not found: {p}")
    try:
        obj = restricted_loads(p.read_bytes(), encoding="bytes")
    except FacetoolError as e:
        raise FacetoolError(f"verification pack {p} {e}") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise FacetoolError(f"{p} is not a (bins, issame_list) verification pack")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)) or not all(isinstance(b, (bytes, bytearray)) for b in bins):
        raise FacetoolError(f"{p}: the images must be a list of encoded JPEG/PNG bytes")
    issame = np.asarray([bool(x) for x in issame], bool)
    if len(bins) != 2 * len(issame) or not len(issame):
        raise FacetoolError(f"{p}: {len(bins)} images for {len(issame)} pairs (need 2 per pair)")
    return BinImages([bytes(b) for b in bins], size, str(p)), issame


def read_pairs(pairs: str | Path, images: str | Path, ext: str = "jpg") -> tuple[list[str], np.ndarray, int]:
    """LFW ``pairs.txt`` (``folds\\tn``; matched ``name n1 n2``; mismatched ``name1 n1 name2 n2``) ->
    (2N image paths ``images/Name/Name_%04d.jpg``, issame (N,), folds)."""
    p, root = Path(pairs), Path(images)
    if not p.is_file():
        raise FacetoolError(f"pairs file not found: {p}")
    if not root.is_dir():
        raise FacetoolError(f"image folder not found: {root}")
    lines = [ln.split() for ln in p.read_text().splitlines() if ln.strip()]
    try:
        folds, per = (int(x) for x in lines[0])
    except (ValueError, IndexError):
        raise FacetoolError(f"{p}: first line must be '<folds> <pairs per class per fold>', e.g. '10\\t300'") from None
    files: list[str] = []
    issame: list[bool] = []

    def img(name: str, n: str) -> str:
        return str(root / name / f"{name}_{int(n):04d}.{ext}")

    for k, f in enumerate(lines[1:], start=2):
        try:
            if len(f) == 3:
                files += [img(f[0], f[1]), img(f[0], f[2])]
                issame.append(True)
            elif len(f) == 4:
                files += [img(f[0], f[1]), img(f[2], f[3])]
                issame.append(False)
            else:
                raise ValueError
        except ValueError:
            raise FacetoolError(f"{p} line {k}: expected 'name n1 n2' or 'name1 n1 name2 n2'") from None
    if len(issame) != 2 * folds * per:
        raise FacetoolError(f"{p}: {len(issame)} pairs, but its header promises {folds} x 2 x {per}")
    missing = [f for f in dict.fromkeys(files) if not Path(f).is_file()]
    if missing:
        raise FacetoolError(f"{len(missing)} image(s) named in {p.name} are missing, e.g. {missing[0]}")
    return files, np.asarray(issame), folds


def kfold_accuracy(dist: np.ndarray, issame: np.ndarray, folds: int = 10,
                   thresholds: np.ndarray = THRESHOLDS) -> dict[str, Any]:
    """arcface_torch's protocol on squared distances: per fold, the threshold with the best accuracy on
    the other folds (first best) is applied to it. Returns accuracies, thresholds, mean, std."""
    from sklearn.model_selection import KFold

    dist = np.asarray(dist, np.float64)
    issame = np.asarray(issame, bool)
    if len(dist) < folds:
        raise FacetoolError(f"{len(dist)} pairs are too few for {folds}-fold evaluation")
    pred = dist[None, :] < thresholds[:, None]  # (T, N)
    correct = pred == issame[None, :]
    accs, ths = [], []
    for train, test in KFold(n_splits=folds, shuffle=False).split(dist):
        best = int(np.argmax(correct[:, train].mean(1)))
        ths.append(float(thresholds[best]))
        accs.append(float(correct[best, test].mean()))
    overall = correct.mean(1)
    return {
        "folds": folds,
        "accuracy": float(np.mean(accs)),
        "std": float(np.std(accs)),
        "fold_accuracies": accs,
        "fold_thresholds": ths,
        "best_threshold": float(thresholds[int(np.argmax(overall))]),
        "best_threshold_accuracy": float(overall.max()),
    }


def embeddings(model: Any, images: Dataset, batch_size: int = 128, device: str = "cpu",
               workers: int = 0, sharded: bool = False) -> tuple[np.ndarray, float] | None:
    """L2norm(f(x) + f(flip x)) for every image, and XNorm (mean norm of f(x)). ``sharded``: extraction split
    over the ``torchrun`` ranks, the result on rank 0 only (None elsewhere)."""
    got = extract(model, images, batch_size, True, device, workers, sharded=sharded)
    if got is None:
        return None
    f, ff = got
    xnorm = float(np.linalg.norm(f, axis=1).mean())
    e = f.astype(np.float64) + ff
    return e / np.linalg.norm(e, axis=1, keepdims=True).clip(1e-12), xnorm


def evaluate_pairs(model: Any, images: Dataset, issame: np.ndarray, *, folds: int = 10, batch_size: int = 128,
                   device: str = "cpu", workers: int = 0, sharded: bool = False) -> dict[str, Any] | None:
    """Verification accuracy of ``model`` on image pairs (images 2i, 2i+1 form pair i); the crops are
    resized to the model's own input size (``input_size`` in the results). ``sharded``: see :func:`embeddings`."""
    got = embeddings(model, images, batch_size, device, workers, sharded=sharded)
    if got is None:
        return None
    emb, xnorm = got
    dist = ((emb[0::2] - emb[1::2]) ** 2).sum(1)
    res = kfold_accuracy(dist, issame, folds)
    crop = int(getattr(images, "size", 112))
    res.update(pairs=int(len(issame)), genuine_pairs=int(issame.sum()), xnorm=xnorm, crop_size=crop,
               input_size=input_size_of(model) or crop)
    res.update(distances=dist, issame=np.asarray(issame, bool))  # arrays, for plots; not JSON
    return res


def verify_bin(model: Any, bin_path: str | Path, batch_size: int = 128, device: str | None = None,
               workers: int = 0, sharded: bool = False) -> dict[str, Any] | None:
    """Accuracy (mean, std over 10 folds), best threshold and XNorm of ``model`` on a ``.bin`` pack
    (``sharded``: extraction split over the ``torchrun`` ranks, results on rank 0, None elsewhere)."""
    require_embedder(model)
    images, issame = load_bin(bin_path)
    device = device or _default_device(model)
    res = evaluate_pairs(model, images, issame, batch_size=batch_size, device=device, workers=workers, sharded=sharded)
    if res is None:
        return None
    res["source"] = str(bin_path)
    return res


def verify_pairs(model: Any, pairs: str | Path, images: str | Path, *, aligned: bool = False, batch_size: int = 128,
                 device: str | None = None, workers: int = 0, sharded: bool = False) -> dict[str, Any] | None:
    """LFW ``pairs.txt`` protocol; images are detected and aligned unless ``aligned`` (``sharded``: as
    :func:`verify_bin`)."""
    require_embedder(model)
    files, issame, folds = read_pairs(pairs, images)
    ds = ImageFiles(files, detect=not aligned)
    device = device or _default_device(model)
    res = evaluate_pairs(model, ds, issame, folds=folds, batch_size=batch_size, device=device, workers=workers,
                         sharded=sharded)
    if res is None:
        return None
    res["source"] = str(pairs)
    return res


def _default_device(model: Any) -> str:
    if isinstance(model, torch.nn.Module):
        p = next(model.parameters(), None)
        if p is not None:
            return str(p.device)
    return "cpu"

