"""ConvNet-AIG: adaptive inference graphs (Veit & Belongie, ECCV 2018), the training method.

The gate and the gated residual block are model components (:mod:`facetool.models.gated`: ``Gate``,
``GatedResidual``, ``gated_blocks``, ``set_skipping``, ``forced_gates``; re-exported here). This
module holds what trains them: the per-block target schedule, the target loss and
:class:`AIGMethod`.

Target loss (our choice, documented): ``L_target = sum_l (zbar_l - t_l)^2`` over *all* gated blocks
``l = 1..L`` with ``zbar_l`` the batch mean of the hard gates (straight-through gradient) and
per-block targets from :func:`target_schedule`; blocks pinned at ``t = 1`` are included (they are
pushed to always run, which is what pinning means). The reference code instead skips ``t = 1`` blocks
and divides by L; ``weight`` (``--target-weight``) rescales the term.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from facetool.trainers.classify import ClassificationMethod
from facetool.errors import FacetoolError
from facetool.flops import decision_rates
from facetool.models.gated import Gate, GatedResidual, forced_gates, gated_blocks, set_skipping  # noqa: F401  (re-exported)


def scaled_pins(num_blocks: int, first: int = 7, last: int = 3, ref_blocks: int = 33) -> tuple[int, int]:
    """Pinned-block counts for a net with ``num_blocks`` gated blocks: ResNet-101 (33 blocks) pins
    the first 7 and last 3; shallower nets pin ``round(7 L / 33)`` and ``round(3 L / 33)``, i.e.
    ResNet-50/34 (16 blocks): first 3, last 1; ResNet-18 (8 blocks): first 2, last 1."""
    return int(round(first * num_blocks / ref_blocks)), int(round(last * num_blocks / ref_blocks))


def target_schedule(num_blocks: int, t: float, first: int | None = None, last: int | None = None) -> list[float]:
    """Per-block execution-rate targets: the middle blocks at ``t``, the first ``first`` and last
    ``last`` pinned to 1.0 (defaults: :func:`scaled_pins`)."""
    if not 0.0 <= t <= 1.0:
        raise FacetoolError(f"--target must be in [0, 1], got {t}")
    f0, l0 = scaled_pins(num_blocks)
    first = f0 if first is None else first
    last = l0 if last is None else last
    if first < 0 or last < 0 or first + last >= num_blocks:
        raise FacetoolError(f"cannot pin {first}+{last} of {num_blocks} gated blocks; leave at least one free")
    return [1.0] * first + [float(t)] * (num_blocks - first - last) + [1.0] * last


def parse_target_schedule(text: str, num_blocks: int) -> list[float]:
    """``"1,1,0.4,..."`` -> list of L floats in [0, 1]."""
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise FacetoolError(f"--target-schedule must be comma-separated numbers, got {text!r}") from None
    if len(vals) != num_blocks:
        raise FacetoolError(f"--target-schedule has {len(vals)} values but the model has {num_blocks} gated blocks")
    bad = [v for v in vals if not 0.0 <= v <= 1.0]
    if bad:
        raise FacetoolError(f"--target-schedule values must be in [0, 1], got {bad[0]}")
    return vals


def target_loss(gates: Tensor, targets: Sequence[float] | Tensor) -> Tensor:
    """``sum_l (mean_b gates[b, l] - t_l)^2`` for gates (B, L) and targets (L,)."""
    t = torch.as_tensor(targets, dtype=torch.float32, device=gates.device)
    if t.shape != gates.shape[1:]:
        raise FacetoolError(f"{t.numel()} targets for {gates.shape[1]} gated blocks")
    return ((gates.float().mean(0) - t) ** 2).sum()


class AIGMethod(ClassificationMethod):
    """Cross-entropy + ``weight * L_target``; metrics top-1/5 and execution rates per block."""

    name = "aig"

    def __init__(self, targets: Sequence[float], weight: float = 1.0) -> None:
        self.targets = [float(t) for t in targets]
        self.weight = float(weight)
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            raise FacetoolError(f"--target-weight must be >= 0 (weight of L_target), got {weight}")
        if not all(0.0 <= t <= 1.0 for t in self.targets):
            raise FacetoolError(f"targets must be in [0, 1], got {self.targets}")

    def loss(self, model, batch, out, internals):
        terms = super().loss(model, batch, out, internals)
        terms["target"] = self.weight * target_loss(internals["gates"], self.targets)
        return terms

    def metrics(self, batch, out, internals):
        return {**super().metrics(batch, out, internals), **execution_rates(internals["gates"], self.targets)}

    def meta(self) -> dict:
        return {**super().meta(), "aig": {"targets": self.targets, "weight": self.weight}}

    def log_keys(self) -> tuple[str, ...]:
        return (*super().log_keys(), "val_exec_rate")


def execution_rates(gates: Tensor, targets: Sequence[float] | None = None) -> dict[str, float]:
    """Mean execution rate over all gated blocks (``exec_rate``), over the blocks with a target
    below 1 (``exec_rate_free``) and per block (``rate_00`` ...): :func:`facetool.flops.decision_rates`."""
    return decision_rates(gates, targets)
