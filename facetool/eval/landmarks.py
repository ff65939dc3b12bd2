"""Landmark accuracy of a FAN on a face store's dense landmarks: NME, AUC@0.08, failure rate.

* NME of one face = mean over its L points of ``||pred - gt||`` divided by ``d``: the **inter-ocular**
  distance (outer eye corners, the convention's ``inter_ocular`` pair; 300W's normalisation) or the **box**
  size ``sqrt(w h)`` of the ground-truth points' bounding box;
* AUC@0.08 = area under the cumulative error curve on [0, 0.08], divided by 0.08: ``mean_i max(0, 0.08 -
  e_i) / 0.08`` (the integral of the step curve, exactly);
* failure rate = share of faces with NME > 0.08.

Predictions come from the last stack's heatmaps through the public decoding
(:func:`facetool.models.fan.heatmaps_to_landmarks`), mapped back to store pixels
(:func:`facetool.data.heatmaps.input_to_store`). A store whose set has another convention than the
model's points is scored where a map exists (WFLW 98 -> iBUG 68).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from facetool.errors import FacetoolError

THRESHOLD = 0.08


def nme(pred: np.ndarray, gt: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """Per-face NME: mean point distance (N, L) over the points, divided by ``norm`` (N,)."""
    return np.linalg.norm(pred - gt, axis=-1).mean(-1) / norm


def inter_ocular(gt: np.ndarray, pair: tuple[int, int]) -> np.ndarray:
    """(N,) distance between the two outer eye corners."""
    return np.linalg.norm(gt[:, pair[0]] - gt[:, pair[1]], axis=-1)


def box_size(gt: np.ndarray) -> np.ndarray:
    """(N,) ``sqrt(w h)`` of the ground-truth points' bounding box."""
    wh = gt.max(1) - gt.min(1)
    return np.sqrt(wh[:, 0] * wh[:, 1])


def auc(errors: np.ndarray, threshold: float = THRESHOLD) -> float:
    """Area under the cumulative error distribution on [0, threshold], normalised to [0, 1]."""
    e = np.asarray(errors, np.float64)
    return float(np.mean(np.clip(threshold - e, 0, None)) / threshold) if len(e) else float("nan")


def failure_rate(errors: np.ndarray, threshold: float = THRESHOLD) -> float:
    e = np.asarray(errors, np.float64)
    return float(np.mean(e > threshold)) if len(e) else float("nan")


def summarise(errors: np.ndarray) -> dict[str, float]:
    """NME mean, AUC@0.08, failure rate of per-face errors."""
    return {"nme": float(np.mean(errors)), "auc": auc(errors), "failure": failure_rate(errors)}


@torch.no_grad()
def predict(model: torch.nn.Module, ds, batch_size: int = 32, device: str | torch.device = "cpu") -> np.ndarray:
    """Predicted points (N, L, 2) in store pixels for a :class:`facetool.data.heatmaps.LandmarkDataset`."""
    from facetool.data.dataset import make_loader
    from facetool.data.heatmaps import input_to_store
    from facetool.models.fan import heatmaps_to_landmarks

    was = model.training
    model.eval()
    out = []
    try:
        for batch in make_loader(ds, batch_size):
            heat = model(batch["image"].to(device))[-1].float().cpu()
            out.append(input_to_store(heatmaps_to_landmarks(heat), ds.crop, ds.size))
    finally:
        model.train(was)
    return torch.cat(out).numpy() if out else np.zeros((0, 0, 2), np.float32)


def mean_shape_errors(train_points: np.ndarray, gt: np.ndarray, pair: tuple[int, int]) -> np.ndarray:
    """Inter-ocular NME of always predicting the training set's mean shape (the baseline a FAN must beat)."""
    mean = train_points.mean(0, keepdims=True)
    return nme(np.broadcast_to(mean, gt.shape), gt, inter_ocular(gt, pair))


def evaluate_landmarks(model: torch.nn.Module, store: str | Path, split: str = "test", *, batch_size: int = 32,
                       device: str | torch.device = "cpu") -> dict[str, Any]:
    """Per convention the store holds that the model's points can be scored on: NME (inter-ocular and box),
    AUC@0.08 and failure rate of both, the mean-shape baseline (training split's mean shape), and the
    predictions of the split (``"_pred"``, ``"_gt"``, ``"_indices"`` for overlays)."""
    from facetool.data.heatmaps import LandmarkDataset
    from facetool.data.landmarks import CONVENTIONS, WFLW98_TO_IBUG68
    from facetool.store import FaceStore

    points = int(getattr(model, "num_landmarks", 0))
    size = int(getattr(model, "input_size", 256))
    with FaceStore(store) as s:
        have = s.landmark_conventions
    results: dict[str, Any] = {}
    for conv in have:
        n = CONVENTIONS[conv].num_points if conv in CONVENTIONS else -1
        if n == points:
            take, scored = None, conv
        elif conv == "wflw98" and points == 68:
            take, scored = list(WFLW98_TO_IBUG68), "ibug68"
        else:
            continue
        ds = LandmarkDataset(store, split, size=size, convention=conv)
        if len(ds) == 0:
            raise FacetoolError(f"store {Path(store).name} has no images in split {split!r}")
        gt = ds.points.numpy()
        gt = input_to_store_np(gt, ds.crop, size)
        train_ds = LandmarkDataset(store, "train", size=size, convention=conv)
        train = input_to_store_np(train_ds.points.numpy(), ds.crop, size)
        if take is not None:
            gt, train = gt[:, take], train[:, take]
        pred = predict(model, ds, batch_size, device)
        pair = CONVENTIONS[scored].inter_ocular
        io_err = nme(pred, gt, inter_ocular(gt, pair))
        box_err = nme(pred, gt, box_size(gt))
        base = mean_shape_errors(train, gt, pair) if len(train) else np.full(len(gt), np.nan)
        results[conv] = {
            "scored_as": scored, "images": len(gt),
            **{f"{k}_io": v for k, v in summarise(io_err).items()},
            **{f"{k}_box": v for k, v in summarise(box_err).items()},
            "mean_shape_nme_io": float(np.mean(base)),
            "_pred": pred, "_gt": gt, "_indices": ds.indices,
        }
    if not results:
        raise FacetoolError(f"store {Path(store).name} has no landmark set the model's {points} points can be scored "
                            f"on (it has: {', '.join(have) or 'only the 5 alignment points'})")
    return results


def input_to_store_np(points: np.ndarray, crop: int, size: int) -> np.ndarray:
    from facetool.data.heatmaps import input_to_store

    return np.asarray(input_to_store(points, crop, size), np.float32)


def overlay_grid(images: np.ndarray, pred: np.ndarray, gt: np.ndarray, path: str | Path, columns: int = 6,
                 scale: int = 2) -> Path:
    """A PNG grid of crops (N, H, W, 3) uint8 with ground truth (green) and predicted (red) points."""
    from PIL import Image, ImageDraw

    from facetool.io import atomic_path

    n = len(images)
    if n == 0:
        raise FacetoolError("no images to draw")
    h, w = images.shape[1:3]
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    canvas = Image.new("RGB", (cols * w * scale, rows * h * scale), "black")
    for k in range(n):
        tile = Image.fromarray(images[k]).resize((w * scale, h * scale), Image.BILINEAR)
        draw = ImageDraw.Draw(tile)
        for pts, colour in ((gt[k], (0, 255, 0)), (pred[k], (255, 0, 0))):
            for x, y in pts:
                cx, cy = (x + 0.5) * scale, (y + 0.5) * scale
                draw.ellipse((cx - 1.5, cy - 1.5, cx + 1.5, cy + 1.5), fill=colour)
        canvas.paste(tile, ((k % cols) * w * scale, (k // cols) * h * scale))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)
