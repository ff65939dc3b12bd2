"""Inversion loss terms ("priors"): the identity loss, the DeepInversion BN-statistics prior, total
variation and l2 image priors, and the model priors (gate pattern, routing); :func:`attached` hooks
them onto a frozen model for the duration of an inversion. Equations: :mod:`facetool.explainers.invert`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from facetool.errors import FacetoolError
from facetool.hooks import eval_mode, frozen


@runtime_checkable
class Prior(Protocol):
    """A loss term. ``weight`` scales it; ``needs_internals`` asks for the model's internals."""

    name: str
    weight: float
    needs_internals: bool

    def setup(self, model: nn.Module) -> None: ...

    def __call__(self, images: torch.Tensor, outputs: torch.Tensor, internals: dict | None) -> torch.Tensor: ...

    def close(self) -> None: ...


class BasePrior:
    name = "prior"
    needs_internals = False

    def __init__(self, weight: float) -> None:
        self.weight = float(weight)

    def setup(self, model: nn.Module) -> None:
        pass

    def close(self) -> None:
        pass


class IdentityLoss(BasePrior):
    """Distance of the model output to the target embeddings (cosine or squared l2)."""

    name = "id"

    def __init__(self, targets: torch.Tensor, kind: str = "cosine", weight: float = 1.0) -> None:
        super().__init__(weight)
        if kind not in ("cosine", "l2"):
            raise FacetoolError(f"unknown identity loss {kind!r}; use cosine or l2")
        self.targets, self.kind = targets, kind

    def __call__(self, images, outputs, internals):
        t = self.targets.to(outputs)
        if self.kind == "cosine":
            return (1.0 - F.cosine_similarity(outputs, t, dim=1)).mean()
        return (outputs - t).pow(2).sum(1).mean()


class BNStatsPrior(BasePrior):
    """DeepInversion feature prior: batch statistics of every BatchNorm2d input vs running stats."""

    name = "bn"

    def __init__(self, weight: float = 0.01, first_bn_mult: float = 10.0) -> None:
        super().__init__(weight)
        self.first_bn_mult = float(first_bn_mult)
        self._handles: list[Any] = []
        self._terms: dict[int, torch.Tensor] = {}

    def setup(self, model: nn.Module) -> None:
        layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not layers:
            name = getattr(model, "name", type(model).__name__)
            raise FacetoolError(
                f"model {name} has no BatchNorm2d layer, so the BN-statistics prior cannot be used; "
                "pass --no-bn-prior (w_bn=0)"
            )
        if any(m.running_mean is None for m in layers):
            raise FacetoolError("a BatchNorm2d layer keeps no running statistics; pass --no-bn-prior (w_bn=0)")
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(layers)]

    def _hook(self, i: int):
        def hook(mod: nn.BatchNorm2d, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0]
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False)
            self._terms[i] = torch.linalg.vector_norm(mean - mod.running_mean) + torch.linalg.vector_norm(
                var - mod.running_var
            )

        return hook

    def __call__(self, images, outputs, internals):
        if not self._terms:
            raise FacetoolError("no BatchNorm2d layer ran in the forward pass; pass --no-bn-prior (w_bn=0)")
        first = min(self._terms)
        loss = sum((self.first_bn_mult if i == first else 1.0) * t for i, t in self._terms.items())
        self._terms = {}
        return loss

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._terms = [], {}


def neighbour_differences(x: torch.Tensor) -> list[torch.Tensor]:
    """Horizontal, vertical, diagonal and anti-diagonal differences of (B, C, H, W) images."""
    return [
        x[..., :, 1:] - x[..., :, :-1],
        x[..., 1:, :] - x[..., :-1, :],
        x[..., 1:, 1:] - x[..., :-1, :-1],
        x[..., 1:, :-1] - x[..., :-1, 1:],
    ]


class TVPrior(BasePrior):
    """Total variation over 4 directions: ``l2`` = Σ_d mean_b ‖D_d x_b‖₂, ``l1`` = Σ_d mean |D_d x|."""

    def __init__(self, kind: str = "l2", weight: float = 1e-3) -> None:
        super().__init__(weight)
        if kind not in ("l1", "l2"):
            raise ValueError(f"TV kind must be l1 or l2, got {kind!r}")
        self.kind = kind
        self.name = f"tv_{kind}"

    def __call__(self, images, outputs, internals):
        diffs = neighbour_differences(images)
        if self.kind == "l1":
            return sum(d.abs().mean() for d in diffs)
        return sum(d.flatten(1).norm(dim=1).mean() for d in diffs)


class L2Prior(BasePrior):
    """mean_b ‖x_b‖₂: keeps pixels near the mean colour."""

    name = "l2"

    def __call__(self, images, outputs, internals):
        return images.flatten(1).norm(dim=1).mean()


def require_internal(model: nn.Module, key: str, prior: str) -> None:
    names = getattr(model, "internal_names", ())
    if key not in names:
        name = getattr(model, "name", type(model).__name__)
        raise FacetoolError(f"the {prior} prior needs a model that reports {key!r}; {name} reports: {', '.join(names) or 'nothing'}")


class GatePatternPrior(BasePrior):
    """For gated (AIG) models: match the gate-execution probabilities of the target images.

    ``targets`` (B, L) are the target images' ``gate_probs`` (see :func:`reference_internals`);
    ``kind`` = ``bce`` (mean binary cross-entropy) or ``mse``.
    """

    name = "gate"
    needs_internals = True

    def __init__(self, targets: torch.Tensor, weight: float = 1.0, kind: str = "bce") -> None:
        super().__init__(weight)
        if kind not in ("bce", "mse"):
            raise ValueError(f"gate prior kind must be bce or mse, got {kind!r}")
        self.targets, self.kind = targets.detach(), kind

    def setup(self, model: nn.Module) -> None:
        require_internal(model, "gate_probs", "gate-pattern")

    def __call__(self, images, outputs, internals):
        p = internals["gate_probs"]
        t = self.targets.to(p)
        if self.kind == "mse":
            return F.mse_loss(p, t)
        return F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), t)


class RoutingPrior(BasePrior):
    """For dynamic-convolution (CondFace) models: Σ_layers MSE between the routing vectors
    (internal ``routing``: (B, D), or a list of (B, K) per layer) and those of the target images.
    Thesis weight 10."""

    name = "routing"
    needs_internals = True

    def __init__(self, targets: Sequence[torch.Tensor], weight: float = 10.0) -> None:
        super().__init__(weight)
        self.targets = [t.detach() for t in ([targets] if isinstance(targets, torch.Tensor) else targets)]

    def setup(self, model: nn.Module) -> None:
        require_internal(model, "routing", "routing")

    def __call__(self, images, outputs, internals):
        r = internals["routing"]
        r = [r] if isinstance(r, torch.Tensor) else r
        if len(r) != len(self.targets):
            raise FacetoolError(f"model reports {len(r)} routing vectors, the targets {len(self.targets)}")
        return sum(F.mse_loss(a, b.to(a)) for a, b in zip(r, self.targets))


@contextlib.contextmanager
def attached(model: nn.Module, priors: Sequence[Prior]) -> Iterator[None]:
    """Set priors up on ``model`` (hooks) and always tear them down; freeze the model meanwhile."""
    done: list[Prior] = []
    with eval_mode(model), frozen(model):
        try:
            for pr in priors:
                pr.setup(model)
                done.append(pr)
            yield
        finally:
            for pr in done:
                pr.close()


@torch.no_grad()
def reference_internals(model: nn.Module, images: torch.Tensor) -> dict:
    """Internals (gate_probs, routing, ...) of real images, detached: the targets of model priors."""
    with eval_mode(model):
        _, internals = model(images, return_internals=True)
    return internals
