"""CondFace (thesis ch. 5): routing vectors that cluster by facial attributes.

* :func:`sinkhorn`: SwAV's equipartitioned soft assignment of a batch of routing scores to P prototypes
  (the "Sinkhorn" clustering of Eq. 5.5).
* :class:`CondFaceMethod`: train arcface's method (:class:`~facetool.trainers.arcface.ArcFaceMethod`,
  CosFace by default: L_fr of Eq. 5.4) plus, per epoch, the routing softmax temperature (a linear
  START:END schedule, DyConv-style) and, with ``clustering="sinkhorn"``, lambda * L_cls (Eqs. 5.5-5.6):
  a cluster head on the routing vector beta, L2-normalised, scored against P trainable L2-normalised
  prototypes; cross-entropy of softmax(scores / 0.1) to the Sinkhorn targets (epsilon 0.05, 3 iterations,
  float32, no gradient), SwAV with a single view (no swapped prediction).
* :func:`train_condface`: train arcface's recipe (:func:`~facetool.trainers.arcface.train_arcface`) on a
  CondFace model (``condface_dc_ir*`` / ``condface_ir*``, :mod:`facetool.models.condface`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facetool.distributed import all_reduce
from facetool.errors import FacetoolError
from facetool.trainers.arcface import ArcFaceMethod

#: --variant -> the model name prefix (facetool.models.condface)
VARIANTS = {"dc": "condface_dc_ir", "dgconv": "condface_ir"}
CLUSTERINGS = ("none", "sinkhorn")
CLUSTER_HEADS = ("identity", "linear", "mlp")
#: SwAV's constants: scores / 0.1 in the cross-entropy, Sinkhorn epsilon 0.05 and 3 iterations
SCORE_TEMPERATURE, SINKHORN_EPSILON, SINKHORN_ITERATIONS = 0.1, 0.05, 3


@torch.no_grad()
def sinkhorn(scores: Any, epsilon: float = 0.05, iterations: int = 3, group: Any = None) -> Any:
    """Soft assignments (B, K) of B samples to K prototypes from their scores (B, K), rows summing to 1.

    SwAV's ``distributed_sinkhorn`` on this process's rows: Q = exp(scores / epsilon).T normalised to
    total 1, then ``iterations`` rounds of prototype (row) sums -> 1/K and sample (column) sums -> 1/B,
    and Q * B transposed. Under DDP the total and the prototype sums are all-reduced over ``group``
    (default: the whole job) and B counts every rank's samples, as in SwAV; in one process nothing is
    communicated. After finitely many iterations the per-prototype mass is only about B/K (the
    equipartition is soft); every row sums exactly to 1.

    Computed in float32 at least (float64 stays float64): exp(s / 0.05) overflows float16 for s > 0.55.
    One global maximum (all-reduced under DDP) is subtracted first, which changes nothing because every
    normalisation divides it out; a per-sample maximum would change Q. Scores are meant to be cosine
    similarities (SwAV L2-normalises features and prototypes, so |s| <= 1). A tensor in gives a tensor
    out (on its device), anything else a numpy array.
    """
    is_tensor = isinstance(scores, torch.Tensor)
    s = scores.detach() if is_tensor else torch.as_tensor(np.asarray(scores, dtype=np.float64))
    if s.ndim != 2 or s.shape[0] < 1 or s.shape[1] < 1:
        raise FacetoolError(f"sinkhorn needs a B x K score matrix with B, K >= 1, got shape {tuple(s.shape)}")
    if not (isinstance(epsilon, (int, float)) and 0 < epsilon < float("inf")):
        raise FacetoolError(f"sinkhorn epsilon must be a positive finite number, got {epsilon!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise FacetoolError(f"sinkhorn iterations must be an integer >= 1, got {iterations!r}")
    s = s.to(torch.float64 if s.dtype == torch.float64 else torch.float32)
    if not bool(torch.isfinite(s).all()):
        raise FacetoolError("sinkhorn scores must be finite (found NaN or infinity)")

    top = all_reduce(s.max().reshape(1).clone(), "max", group)  # ONE global scalar: exact under every normalisation
    q = torch.exp((s - top) / epsilon).t()  # K x B, as in SwAV
    b = torch.tensor(float(q.shape[1]), dtype=q.dtype, device=q.device)
    b = all_reduce(b, "sum", group)  # samples of every rank
    k = q.shape[0]
    q /= all_reduce(q.sum().reshape(1), "sum", group)
    for _ in range(iterations):
        q /= all_reduce(q.sum(dim=1, keepdim=True), "sum", group)  # each prototype's mass -> 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample's mass -> 1/B
        q /= b
    q *= b  # columns sum to 1: an assignment per sample
    out = q.t().contiguous()
    return out if is_tensor else out.numpy()


def parse_temperature(text: str | None) -> tuple[float, float] | None:
    """``--routing-temperature START:END`` (two positive numbers; ``""`` = the model's own, 1) -> (start, end)."""
    if not text:
        return None
    parts = text.split(":")
    try:
        t = tuple(float(v) for v in parts)
    except ValueError:
        t = ()
    if len(t) != 2 or not all(math.isfinite(v) and 0 < v <= 1000 for v in t):
        raise FacetoolError(f"--routing-temperature needs START:END, two positive numbers up to 1000 "
                            f"(e.g. 30:1), got {text!r}")
    return t  # type: ignore[return-value]


def temperature_at(schedule: tuple[float, float], epoch: int, epochs: int) -> float:
    """The routing temperature of ``epoch`` (0-based): START in the first epoch, END in the last, linear
    in between."""
    start, end = schedule
    return start if epochs <= 1 else start + (end - start) * min(epoch, epochs - 1) / (epochs - 1)


def cluster_head(kind: str, dim: int) -> nn.Module:
    """p of Eq. 5.5 on the routing vector (dim -> dim): identity, linear, or SwAV's MLP (Linear -> BN ->
    ReLU -> Linear)."""
    if kind == "identity":
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(dim, dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))
    raise FacetoolError(f"unknown --cluster-head {kind!r}; choose one of {', '.join(CLUSTER_HEADS)}")


class CondFaceMethod(ArcFaceMethod):
    """CondFace training: the margin loss of :class:`ArcFaceMethod` + a routing temperature schedule +
    (``clustering="sinkhorn"``) lambda * the prototype loss on the routing vectors."""

    name = "condface"

    def __init__(self, num_classes: int, embedding_size: int, *, routing_dim: int, loss: str = "cosface",
                 clustering: str = "none", prototypes: int = 300, head: str = "mlp", lam: float = 1.0,
                 temperature: tuple[float, float] | None = None, epochs: int = 1, **arcface: Any) -> None:
        if clustering not in CLUSTERINGS:
            raise FacetoolError(f"unknown --clustering {clustering!r}; choose one of {', '.join(CLUSTERINGS)}")
        if isinstance(prototypes, bool) or not isinstance(prototypes, int) or prototypes < 2:
            raise FacetoolError(f"--prototypes must be an integer >= 2, got {prototypes!r}")
        if not (math.isfinite(lam) and lam >= 0):
            raise FacetoolError(f"--lambda must be a finite number >= 0, got {lam}")
        super().__init__(num_classes, embedding_size, loss, **arcface)
        self.clustering, self.num_prototypes, self.head_kind, self.lam = clustering, prototypes, head, float(lam)
        self.temperature, self.epochs, self.routing_dim = temperature, epochs, routing_dim
        self.cluster_head: nn.Module | None = None
        self.prototypes: nn.Linear | None = None
        if clustering == "sinkhorn":
            self.cluster_head = cluster_head(head, routing_dim)
            self.prototypes = nn.Linear(routing_dim, prototypes, bias=False)
        self._warned = False

    def modules(self) -> dict[str, nn.Module]:
        mods = super().modules()
        if self.prototypes is not None:
            mods.update({"cluster_head": self.cluster_head, "prototypes": self.prototypes})
        return mods

    def start_epoch(self, model: nn.Module, epoch: int) -> None:
        if self.temperature is not None:
            model.set_temperature(temperature_at(self.temperature, epoch, self.epochs))

    def scores(self, routing: torch.Tensor) -> torch.Tensor:
        """Cosines (B, P) of the L2-normalised cluster-head outputs and prototypes, in float32."""
        with torch.autocast(routing.device.type, enabled=False):
            z = F.normalize(self.cluster_head(routing.float()), dim=1)
            return z @ F.normalize(self.prototypes.weight.float(), dim=1).t()

    def cluster_loss(self, routing: torch.Tensor) -> torch.Tensor:
        """L_cls (Eq. 5.5): cross-entropy of softmax(scores / 0.1) to the Sinkhorn assignments of the batch."""
        if routing.shape[0] < self.num_prototypes and not self._warned:
            self._warned = True
            from facetool.console import err_console
            from facetool.distributed import is_main

            if is_main():
                err_console.print(f"note: batches of {routing.shape[0]} routing vectors are smaller than --prototypes "
                                  f"{self.num_prototypes}: some prototypes get no mass in a batch (swav#42)",
                                  highlight=False, soft_wrap=True, markup=False)
        s = self.scores(routing)
        q = sinkhorn(s, SINKHORN_EPSILON, SINKHORN_ITERATIONS)
        return -(q * F.log_softmax(s / SCORE_TEMPERATURE, dim=1)).sum(1).mean()

    def loss(self, model, batch, out, internals):
        terms = super().loss(model, batch, out, internals)
        if self.prototypes is not None:
            terms["cls"] = self.lam * self.cluster_loss(internals["routing"])
        return terms

    def metrics(self, batch, out, internals):
        row = super().metrics(batch, out, internals)
        if self.prototypes is not None:
            with torch.no_grad():
                used = self.scores(internals["routing"]).argmax(1).unique().numel()
            row["protos_used"] = float(used)  # distinct prototypes the batch's argmax picks (collapse -> 1)
        return row

    def meta(self) -> dict:
        return {**super().meta(), "clustering": self.clustering, "routing_dim": self.routing_dim,
                "routing_temperature": list(self.temperature) if self.temperature else None,
                **({"prototypes": self.num_prototypes, "cluster_head": self.head_kind, "lambda": self.lam}
                   if self.clustering != "none" else {})}


def routing_dim(model: nn.Module) -> int:
    """|beta|: the sum of the routing blocks' groups x experts (24 for DC IR-18, 96 for AS4 IR-18)."""
    return sum(b.router.groups * b.router.experts for b in model.routing_blocks())


def condface_network(variant: str, network: str) -> str:
    """The CondFace model of ``--variant`` at the depth of the IR-ResNet ``--network`` (r18 -> condface_ir18)."""
    from facetool.models.iresnet import LAYERS
    from facetool.trainers.arcface import resolve_network

    if variant not in VARIANTS:
        raise FacetoolError(f"unknown --variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    name = resolve_network(network)
    depth = name.removeprefix("iresnet")
    if not name.startswith("iresnet") or not depth.isdigit() or int(depth) not in LAYERS:
        raise FacetoolError(f"--network {network!r}: CondFace models are IR-ResNets; use "
                            + "/".join(f"r{d}" for d in LAYERS))
    return f"{VARIANTS[variant]}{depth}"


def train_condface(store: str | Path, cfg: Any, *, variant: str = "dgconv", network: str = "r18",
                   clustering: str = "none", prototypes: int = 300, head: str = "mlp", lam: float = 1.0,
                   temperature: tuple[float, float] | None = None, loss: str = "cosface", width: int = 64,
                   **arcface: Any) -> dict[str, float]:
    """Train a CondFace model with :func:`~facetool.trainers.arcface.train_arcface`'s recipe and a
    :class:`CondFaceMethod`; ``arcface`` are train_arcface's other keyword arguments."""
    from facetool.trainers.arcface import train_arcface

    name = condface_network(variant, network)
    if clustering not in CLUSTERINGS:
        raise FacetoolError(f"unknown --clustering {clustering!r}; choose one of {', '.join(CLUSTERINGS)}")
    if clustering != "none" and head not in CLUSTER_HEADS:
        raise FacetoolError(f"unknown --cluster-head {head!r}; choose one of {', '.join(CLUSTER_HEADS)}")
    if isinstance(prototypes, bool) or not isinstance(prototypes, int) or prototypes < 2:
        raise FacetoolError(f"--prototypes must be an integer >= 2, got {prototypes!r}")
    model_kwargs = {"width": width} if width != 64 else {}
    if temperature is not None:
        model_kwargs["temperature"] = temperature[1]  # what the trained model runs at (start_epoch anneals to it)

    def make(model: nn.Module, **kw: Any) -> CondFaceMethod:
        return CondFaceMethod(routing_dim=routing_dim(model), clustering=clustering, prototypes=prototypes,
                              head=head, lam=lam, temperature=temperature, epochs=cfg.epochs, **kw)

    cfg.extra = {**cfg.extra, "variant": variant, "clustering": clustering}
    return train_arcface(store, cfg, network=name, loss=loss, family="condface", model_kwargs=model_kwargs or None,
                         method_factory=make, **arcface)


__all__ = ["sinkhorn", "CondFaceMethod", "train_condface", "parse_temperature", "temperature_at"]
