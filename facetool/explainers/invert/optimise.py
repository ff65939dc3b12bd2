"""The inversion itself: :class:`InversionConfig`, the Adam loop with jitter, cosine decay, optional
multi-resolution warm start, NaN guard and exact resume (:func:`invert`), and batching with model
priors (:func:`invert_batches`). Equations: :mod:`facetool.explainers.invert`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facetool.data.transforms import denormalize
from facetool.errors import FacetoolError
from facetool.hooks import eval_mode
from facetool.io import torch_load, torch_save
from facetool.explainers.invert.priors import (BNStatsPrior, GatePatternPrior, IdentityLoss, L2Prior, Prior,
                                               RoutingPrior, TVPrior, attached, reference_internals, require_internal)

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
    with torch.no_grad(), eval_mode(model):
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
        with torch.no_grad(), eval_mode(model):
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


# -- batches -----------------------------------------------------------------------------------
@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Model outputs of normalised images (N, 3, S, S), in eval mode, on the CPU (an ONNX judge runs as
    it is: it has no modes and no parameters)."""
    if not isinstance(model, nn.Module):
        outs = [torch.as_tensor(model(images[i : i + batch])).float().cpu() for i in range(0, len(images), batch)]
        return torch.cat(outs) if outs else torch.zeros(0)
    dev = _device(model)
    with eval_mode(model):
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

    Under ``torchrun`` (a process group of several) the batches are split over the ranks: each batch is an
    independent optimisation seeded with ``cfg.seed`` (its BN statistics are its own faces'), so every
    rank gets back the one-process result (or the same :class:`InversionDiverged`: the batches before
    the first diverged one and its last good images).
    """
    from facetool import distributed as fd

    if len(targets) == 0:
        raise FacetoolError("nothing to invert: no target embeddings")
    if (gate_weight or routing_weight) and target_images is None:
        raise FacetoolError("the gate/routing priors need the target images (not only embeddings)")
    n_batches = math.ceil(len(targets) / cfg.batch)

    def batch(k: int) -> InversionResult:
        sl = slice(k * cfg.batch, (k + 1) * cfg.batch)
        extra: list[Prior] = []
        if gate_weight or routing_weight:
            ref = reference_internals(model, target_images[sl].to(_device(model)))
            if gate_weight:
                require_internal(model, "gate_probs", "gate-pattern")
                extra.append(GatePatternPrior(ref["gate_probs"], gate_weight))
            if routing_weight:
                require_internal(model, "routing", "routing")
                extra.append(RoutingPrior(ref["routing"], routing_weight))
        cb = (lambda s, n, v, k=k: progress(k, n_batches, s, v)) if progress else None
        sp = Path(state_dir) / f"state-{k}.pt" if state_dir is not None else None
        return invert(model, targets[sl], cfg, extra, progress=cb, state_path=sp)

    if fd.sharded():
        def attempt(idx: np.ndarray) -> tuple[InversionResult, str | None]:
            try:
                return batch(int(idx[0])), None
            except InversionDiverged as e:
                return e.result, str(e)

        outcomes = fd.map_sharded(n_batches, attempt, to_all=True)
    else:
        outcomes = None
    imgs, cos, hist, steps = [], [], {}, 0
    for k in range(n_batches):
        try:
            if outcomes is None:
                r = batch(k)
            else:
                r, err = outcomes[k]
                if err is not None:
                    raise InversionDiverged(err, r)
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
