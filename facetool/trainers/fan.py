"""Training a FAN (:mod:`facetool.models.fan`) on a store's dense landmarks, on the one engine.

:class:`FanMethod` supervises every stack (intermediate supervision, as the stacked-hourglass papers) with
Gaussian target heatmaps at the heatmap resolution (:class:`facetool.data.heatmaps.LandmarkDataset`):
``l2`` = mean squared error, ``awing`` = the adaptive wing loss (Wang et al., ICCV 2019; alpha 2.1,
omega 14, epsilon 1, theta 0.5; without its weighted loss map). Flips use the convention's permutation.
The targets peak at ``peak`` (:data:`DEFAULT_PEAK`): with peak 1 the mean squared error over the L x (S/4)^2
cells is dominated by the background, and a FAN trained briefly predicts all-zero maps whose argmax lands
anywhere (measured on 64 px synthetic faces, 120 SGD steps: held-out NME 1.04 at peak 1, 0.17 at peak 10,
mean shape 0.19). A FAN trained so outputs maps about ``peak`` high; the decoding (an argmax) is unchanged.
Validation: inter-ocular NME / AUC@0.08 / failure rate of the test split (:mod:`facetool.eval.landmarks`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from facetool.engine import Method, TrainConfig, seed_everything, train
from facetool.errors import FacetoolError

LOSSES = ("l2", "awing")
#: maximum of the Gaussian target heatmaps (``train fan --peak``)
DEFAULT_PEAK = 10.0


def awing_loss(pred: Tensor, target: Tensor, alpha: float = 2.1, omega: float = 14.0, epsilon: float = 1.0,
               theta: float = 0.5) -> Tensor:
    """Adaptive wing loss, averaged over elements: ``omega ln(1 + |d/epsilon|^(alpha - y))`` for ``|d| < theta``,
    else ``A |d| - C`` with A, C making it continuous and smooth at theta (y = target, d = y - pred)."""
    d = (target - pred).abs()
    p = alpha - target
    r = theta / epsilon
    a = omega * (1 / (1 + r**p)) * p * r ** (p - 1) / epsilon
    c = theta * a - omega * torch.log1p(r**p)
    small = omega * torch.log1p((d / epsilon) ** p)
    return torch.where(d < theta, small, a * d - c).mean()


def heatmap_loss(outputs: list[Tensor], target: Tensor, kind: str) -> Tensor:
    """Sum over stacks of the per-stack loss against the same target."""
    fn = (lambda o: torch.mean((o.float() - target) ** 2)) if kind == "l2" else (lambda o: awing_loss(o.float(), target))
    return sum(fn(o) for o in outputs)


class FanMethod(Method):
    """Heatmap regression of every stack of a FAN."""

    name = "fan"

    def __init__(self, loss: str = "l2", sigma: float = 1.5, convention: str = "ibug68", val_ds=None,
                 batch_size: int = 32, peak: float = DEFAULT_PEAK) -> None:
        if loss not in LOSSES:
            raise FacetoolError(f"unknown --loss {loss!r}; use one of {', '.join(LOSSES)}")
        self.loss_kind, self.sigma, self.convention, self.peak = loss, float(sigma), convention, float(peak)
        self.val_ds, self.batch_size = val_ds, batch_size

    def loss(self, model: nn.Module, batch: dict, out: Any, internals: dict) -> dict[str, Tensor]:
        return {f"heatmap_{self.loss_kind}": heatmap_loss(out, batch["heatmap"].to(out[-1].device), self.loss_kind)}

    @torch.no_grad()
    def metrics(self, batch: dict, out: Any, internals: dict) -> dict[str, float]:
        """Inter-ocular NME of the batch (last stack, public decoding), in input pixels."""
        from facetool.data.landmarks import CONVENTIONS
        from facetool.models.fan import heatmaps_to_landmarks

        pred = heatmaps_to_landmarks(out[-1].detach().float().cpu())
        gt = batch["points"].float()
        a, b = CONVENTIONS[self.convention].inter_ocular
        d = (gt[:, a] - gt[:, b]).norm(dim=-1).clamp_min(1e-6)
        return {"nme": float(((pred - gt).norm(dim=-1).mean(-1) / d).mean())}

    def evaluate(self, model: nn.Module, epoch: int) -> dict[str, float]:
        if self.val_ds is None or len(self.val_ds) == 0:
            return {}
        from facetool.data.landmarks import CONVENTIONS
        from facetool.eval.landmarks import inter_ocular, nme, summarise

        device = next(model.parameters()).device
        pred = _predict_input(model, self.val_ds, self.batch_size, device)
        gt = self.val_ds.points.numpy()
        errors = nme(pred, gt, inter_ocular(gt, CONVENTIONS[self.convention].inter_ocular))
        return {f"val_{k}": v for k, v in summarise(errors).items()}

    def meta(self) -> dict:
        return {"loss": self.loss_kind, "sigma": self.sigma, "peak": self.peak, "convention": self.convention}

    def log_keys(self) -> tuple[str, ...]:
        return ("nme", "val_nme", "val_auc", "val_failure")


def _predict_input(model: nn.Module, ds, batch_size: int, device) -> Any:
    """Predicted points in input pixels (the dataset's coordinates)."""
    from facetool.data.dataset import make_loader
    from facetool.models.fan import heatmaps_to_landmarks

    out = []
    with torch.no_grad():
        for batch in make_loader(ds, batch_size):
            out.append(heatmaps_to_landmarks(model(batch["image"].to(device))[-1].float().cpu()))
    return torch.cat(out).numpy()


def train_fan(store: str | Path, cfg: TrainConfig, *, stacks: int = 2, loss: str = "l2", sigma: float = 1.5,
              input_size: int = 256, width: int = 256, convention: str | None = None,
              init: str | Path | None = None, peak: float = DEFAULT_PEAK) -> dict[str, Any]:
    """Train ``fan{stacks}`` on ``store``'s landmarks (train split; the test split validates); writes the
    engine's run folder (``model.pt`` loads with :func:`facetool.load_model`). ``init``: start from a FAN
    file (public layout or facetool checkpoint). ``peak``: the target heatmaps' maximum (:data:`DEFAULT_PEAK`)."""
    from facetool.data.heatmaps import LandmarkDataset
    from facetool.data.sources import check_val_fraction
    from facetool.data.landmarks import CONVENTIONS
    from facetool.models import create_model, load_model
    from facetool.models.fan import fan_name

    check_val_fraction(store, getattr(cfg, "val_fraction", None))  # a face store keeps its prepared split
    if loss not in LOSSES:
        raise FacetoolError(f"unknown --loss {loss!r}; use one of {', '.join(LOSSES)}")
    if not (sigma > 0 and math.isfinite(sigma)):
        raise FacetoolError(f"--sigma must be positive, not {sigma}")
    if not (peak > 0 and math.isfinite(peak)):
        raise FacetoolError(f"--peak must be positive, not {peak}")
    train_ds = LandmarkDataset(store, "train", size=input_size, sigma=sigma, convention=convention, flip=cfg.flip,
                               peak=peak)
    conv = train_ds.convention
    val_ds = LandmarkDataset(store, "test", size=input_size, sigma=sigma, convention=conv, peak=peak)
    points = CONVENTIONS[conv].num_points
    seed_everything(cfg.seed)
    if init is not None:
        model = load_model(init, name=fan_name(stacks), num_landmarks=points, input_size=input_size, width=width)
    else:
        model = create_model(fan_name(stacks), num_landmarks=points, input_size=input_size, width=width)
    method = FanMethod(loss, sigma, conv, val_ds, batch_size=cfg.batch_size, peak=peak)
    cfg.extra = {**cfg.extra, "store": str(store), "convention": conv}
    return train(model, method, train_ds, cfg)
