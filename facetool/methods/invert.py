"""Model inversion (DeepInversion): synthesise the faces a recognition model "sees" for given
embeddings, by optimising pixels under an identity loss plus composable priors.

Loss, for a batch of images x (normalised to [-1, 1], shape (B, 3, S, S)) and targets t::

    L = w_id·ID(f(J(x)), t) + w_bn·BN(x) + w_tv_l2·TV2(x) + w_tv_l1·TV1(x) + w_l2·L2(x) + Σ model priors

* ``J`` is a random jitter: a roll by (dy, dx) uniform in [-j, j] with j = ``jitter``·S/112 pixels
  and a horizontal flip with probability 1/2 (the same for the whole batch).
* ``ID`` (:class:`IdentityLoss`): ``cosine`` = mean_b (1 − cos(f_b, t_b)); ``l2`` = mean_b ‖f_b − t_b‖².
* ``BN`` (:class:`BNStatsPrior`): Σ_l m_l (‖μ_l − μ̂_l‖₂ + ‖σ²_l − σ̂²_l‖₂) over every BatchNorm2d
  that ran, with μ_l, σ²_l the batch mean and *biased* variance of the layer's input (per channel),
  μ̂_l, σ̂²_l its running statistics, m_1 = ``first_bn_mult`` for the first layer and 1 otherwise.
* ``TV2``/``TV1`` (:class:`TVPrior`) use the 4 neighbour differences of every pixel: horizontal
  x[i, j+1] − x[i, j], vertical x[i+1, j] − x[i, j], diagonal x[i+1, j+1] − x[i, j] and
  anti-diagonal x[i+1, j] − x[i, j+1]. TV2 = Σ_directions mean_b ‖D x_b‖₂ (Frobenius norm over
  C, H, W of each image); TV1 = Σ_directions mean |D x| (over all elements).
* ``L2`` (:class:`L2Prior`) = mean_b ‖x_b‖₂.

Image priors act on the un-jittered images; per-image terms are averaged over the batch, so the
weights do not depend on the batch size (the DeepInversion code takes norms over the whole batch,
which makes its TV/l2 weights batch dependent: at batch 192 its TV-l2 is ≈ √192 ≈ 14× ours).

Optimisation: Adam (lr ``lr``) with cosine decay to 0 over each stage, pixels clipped to [-1, 1]
after each step. ``multires`` optimises the first ``warm_fraction`` of the iterations at half
resolution (bilinearly upsampled to S before the model), then upsamples the pixels and continues at
full resolution with a fresh optimiser. The model always sees S×S images.

The thesis ran 20,000 iterations at batch 192 on a GPU; the default here (``iterations=300``) is a
CPU budget: a batch of 8 at 112 px through an IR-ResNet-18 takes a few minutes on 2 cores.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facetool.data.transforms import denormalize
from facetool.errors import FacetoolError
from facetool.io import torch_load, torch_save

ProgressFn = Callable[[int, int, dict[str, float]], None]


@dataclass
class InversionConfig:
    iterations: int = 300  # thesis: 20,000 (GPU); 300 finishes in minutes for 8 faces on 2 CPU cores
    lr: float = 0.25
    batch: int = 8  # faces optimised together (BN statistics are batch statistics)
    size: int = 112
    w_id: float = 1.0
    id_loss: str = "cosine"  # or "l2"
    w_bn: float = 0.01
    first_bn_mult: float = 10.0
    w_tv_l2: float = 1e-3  # thesis TV weight
    w_tv_l1: float = 0.0
    w_l2: float = 1e-4  # thesis l2 weight
    jitter: int = 30  # pixels at 112 px; scaled by size / 112
    flip: bool = True
    multires: bool = False
    warm_fraction: float = 0.5
    seed: int = 0
    save_every: int = 50  # iterations between resume states
    prior_weights: dict[str, float] = field(default_factory=dict)  # override any prior's weight by name

    def __post_init__(self) -> None:
        if self.id_loss not in ("cosine", "l2"):
            raise FacetoolError(f"unknown identity loss {self.id_loss!r}; use cosine or l2")
        if self.iterations < 1:
            raise FacetoolError("iterations must be at least 1")
        if self.size < 8:
            raise FacetoolError("image size must be at least 8 pixels")
        if not 0.0 < self.warm_fraction < 1.0:
            raise FacetoolError("warm_fraction must be between 0 and 1")


@dataclass
class InversionResult:
    images: torch.Tensor  # (B, 3, S, S) normalised to [-1, 1], on the CPU
    history: dict[str, list[float]]  # per-iteration raw (unweighted) value of each term, and "total"
    final_cosine: torch.Tensor  # (B,) cosine of f(images) to the targets
    steps: int

    @property
    def uint8(self) -> np.ndarray:
        """(B, S, S, 3) uint8 RGB."""
        return denormalize(self.images)


class InversionDiverged(FacetoolError):
    """A loss term became NaN/inf. ``result`` holds the last finite images."""

    def __init__(self, message: str, result: InversionResult) -> None:
        super().__init__(message)
        self.result = result


# -- priors -----------------------------------------------------------------------------------
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


def _require_internal(model: nn.Module, key: str, prior: str) -> None:
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
        _require_internal(model, "gate_probs", "gate-pattern")

    def __call__(self, images, outputs, internals):
        p = internals["gate_probs"]
        t = self.targets.to(p)
        if self.kind == "mse":
            return F.mse_loss(p, t)
        return F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), t)


class RoutingPrior(BasePrior):
    """For dynamic-convolution (CondFace) models: Σ_layers MSE between the routing vectors
    (internal ``routing``: list of (B, K)) and those of the target images. Thesis weight 10."""

    name = "routing"
    needs_internals = True

    def __init__(self, targets: Sequence[torch.Tensor], weight: float = 10.0) -> None:
        super().__init__(weight)
        self.targets = [t.detach() for t in targets]

    def setup(self, model: nn.Module) -> None:
        _require_internal(model, "routing", "routing")

    def __call__(self, images, outputs, internals):
        r = internals["routing"]
        if len(r) != len(self.targets):
            raise FacetoolError(f"model reports {len(r)} routing vectors, the targets {len(self.targets)}")
        return sum(F.mse_loss(a, b.to(a)) for a, b in zip(r, self.targets))


@contextlib.contextmanager
def attached(model: nn.Module, priors: Sequence[Prior]) -> Iterator[None]:
    """Set priors up on ``model`` (hooks) and always tear them down; freeze the model meanwhile."""
    was_training = model.training
    grads = [p.requires_grad for p in model.parameters()]
    done: list[Prior] = []
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for pr in priors:
            pr.setup(model)
            done.append(pr)
        yield
    finally:
        for pr in done:
            pr.close()
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        model.train(was_training)


@torch.no_grad()
def reference_internals(model: nn.Module, images: torch.Tensor) -> dict:
    """Internals (gate_probs, routing, ...) of real images, detached: the targets of model priors."""
    was = model.training
    model.eval()
    try:
        _, internals = model(images, return_internals=True)
    finally:
        model.train(was)
    return internals


# -- the optimisation -------------------------------------------------------------------------
def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _forward(model: nn.Module, x: torch.Tensor, internals: bool):
    if internals:
        return model(x, return_internals=True)
    return model(x), None


def _stage_plan(cfg: InversionConfig) -> list[tuple[int, int]]:
    """[(resolution, iterations)] for each stage."""
    if not cfg.multires or cfg.iterations < 2:
        return [(cfg.size, cfg.iterations)]
    warm = max(1, int(round(cfg.iterations * cfg.warm_fraction)))
    warm = min(warm, cfg.iterations - 1)
    return [(max(4, cfg.size // 2), warm), (cfg.size, cfg.iterations - warm)]


def _full(param: torch.Tensor, size: int) -> torch.Tensor:
    if param.shape[-1] == size:
        return param
    return F.interpolate(param, size=(size, size), mode="bilinear", align_corners=False)


def _state_key(cfg: InversionConfig) -> dict:
    d = asdict(cfg)
    d.pop("save_every")
    return d


def build_priors(targets: torch.Tensor, cfg: InversionConfig, extra: Sequence[Prior] = ()) -> list[Prior]:
    """Identity loss + the image/BN priors of ``cfg`` + ``extra``; weights overridden by
    ``cfg.prior_weights``; terms of weight 0 are dropped."""
    priors: list[Prior] = [
        IdentityLoss(targets, cfg.id_loss, cfg.w_id),
        BNStatsPrior(cfg.w_bn, cfg.first_bn_mult),
        TVPrior("l2", cfg.w_tv_l2),
        TVPrior("l1", cfg.w_tv_l1),
        L2Prior(cfg.w_l2),
        *extra,
    ]
    names = [p.name for p in priors]
    if len(set(names)) != len(names):
        raise FacetoolError(f"two priors share a name: {names}")
    unknown = set(cfg.prior_weights) - set(names)
    if unknown:
        raise FacetoolError(f"prior_weights names unknown priors {sorted(unknown)}; known: {', '.join(names)}")
    for p in priors:
        if p.name in cfg.prior_weights:
            p.weight = float(cfg.prior_weights[p.name])
    return [p for p in priors if p.weight != 0.0]


def invert(
    model: nn.Module,
    target_embeddings: torch.Tensor,
    cfg: InversionConfig | None = None,
    priors: Sequence[Prior] = (),
    init: torch.Tensor | None = None,
    progress: ProgressFn | None = None,
    state_path: str | Path | None = None,
) -> InversionResult:
    """Optimise one batch of images whose model outputs match ``target_embeddings`` (B, D).

    ``priors`` are extra terms (e.g. :class:`GatePatternPrior`); ``init`` (B, 3, S, S) normalised
    images replace the random start; ``state_path`` makes the run resumable (a state is written
    atomically every ``cfg.save_every`` iterations and at the end; rerunning continues from it).
    Raises :class:`InversionDiverged` (a FacetoolError carrying the last good images) on NaN/inf.
    """
    cfg = cfg or InversionConfig()
    t = torch.as_tensor(target_embeddings)
    if t.dim() != 2 or t.shape[0] == 0:
        raise FacetoolError(f"need a non-empty (N, D) batch of target embeddings, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise FacetoolError("target embeddings contain NaN or inf")
    dev = _device(model)
    t = t.float().to(dev)
    B, S = t.shape[0], cfg.size
    all_priors = build_priors(t, cfg, priors)
    need_int = any(p.needs_internals for p in all_priors)
    plan = _stage_plan(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)

    # check the output dimension once, before any optimisation
    with torch.no_grad(), _eval(model):
        probe = model(torch.zeros(1, 3, S, S, device=dev))
    if probe.dim() != 2:
        raise FacetoolError(f"model outputs shape {tuple(probe.shape)}, not (N, D) vectors; it cannot be inverted")
    if probe.shape[1] != t.shape[1]:
        raise FacetoolError(
            f"model outputs {probe.shape[1]}-dimensional vectors but the targets are {t.shape[1]}-dimensional; "
            "use the model that produced the embeddings"
        )

    stage, step, history = 0, 0, {p.name: [] for p in all_priors} | {"total": []}
    state = _load_state(state_path, cfg, t) if state_path is not None else None
    if state is not None:
        stage, step, history = int(state["stage"]), int(state["step"]), {k: list(v) for k, v in state["history"].items()}
        param = state["images"].to(dev)
        gen.set_state(state["rng"])
    elif init is not None:
        if tuple(init.shape) != (B, 3, S, S):
            raise FacetoolError(f"init images must have shape {(B, 3, S, S)}, got {tuple(init.shape)}")
        param = init.detach().float().to(dev).clamp(-1, 1)
        if plan[0][0] != S:
            param = F.interpolate(param, size=(plan[0][0],) * 2, mode="bilinear", align_corners=False, antialias=True)
    else:
        param = torch.randn(B, 3, plan[0][0], plan[0][0], generator=gen).clamp(-1, 1).to(dev)
    param = param.clone().requires_grad_(True)
    opt = torch.optim.Adam([param], lr=cfg.lr, betas=(0.9, 0.999))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    total_steps = cfg.iterations
    jit = int(round(cfg.jitter * S / 112))

    def save() -> None:
        if state_path is not None:
            torch_save({"version": 1, "config": _state_key(cfg), "targets": t.cpu(), "stage": stage, "step": step,
                        "images": param.detach().cpu(), "optimizer": opt.state_dict(), "rng": gen.get_state(),
                        "history": history}, state_path)

    def result(p: torch.Tensor) -> InversionResult:
        imgs = _full(p.detach(), S).clamp(-1, 1)
        with torch.no_grad(), _eval(model):
            cos = F.cosine_similarity(model(imgs), t, dim=1)
        return InversionResult(imgs.cpu(), history, cos.cpu(), step)

    with attached(model, all_priors):
        while stage < len(plan):
            res, n_stage = plan[stage]
            start = sum(n for _, n in plan[:stage])
            if param.shape[-1] != res:  # warm start: upsample the low-resolution solution
                param = _full(param.detach(), res).clone().requires_grad_(True)
                opt = torch.optim.Adam([param], lr=cfg.lr, betas=(0.9, 0.999))
            while step < start + n_stage:
                k = step - start
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * k / n_stage))
                x = _full(param, S)
                dy, dx = (torch.randint(-jit, jit + 1, (2,), generator=gen).tolist() if jit > 0 else (0, 0))
                flip = cfg.flip and bool(torch.rand((), generator=gen) < 0.5)
                xj = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
                if flip:
                    xj = xj.flip(3)
                out, internals = _forward(model, xj, need_int)
                terms = {p.name: p(x, out, internals) for p in all_priors}
                total = sum(p.weight * terms[p.name] for p in all_priors)
                values = {k2: float(v.detach()) for k2, v in terms.items()} | {"total": float(total.detach())}
                good = param.detach().clone()
                bad = [k2 for k2, v in values.items() if not math.isfinite(v)]
                if not bad:
                    opt.zero_grad(set_to_none=True)
                    total.backward()
                    opt.step()
                    with torch.no_grad():
                        param.clamp_(-1, 1)
                    if not torch.isfinite(param).all():
                        bad = ["images"]
                if bad:
                    with torch.no_grad():
                        param.copy_(good)
                    res_ = result(good)
                    save()
                    raise InversionDiverged(
                        f"inversion diverged at iteration {step + 1}: non-finite {', '.join(bad)}; "
                        f"kept the images of iteration {step}; lower --lr or the prior weights",
                        res_,
                    )
                for k2, v in values.items():
                    history[k2].append(v)
                step += 1
                if cfg.save_every > 0 and step % cfg.save_every == 0:
                    save()
                if progress is not None:
                    progress(step, total_steps, values)
            stage += 1
        save()
        return result(param)


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _load_state(path: str | Path, cfg: InversionConfig, targets: torch.Tensor) -> dict | None:
    p = Path(path)
    if not p.exists():
        return None
    st = torch_load(p, "inversion state")
    if not isinstance(st, dict) or st.get("version") != 1:
        raise FacetoolError(f"{p} is not an inversion state; delete it to start over")
    if st["config"] != _state_key(cfg):
        raise FacetoolError(f"cannot resume from {p}: it was started with other settings; delete it or use the same options")
    tt = st["targets"]
    if tuple(tt.shape) != tuple(targets.shape) or not torch.allclose(tt, targets.cpu(), atol=1e-5):
        raise FacetoolError(f"cannot resume from {p}: it inverts other embeddings; delete it to start over")
    return st


# -- batches, inputs and metrics (used by `facetool invert`) -------------------------------------
@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Model outputs of normalised images (N, 3, S, S), in eval mode, on the CPU."""
    dev = _device(model)
    with _eval(model):
        outs = [model(images[i : i + batch].to(dev)).float().cpu() for i in range(0, len(images), batch)]
    return torch.cat(outs) if outs else torch.zeros(0)


def invert_batches(
    model: nn.Module,
    targets: torch.Tensor,
    cfg: InversionConfig,
    *,
    target_images: torch.Tensor | None = None,
    gate_weight: float = 0.0,
    routing_weight: float = 0.0,
    state_dir: str | Path | None = None,
    progress: Callable[[int, int, int, dict[str, float]], None] | None = None,
) -> InversionResult:
    """Invert ``targets`` in batches of ``cfg.batch`` (each resumable from ``state_dir/state-<k>.pt``).

    Model priors (gate pattern, routing) take their targets from ``target_images``' internals.
    Histories of all batches are concatenated; ``steps`` is the per-batch iteration count.
    """
    if len(targets) == 0:
        raise FacetoolError("nothing to invert: no target embeddings")
    if (gate_weight or routing_weight) and target_images is None:
        raise FacetoolError("the gate/routing priors need the target images (not only embeddings)")
    imgs, cos, hist, steps = [], [], {}, 0
    n_batches = math.ceil(len(targets) / cfg.batch)
    for k in range(n_batches):
        sl = slice(k * cfg.batch, (k + 1) * cfg.batch)
        extra: list[Prior] = []
        if gate_weight or routing_weight:
            ref = reference_internals(model, target_images[sl].to(_device(model)))
            if gate_weight:
                _require_internal(model, "gate_probs", "gate-pattern")
                extra.append(GatePatternPrior(ref["gate_probs"], gate_weight))
            if routing_weight:
                _require_internal(model, "routing", "routing")
                extra.append(RoutingPrior(ref["routing"], routing_weight))
        cb = (lambda s, n, v, k=k: progress(k, n_batches, s, v)) if progress else None
        sp = Path(state_dir) / f"state-{k}.pt" if state_dir is not None else None
        try:
            r = invert(model, targets[sl], cfg, extra, progress=cb, state_path=sp)
        except InversionDiverged as e:  # return everything finished so far plus the last good batch
            done = torch.cat(imgs + [e.result.images])
            e.result = InversionResult(done, hist or e.result.history, torch.cat(cos + [e.result.final_cosine]), e.result.steps)
            raise
        imgs.append(r.images)
        cos.append(r.final_cosine)
        for name, v in r.history.items():
            hist.setdefault(name, []).extend(v)
        steps = r.steps
    return InversionResult(torch.cat(imgs), hist, torch.cat(cos), steps)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (pytorch-msssim, 11-px Gaussian window) of normalised images in [-1, 1]."""
    from pytorch_msssim import ssim as _ssim

    return _ssim((a.float() + 1) / 2, (b.float() + 1) / 2, data_range=1.0, size_average=False)


def best_threshold_accuracy(scores: np.ndarray, same: np.ndarray) -> float:
    """Accuracy of the best single threshold on ``scores`` (higher = same) over all pairs."""
    scores, same = np.asarray(scores, float), np.asarray(same, bool)
    cands = np.concatenate([[-np.inf], np.sort(scores)])
    return float(max(((scores > c) == same).mean() for c in cands))


def inverted_pairs(labels: np.ndarray, ref_labels: np.ndarray, exclude: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each inverted image i: one genuine pair (a real image of the same identity, not row
    ``exclude[i]``) and one impostor pair (a real image of another identity). Returns
    (inverted index, real row, same) for the pairs that could be formed."""
    rng = np.random.default_rng(seed)
    inv, real, same = [], [], []
    rows = np.arange(len(ref_labels))
    for i, y in enumerate(labels):
        gen = rows[(ref_labels == y) & (rows != exclude[i])]
        imp = rows[ref_labels != y]
        if len(gen) and len(imp):
            inv += [i, i]
            real += [int(rng.choice(gen)), int(rng.choice(imp))]
            same += [True, False]
    return np.array(inv, int), np.array(real, int), np.array(same, bool)


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
                if "embeddings" not in f:
                    raise FacetoolError(f"{p} has no dataset 'embeddings' (N, D)")
                emb = np.asarray(f["embeddings"][lim], np.float32)
                imgs = np.asarray(f["images"][lim], np.uint8) if "images" in f else None
                labels = np.asarray(f["labels"][lim], np.int64) if "labels" in f else np.arange(len(emb))
                names = [x.decode() if isinstance(x, bytes) else str(x) for x in f["identities"][:]] if "identities" in f else None
        except OSError:
            raise FacetoolError(f"not an HDF5 file (corrupt or wrong file): {p}") from None
        if emb.ndim != 2 or len(emb) == 0:
            raise FacetoolError(f"{p}: 'embeddings' must be a non-empty (N, D) array, got shape {emb.shape}")
        if imgs is not None and (imgs.shape[0] != len(emb) or imgs.shape[1:] != (size, size, 3)):
            raise FacetoolError(f"{p}: 'images' must be (N, {size}, {size}, 3) uint8, got {imgs.shape}")
        if names is None:
            names = [str(i) for i in range(int(labels.max()) + 1)]
        if labels.shape != (len(emb),) or labels.min() < 0 or labels.max() >= len(names):
            raise FacetoolError(f"{p}: 'labels' must be (N,) indices into 'identities'")
        return InversionInputs(imgs, emb, labels, names, [f"{p.name}:{i}" for i in range(len(emb))],
                               np.ones(len(emb), np.uint8))
    p = Path(images)
    if p.is_dir():
        return _load_folder(p, limit, size)
    from facetool.store import FaceStore

    with FaceStore(p) as s:
        labels_all = s.labels
        rows = _spread_rows(labels_all, s.indices(split))[lim]
        if len(rows) == 0:
            raise FacetoolError(f"store {p} has no images in split {split!r}")
        srcs = s.sources
        return InversionInputs(_resize(s.images(rows), size), None, labels_all[rows], s.identities, [srcs[int(r)] for r in rows],
                               s.split[rows], store=p, rows=rows)


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


def grid_image(inputs: np.ndarray | None, inverted: np.ndarray, columns: int = 8, pad: int = 2) -> np.ndarray:
    """uint8 RGB grid: for every ``columns`` faces, a row of inputs (if any) above a row of inversions."""
    n, h, w, _ = inverted.shape
    cols = min(columns, n)
    chunks = math.ceil(n / cols)
    rows_per = 2 if inputs is not None else 1
    H = chunks * rows_per * (h + pad) + pad
    W = cols * (w + pad) + pad
    out = np.full((H, W, 3), 255, np.uint8)
    for i in range(n):
        c, r = i % cols, (i // cols) * rows_per
        x0 = pad + c * (w + pad)
        for k, img in enumerate([inputs[i]] if inputs is not None else []):
            y0 = pad + (r + k) * (h + pad)
            out[y0 : y0 + h, x0 : x0 + w] = img
        y0 = pad + (r + rows_per - 1) * (h + pad)
        out[y0 : y0 + h, x0 : x0 + w] = inverted[i]
    return out


def pair_accuracy(scores: np.ndarray, same: np.ndarray) -> tuple[float, str]:
    """Verification accuracy of pair scores: 10-fold (threshold chosen on 9 folds) when there are at
    least 20 pairs, else the best single threshold over all pairs (optimistic). Returns (acc, method)."""
    scores, same = np.asarray(scores, float), np.asarray(same, bool)
    if len(scores) < 20:
        return best_threshold_accuracy(scores, same), "best-threshold"
    from facetool.eval.verification import kfold_accuracy

    # cosine of unit embeddings -> squared L2 distance 2 - 2cos, the LFW protocol's scale (0..4)
    return kfold_accuracy(2.0 - 2.0 * scores, same)["accuracy"], "10-fold"


def evaluate_inversion(
    result: InversionResult,
    inputs: InversionInputs,
    model: nn.Module,
    judge: nn.Module | None = None,
    pairs: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics of an inversion: SSIM to the input faces, cosine to the target under ``model`` and
    (with input faces) under ``judge``; with ``pairs``, verification accuracy of (inverted, real)
    pairs under the judge (or the model). Per-image values under ``per_image``."""
    from facetool.data.transforms import normalize

    inv = result.images
    m: dict[str, Any] = {"images": len(inv), "iterations": result.steps,
                         "cosine_model": float(result.final_cosine.mean())}
    per: dict[str, list] = {"cosine_model": result.final_cosine.tolist()}
    real = normalize(inputs.images) if inputs.images is not None else None
    if real is not None:
        s = ssim(inv, real)
        m["ssim"], per["ssim"] = float(s.mean()), s.tolist()
        if judge is not None:
            c = F.cosine_similarity(embed(judge, inv), embed(judge, real), dim=1)
            m["cosine_judge"], per["cosine_judge"] = float(c.mean()), c.tolist()
    if pairs:
        if inputs.store is None or inputs.rows is None:
            raise FacetoolError("--pairs needs --images STORE.h5 (real images of the same identities)")
        from facetool.store import FaceStore

        with FaceStore(inputs.store) as st:
            inv_i, real_rows, same = inverted_pairs(inputs.labels, st.labels, inputs.rows, seed)
            if len(inv_i) == 0:
                raise FacetoolError("--pairs: the store has no other image of these identities")
            real_imgs = normalize(st.images(real_rows))
        j = judge if judge is not None else model
        a = F.normalize(embed(j, inv[inv_i]), dim=1)
        b = F.normalize(embed(j, real_imgs), dim=1)
        acc, how = pair_accuracy((a * b).sum(1).numpy(), same)
        m |= {"pairs": int(len(same)), "pair_accuracy": acc, "pair_protocol": how}
    m["per_image"] = per
    return m
