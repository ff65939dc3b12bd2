"""The one training loop of facetool. Every trainer is a :class:`Method` plugged into :func:`train`.

A method names its loss terms (``loss`` returns a dict; the total is their sum), its per-batch
metrics, optional extra trainable modules (a margin head, a connector ...), modules split per rank (a
class-sharded classifier), an end-of-epoch callback, the keys the epoch line prints and the summary a
run's ``result.json`` gets. The engine owns everything else: SGD with momentum and weight decay,
per-step learning-rate schedule with linear warm-up, AMP on CUDA, a NaN/inf guard naming the bad term,
gradient clipping, metrics (CSV + JSONL + console), atomic per-epoch checkpoints, exact resume, and DDP
under ``torchrun`` (:mod:`facetool.distributed`; rank 0 logs and saves what every rank shares). The
engine knows no model family: conditional computation reaches it only through the model's
``conditional_blocks()``.

Outputs in ``cfg.out``::

    last.pt       resume state (model, method modules, optimizer, scaler, step, RNG, history)
    model.pt      facetool checkpoint of the model (``load_model``), meta = method.meta() + metrics
    heads.pt      state_dicts of the method's extra modules and its merged sharded ones (only if it has any)
    metrics.csv / metrics.jsonl   one row per epoch;  config.json   the TrainConfig

and, for a method with sharded modules, one pair per rank ``r`` written by that rank::

    last.rank{r}.pt   its part of the resume state (sharded modules, their optimizer state, step)
    heads.rank{r}.pt  state_dicts of its sharded modules (shapes of its shard)

Exact resume: the data order of epoch ``e`` is a pure function of ``(seed, e)`` and the resume state
records the step inside the epoch, so ``resume=True`` (after ``max_steps`` or Ctrl-C) continues with
the same batches, learning rates and RNG stream as an uninterrupted run (``workers=0``; with loader
workers the random flips of a resumed epoch are re-drawn).
"""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import io
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset

from facetool.distributed import Dist, EpochSampler, setup, teardown
from facetool.errors import FacetoolError, NonFiniteLossError
from facetool.io import torch_load, torch_save, write_json, write_text
from facetool.models.checkpoint import save_checkpoint

SCHEDULES = ("cosine", "step", "poly")


class Method:
    """Training-method plugin. Subclass and override what the method needs."""

    name = "base"

    def modules(self) -> dict[str, nn.Module]:
        """Extra trainable modules: optimised with the model, replicated on every rank (gradients
        averaged over ranks), saved by rank 0 in the resume state and heads.pt."""
        return {}

    def sharded_modules(self) -> dict[str, nn.Module]:
        """Trainable modules whose parameters are split over the ranks (e.g. a classifier holding this
        rank's classes): not wrapped by DDP and their gradients not averaged (the method's loss does
        its own communication), their optimizer state stays on the rank, and every rank saves its
        part (``last.rank{r}.pt``, ``heads.rank{r}.pt``). A run with them resumes only on as many
        processes as wrote it. Names must differ from :meth:`modules`'."""
        return {}

    def merge_shards(self, parts: list[dict[str, dict[str, Tensor]]]) -> dict[str, dict[str, Tensor]]:
        """One state_dict per sharded module joined from every rank's (``parts[r]``: rank ``r``'s
        ``{name: state_dict}``, on the CPU), written by rank 0 into ``heads.pt`` at the end of a run so that
        the result needs no per-rank file (e.g. PartialFC's class centres as one head). Default: none
        (then nothing is gathered)."""
        return {}

    def loss(self, model: nn.Module, batch: dict, out: Any, internals: dict) -> dict[str, Tensor]:
        """Named loss terms (scalars); the engine minimises their sum."""
        raise NotImplementedError

    def metrics(self, batch: dict, out: Any, internals: dict) -> dict[str, float]:
        """Per-batch numbers, averaged over the epoch (weighted by batch size)."""
        return {}

    def start_epoch(self, model: nn.Module, epoch: int) -> None:
        """Called on every rank before the steps of ``epoch`` (0-based), also when a run resumes inside
        it: per-epoch schedules of the method (e.g. a routing temperature) are set here, from ``epoch``
        alone, so that a resumed run sets them as the uninterrupted one did."""

    def on_epoch_end(self, ctx: "EpochEnd") -> None:
        """Called on every rank after the last step of epoch ``ctx.epoch`` (0-based), before validation,
        :meth:`evaluate` and the epoch's checkpoint, exactly once per epoch (a run interrupted before
        it finished is resumed by calling it again): work over the whole epoch that all ranks do together
        (e.g. k-means over the routing vectors the epoch saw, its sums all-reduced). Its state reaches
        the checkpoint through :meth:`modules`' buffers or :meth:`resume_state`."""

    def resume_state(self) -> dict[str, Any]:
        """This rank's method state that is not in a module (e.g. a memory bank filled during the epoch),
        as a dict of tensors and plain values: the engine gathers it from every rank into ``last.pt``,
        so that a run resumed inside an epoch continues as the uninterrupted one."""
        return {}

    def load_resume_state(self, states: list[dict[str, Any]], rank: int, world: int) -> None:
        """Restore :meth:`resume_state` on resume: ``states`` holds every rank's of the run that wrote it
        (in rank order; their number may differ from ``world``), ``rank`` of ``world`` is this process."""

    def evaluate(self, model: nn.Module, epoch: int) -> dict[str, float]:
        """End-of-epoch callback on rank 0 (model in eval mode)."""
        return {}

    def meta(self) -> dict:
        """JSON-able facts stored in the checkpoint meta (e.g. attribute masks)."""
        return {}

    def log_keys(self) -> tuple[str, ...]:
        """Metric keys the console's epoch line prints, in the row's order, when the row has them
        (``fnmatch`` patterns: ``val_acc*``)."""
        return ("epoch", "train_loss", "train_top1", "val_top1")

    def summary(self, model: nn.Module, final: dict[str, float]) -> dict[str, Any]:
        """What a run's result adds about the trained model (rank 0, model on the CPU), given its final
        metrics: dense GFLOPs, the conditional blocks' share, parameters and -- for a conditional model
        whose metrics hold its per-block decision rates (:func:`facetool.flops.decision_rates`) --
        the executed GFLOPs (``exec_gflops``)."""
        from facetool.flops import executed_gflops, flops_summary

        out: dict[str, Any] = dict(flops_summary(model))
        gflops = executed_gflops(model, final)
        if gflops is not None:
            out["exec_gflops"] = gflops
        return out


@dataclass
class EpochEnd:
    """What :meth:`Method.on_epoch_end` gets: the (unwrapped) model in training mode, the 0-based epoch
    that just ended, the device, this process's ``rank`` of ``world`` and the run's seed (for
    randomness that must not touch the training RNG stream, so that resumed runs draw the same)."""

    model: nn.Module
    epoch: int
    device: torch.device
    rank: int = 0
    world: int = 1
    seed: int = 0


@dataclass
class TrainConfig:
    out: Path
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step | poly
    milestones: tuple[float, ...] = ()  # epochs (step schedule)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    amp: bool = True  # CUDA only
    seed: int = 0
    workers: int = 0
    grad_clip: float | None = None
    resume: bool = False
    overwrite: bool = False
    log_every: int = 50
    max_steps: int | None = None  # stop after this many optimizer steps in total (tests, smoke runs)
    flip: bool = True  # random horizontal flips of training images (if the dataset supports it)
    val_every: int = 1  # validate every N epochs (and always after the last one)
    val_fraction: float = 0.2  # held-out share per identity of a RecordIO pack (facetool.data.sources.VAL_FRACTION)
    verbose: bool = True
    extra: dict = field(default_factory=dict)  # free JSON-able notes stored in config.json

    def validate(self) -> None:
        if self.epochs < 1:
            raise FacetoolError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise FacetoolError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FacetoolError(f"--lr must be a positive number, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise FacetoolError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs:
            raise FacetoolError(f"--warmup-epochs must be in [0, epochs), got {self.warmup_epochs}")
        if self.grad_clip is not None and not (self.grad_clip > 0 and math.isfinite(self.grad_clip)):
            raise FacetoolError(f"--grad-clip must be positive (0 = off), got {self.grad_clip}")
        if not 0.0 <= self.momentum < 1.0:
            raise FacetoolError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise FacetoolError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.seed < 0:
            raise FacetoolError(f"--seed must be >= 0, got {self.seed}")
        if self.workers < 0:
            raise FacetoolError(f"--workers must be >= 0 (0 = load in the main process), got {self.workers}")
        if self.val_every < 1:
            raise FacetoolError(f"--val-every must be >= 1, got {self.val_every}")
        if not (math.isfinite(self.val_fraction) and 0.0 <= self.val_fraction < 1.0):
            raise FacetoolError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_steps is not None and self.max_steps < 1:
            raise FacetoolError(f"--max-steps must be >= 1 (0 = all epochs), got {self.max_steps}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_options(cls, opts: Any, *, out: Path, extra: dict | None = None) -> "TrainConfig":
        """The config of the command-line training options (``facetool.cli.options.TrainOptions``, or
        any object with those attributes): 0 means off / all for ``grad_clip`` and ``max_steps``,
        ``milestones`` is the typed text (or a sequence), ``lr_gamma`` is the step schedule's ``gamma``.
        Checked here (FacetoolError naming the option), so a bad value fails before any work."""
        ms = opts.milestones
        if isinstance(ms, str):
            try:
                ms = tuple(float(x) for x in ms.split(",") if x.strip())
            except ValueError:
                raise FacetoolError(f"--milestones needs numbers separated by commas, got {opts.milestones!r}") from None
        if not all(math.isfinite(m) and m >= 0 for m in ms):
            raise FacetoolError(f"--milestones must be epochs >= 0, got {opts.milestones!r}")
        if opts.log_every < 0:
            raise FacetoolError(f"--log-every must be >= 0 (0 = never), got {opts.log_every}")
        if not (opts.lr_gamma > 0 and math.isfinite(opts.lr_gamma)):
            raise FacetoolError(f"--lr-gamma must be a positive number, got {opts.lr_gamma}")
        cfg = cls(out=Path(out), epochs=opts.epochs, batch_size=opts.batch_size, lr=opts.lr, momentum=opts.momentum,
                  weight_decay=opts.weight_decay, schedule=opts.schedule, milestones=tuple(ms), gamma=opts.lr_gamma,
                  warmup_epochs=opts.warmup_epochs, amp=opts.amp, seed=opts.seed, workers=opts.workers,
                  grad_clip=opts.grad_clip or None, resume=opts.resume, overwrite=opts.overwrite,
                  log_every=opts.log_every, max_steps=opts.max_steps or None, flip=opts.flip,
                  val_every=opts.val_every, val_fraction=getattr(opts, "val_fraction", 0.2),
                  extra=dict(extra or {}))
        cfg.validate()
        return cfg


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
    total = cfg.epochs * steps_per_epoch
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "step":
        epoch = step / steps_per_epoch
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    p = min(1.0, (step - warm) / max(1, total - warm))
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * p))
    return cfg.lr * (1.0 - p) ** 2  # poly, power 2 as in arcface_torch


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- the loop -------------------------------------------------------------------------------------
def _detached(out: Any) -> Any:
    """The model's output without its graph: a tensor, or a list / tuple of them (the FAN's stacks)."""
    if isinstance(out, (list, tuple)):
        return type(out)(_detached(o) for o in out)
    return out.detach() if isinstance(out, Tensor) else out


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


@contextlib.contextmanager
def _eval_mode(modules: list[nn.Module]) -> Iterator[None]:
    """Modules in eval mode inside the block (dropout off, BatchNorm on running statistics); each
    back in its previous mode afterwards."""
    was = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, w in zip(modules, was):
            m.train(w)


def _method_modules(method: Method) -> list[nn.Module]:
    return [*method.modules().values(), *method.sharded_modules().values()]


def _rank_file(out: Path, kind: str, rank: int) -> Path:
    return out / f"{kind}.rank{rank}.pt"


_RANK_FILE = re.compile(r"(last|heads)\.rank(\d+)\.pt")


class ShardSGD(torch.optim.SGD):
    """The sharded modules' optimizer: torch's SGD (momentum, dampening, Nesterov, weight decay; the same
    ``state_dict``) that also takes **row-sparse** gradients (a sparse COO gradient over dim 0, e.g. PartialFC's
    sampled centres, :class:`facetool.models.partial_fc.RowGather`). Such a parameter is updated exactly as
    torch's dense SGD updates it with a gradient that is zero outside the given rows -- weight decay and momentum
    also move the rows without a gradient, as insightface's dense update does -- the same elementwise operations
    in the same order, but block by block (:attr:`BLOCK` rows), so that no full-size gradient or temporary ever
    exists: the shard costs weight + momentum, not weight + gradient + momentum."""

    BLOCK = 8192

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        sparse = [p for group in self.param_groups for p in group["params"] if p.grad is not None and p.grad.is_sparse]
        grads = [p.grad for p in sparse]
        for p in sparse:  # torch's SGD updates the dense ones
            p.grad = None
        try:
            loss = super().step(closure)
        finally:
            for p, g in zip(sparse, grads):
                p.grad = g
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    self._row_sparse_step(p, p.grad, group)
        return loss

    def _row_sparse_step(self, p: Tensor, grad: Tensor, group: dict) -> None:
        g = grad.coalesce()
        if g.sparse_dim() != 1 or g.shape != p.shape:
            raise ValueError(f"ShardSGD takes gradients sparse over rows only, got sparse_dim {g.sparse_dim()} for a "
                             f"parameter of shape {tuple(p.shape)}")
        rows, vals = g.indices()[0], g.values().to(p.dtype)
        wd, momentum, damp = group["weight_decay"], group["momentum"], group["dampening"]
        lr = float(group["lr"])
        buf = self.state[p].get("momentum_buffer") if momentum != 0 else None  # torch: no state
        first = momentum != 0 and buf is None
        if first:
            buf = self.state[p]["momentum_buffer"] = torch.empty_like(p, memory_format=torch.preserve_format)
        for a in range(0, p.shape[0], self.BLOCK):
            b = min(p.shape[0], a + self.BLOCK)
            lo, hi = (int(v) for v in torch.searchsorted(rows, torch.tensor([a, b], device=rows.device)))
            d = torch.zeros_like(p[a:b])
            d.index_copy_(0, rows[lo:hi] - a, vals[lo:hi])
            if group["maximize"]:
                d = -d
            if wd != 0:  # torch's SGD, line by line, on this block
                d = d.add(p[a:b], alpha=wd)
            if momentum != 0:
                blk = buf[a:b]
                if first:
                    blk.copy_(d)
                else:
                    blk.mul_(momentum).add_(d, alpha=1 - damp)
                d = d.add(blk, alpha=momentum) if group["nesterov"] else blk
            p[a:b].add_(d, alpha=-lr)


def _grad_values(g: Tensor) -> Tensor:
    """The stored entries of a gradient: itself, or a sparse gradient's values (coalesced by the step first:
    :func:`_coalesce_grads`), so that norms, clipping and overflow checks see each entry once."""
    return g._values() if g.is_sparse else g


def _coalesce_grads(params: list[Tensor]) -> None:
    """Sparse gradients summed over duplicate rows (a gradient accumulated twice repeats them)."""
    for p in params:
        if p.grad is not None and p.grad.is_sparse and not p.grad.is_coalesced():
            p.grad = p.grad.coalesce()


def _clip_grad_norm(params: list[Tensor], sharded: list[Tensor], max_norm: float, world: int) -> None:
    """``clip_grad_norm_`` over all parameters, where the sharded ones' squared norms are summed over
    the ranks (the replicated ones are equal on every rank and count once)."""
    if not sharded:
        nn.utils.clip_grad_norm_(params, max_norm)
        return
    grads = [p.grad for p in params if p.grad is not None]
    own = [p.grad for p in sharded if p.grad is not None]
    dev = (grads or own)[0].device if (grads or own) else torch.device("cpu")
    sq = torch.zeros((), device=dev)
    for g in own:
        sq += _grad_values(g).detach().float().pow(2).sum()
    if world > 1:
        dist.all_reduce(sq)
    for g in grads:
        sq += g.detach().float().pow(2).sum()
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads + own:
        _grad_values(g).mul_(coef.to(g.dtype))


def _agree_on_overflow(sharded: list[Tensor], device: torch.device) -> None:
    """AMP with sharded modules: if any rank's sharded gradients overflowed, make every rank's do so,
    so every rank's GradScaler skips the same steps and keeps the same scale."""
    bad = torch.zeros((), device=device)
    for p in sharded:
        if p.grad is not None:
            bad = torch.maximum(bad, (~torch.isfinite(_grad_values(p.grad))).any().float())
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        for p in sharded:
            if p.grad is not None:
                _grad_values(p.grad).fill_(float("nan"))
                break


def _rng_state(device: torch.device) -> dict:
    st = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict, device: torch.device) -> None:
    torch.set_rng_state(st["cpu"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


class _Averager:
    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0

    def add(self, values: dict[str, float], n: int) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * n
        self.n += n

    def mean(self, prefix: str = "") -> dict[str, float]:
        return {prefix + k: v / max(1, self.n) for k, v in self.sums.items()}


def _write_metrics(out: Path, history: list[dict]) -> None:
    cols: list[str] = []
    for row in history:
        cols += [k for k in row if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(history)
    write_text(out / "metrics.csv", buf.getvalue())
    write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def _check_finite(terms: dict[str, Tensor], epoch: int, step: int) -> None:
    vals = torch.stack([t.detach().float().reshape(()) for t in terms.values()])
    if not bool(torch.isfinite(vals).all()):
        for (name, _), v in zip(terms.items(), vals.tolist()):
            if not math.isfinite(v):
                kind = "nan" if math.isnan(v) else "inf"
                raise NonFiniteLossError(
                    f"loss term '{name}' became {kind} at epoch {epoch} step {step}; lower --lr or use --grad-clip"
                )


@torch.no_grad()
def validate(model: nn.Module, method: Method, ds: Dataset, batch_size: int, device: torch.device,
             workers: int = 0) -> dict[str, float]:
    """Method loss terms and metrics averaged over ``ds`` with the model in eval mode and the method's
    modules too (each back in its previous mode afterwards)."""
    from facetool.data.dataset import make_loader

    model.eval()
    avg = _Averager()
    with _eval_mode(_method_modules(method)):
        for batch in make_loader(ds, batch_size, workers=workers):
            batch = _to_device(batch, device)
            out, internals = model(batch["image"], return_internals=True)
            terms = method.loss(model, batch, out, internals)
            vals = {k: float(v) for k, v in terms.items()}
            vals["loss"] = sum(vals.values())
            vals.update(method.metrics(batch, out, internals))
            avg.add(vals, batch["image"].shape[0])
    return avg.mean()


def train(model: nn.Module, method: Method, train_ds: Dataset, cfg: TrainConfig,
          val_ds: Dataset | None = None) -> dict[str, float]:
    """Train ``model`` with ``method``; returns the metrics of the last epoch (see module doc)."""
    cfg.validate()
    out = Path(cfg.out)
    dd = setup()
    try:
        return _train(model, method, train_ds, cfg, val_ds, out, dd)
    finally:
        teardown(dd)


def _train(model, method, train_ds, cfg, val_ds, out: Path, dd: Dist) -> dict[str, float]:
    from facetool.data.dataset import make_loader

    if len(train_ds) == 0:
        raise FacetoolError("the training set is empty")
    device = torch.device(f"cuda:{dd.local_rank}" if torch.cuda.is_available() else "cpu")
    last_path = out / "last.pt"
    if dd.main:
        if last_path.exists() and not cfg.resume and not cfg.overwrite:
            raise FacetoolError(f"{out} already holds a training run; pass --resume to continue it or --overwrite")
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:  # per-rank files of an earlier run would be read as this run's
            for f in out.iterdir():
                if _RANK_FILE.fullmatch(f.name):
                    f.unlink()
        write_json(out / "config.json", {"train": cfg.to_json(), "method": method.name, "method_meta": method.meta(),
                                         "model": dict(getattr(model, "config", {}))})
    if hasattr(train_ds, "flip"):
        train_ds.flip = cfg.flip

    model.to(device)
    heads = nn.ModuleDict(method.modules()).to(device)
    shards = nn.ModuleDict(method.sharded_modules()).to(device)
    if set(heads) & set(shards):
        raise ValueError(f"method {method.name}: {sorted(set(heads) & set(shards))} named both in modules() and "
                         "sharded_modules()")
    params = [p for p in list(model.parameters()) + list(heads.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    shard_params = [p for p in shards.parameters() if p.requires_grad]
    # this rank's shards: their own optimizer, so that its state is saved per rank
    shard_opt = ShardSGD(shard_params, lr=cfg.lr, momentum=cfg.momentum,
                         weight_decay=cfg.weight_decay) if shard_params else None
    optimizers = [opt] + ([shard_opt] if shard_opt is not None else [])
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    n = len(train_ds)
    drop_last = n // dd.world >= cfg.batch_size  # never a lone last sample (BatchNorm needs 2)
    sampler = EpochSampler(n, seed=cfg.seed, rank=dd.rank, world=dd.world)
    steps_per_epoch = (sampler.per_rank // cfg.batch_size) if drop_last else math.ceil(sampler.per_rank / cfg.batch_size)
    loader = make_loader(train_ds, cfg.batch_size, sampler=sampler, workers=cfg.workers, drop_last=drop_last,
                         seed=cfg.seed + dd.rank)

    step, history, partial = 0, [], None
    ended = 0  # epochs whose Method.on_epoch_end has run
    avg = _Averager()
    epoch_start = time.time()
    torch.manual_seed(cfg.seed * 1000 + dd.rank)
    if cfg.resume and last_path.exists():
        st = torch_load(last_path, "resume state")
        if st.get("model_config") != dict(getattr(_unwrap(model), "config", {})) or st.get("method") != method.name:
            raise FacetoolError(f"cannot resume {last_path}: it was trained with another model or method; "
                                "use another --out or --overwrite")
        shard_state = _load_shards(st, shards, out, dd) if (len(shards) or st.get("sharded")) else None
        if st.get("steps_per_epoch") != steps_per_epoch:
            raise FacetoolError(f"cannot resume {last_path}: --batch-size or the data changed since it was written")
        model.load_state_dict(st["model"])
        heads.load_state_dict(st["heads"])
        opt.load_state_dict(st["optimizer"])
        scaler.load_state_dict(st["scaler"])
        step, history, partial = int(st["step"]), list(st["history"]), st.get("partial")
        if shard_state is not None:
            shards.load_state_dict(shard_state["modules"])
            if shard_opt is not None:
                shard_opt.load_state_dict(shard_state["optimizer"])
        rng = st["rng"][dd.rank] if dd.rank < len(st["rng"]) else st["rng"][0]
        _set_rng_state(rng, device)
        ended = int(st.get("epochs_ended", step // steps_per_epoch))
        if st.get("method_state"):
            method.load_resume_state(list(st["method_state"]), dd.rank, dd.world)

    train_model: nn.Module = model
    if dd.world > 1:
        from facetool.models.base import conditional_blocks

        # skipped conditional parts get no gradient in a step
        conditional = bool(conditional_blocks(model))
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dd.local_rank] if device.type == "cuda" else None, find_unused_parameters=conditional)

    def save_state() -> None:
        if len(shards):  # every rank its part, before rank 0 writes last.pt (the gather below waits for all)
            torch_save({"format": "facetool-resume-shard", "rank": dd.rank, "world": dd.world, "step": step,
                        "modules": shards.state_dict(),
                        "optimizer": shard_opt.state_dict() if shard_opt is not None else {}},
                       _rank_file(out, "last", dd.rank))
        rng = [_rng_state(device)]
        if dd.world > 1:
            gathered: list[Any] = [None] * dd.world
            dist.all_gather_object(gathered, {k: v.cpu() for k, v in rng[0].items()})
            rng = gathered
        mine = {k: (v.detach().cpu() if isinstance(v, Tensor) else v) for k, v in method.resume_state().items()}
        method_state: list[Any] = [mine]
        if dd.world > 1:
            method_state = [None] * dd.world
            dist.all_gather_object(method_state, mine)
        if dd.main:
            state = {"format": "facetool-resume", "model": _unwrap(model).state_dict(), "heads": heads.state_dict(),
                     "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "step": step,
                     "steps_per_epoch": steps_per_epoch, "history": history, "rng": rng, "method": method.name,
                     # the running averages of the current epoch (also at its end: its row may be pending)
                     "partial": {"sums": avg.sums, "n": avg.n, "seconds": time.time() - epoch_start},
                     "epochs_ended": ended, "method_state": method_state if any(method_state) else [],
                     "model_config": dict(getattr(_unwrap(model), "config", {}))}
            if len(shards):
                state["sharded"] = {"world": dd.world, "modules": list(shards)}
            torch_save(state, last_path)

    total_steps = cfg.epochs * steps_per_epoch
    stop_at = min(total_steps, cfg.max_steps) if cfg.max_steps is not None else total_steps
    log = _Logger(cfg.verbose and dd.main, total_steps, method.log_keys())
    final: dict[str, float] = dict(history[-1]) if history else {}

    def end_epoch(epoch: int) -> None:
        """The method's end-of-epoch work, on every rank, once per epoch."""
        nonlocal ended
        if ended <= epoch:
            method.on_epoch_end(EpochEnd(_unwrap(model), epoch, device, dd.rank, dd.world, cfg.seed))
            ended = epoch + 1

    def finish_epoch(epoch: int, avg: _Averager, seconds: float) -> None:
        """The epoch's row: train averages, validation, the method's evaluation; appended to history."""
        nonlocal final
        row: dict[str, Any] = {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch,
                               "lr": lr_at(cfg, (epoch + 1) * steps_per_epoch - 1, steps_per_epoch)}
        row.update(avg.mean("train_"))
        row["epoch_time_s"] = round(seconds, 3)
        base = _unwrap(model)
        # rank 0 validates; with sharded modules every rank does (their loss needs all ranks)
        if (dd.main or len(shards)) and val_ds is not None and len(val_ds) and (
                (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
            row.update({f"val_{k}": v for k, v in
                        validate(base, method, val_ds, cfg.batch_size, device, cfg.workers).items()})
        if dd.main:
            base.eval()
            with _eval_mode(_method_modules(method)):
                row.update(method.evaluate(base, epoch + 1))
        history.append(row)
        final = row
        log.epoch(row)

    try:
        if step and step % steps_per_epoch == 0 and len(history) < step // steps_per_epoch:
            # interrupted after the epoch's last step, before its row was written (e.g. Ctrl-C during
            # validation): finish that epoch now, from its saved training averages
            done = _Averager()
            if partial:
                done.sums, done.n = dict(partial["sums"]), int(partial["n"])
            end_epoch(step // steps_per_epoch - 1)
            finish_epoch(step // steps_per_epoch - 1, done, float((partial or {}).get("seconds", 0.0)))
            avg, partial = done, None
            save_state()
            if dd.main:
                _write_metrics(out, history)
        while step < stop_at:
            epoch, start = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch, start * cfg.batch_size)
            model.train()
            heads.train()
            shards.train()
            avg = _Averager()
            if start and partial:  # resuming inside an epoch: keep its running averages
                avg.sums, avg.n = dict(partial["sums"]), int(partial["n"])
            partial = None
            method.start_epoch(_unwrap(model), epoch)
            t0 = epoch_start = time.time()
            for batch in loader:
                lr = lr_at(cfg, step, steps_per_epoch)
                for o in optimizers:
                    for g in o.param_groups:
                        g["lr"] = lr
                batch = _to_device(batch, device)
                with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                    out_, internals = train_model(batch["image"], return_internals=True)
                    terms = method.loss(_unwrap(model), batch, out_, internals)
                _check_finite(terms, epoch + 1, step + 1)
                loss = sum(terms.values())
                for o in optimizers:
                    o.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                _coalesce_grads(shard_params)
                if dd.world > 1:
                    for p in heads.parameters():  # the model's grads are reduced by DDP, the shards' not at all
                        if p.grad is not None:
                            dist.all_reduce(p.grad)
                            p.grad /= dd.world
                    if use_amp and shard_params:
                        _agree_on_overflow(shard_params, device)
                if cfg.grad_clip is not None:
                    for o in optimizers:
                        scaler.unscale_(o)
                    _clip_grad_norm(params, shard_params, cfg.grad_clip, dd.world)
                for o in optimizers:
                    scaler.step(o)
                scaler.update()
                step += 1
                vals = {k: float(v.detach()) for k, v in terms.items()}
                vals["loss"] = sum(vals.values())
                vals.update(method.metrics(batch, _detached(out_), internals))
                avg.add(vals, batch["image"].shape[0])
                log.step(step, epoch, vals, lr, cfg.log_every)
                if step >= stop_at:
                    break
            epoch_done = step % steps_per_epoch == 0
            if epoch_done:
                end_epoch(epoch)
                finish_epoch(epoch, avg, time.time() - t0)
            save_state()
            if dd.main and epoch_done:
                _write_metrics(out, history)
    except KeyboardInterrupt:
        save_state()  # the optimizer state is consistent after every completed step
        raise
    if dd.main and history:
        _write_metrics(out, history)
    merged = _merge_shards(method, shards, dd) if len(shards) else {}
    if dd.main:
        meta = {"method": method.name, **method.meta(), "metrics": final, "epochs_done": len(history),
                "train": cfg.to_json()}
        if len(shards):
            meta["sharded"] = {"world": dd.world, "modules": list(shards)}
        save_checkpoint(out / "model.pt", _unwrap(model), meta)
        if len(heads) or merged:
            torch_save({**{k: m.state_dict() for k, m in heads.items()}, **merged}, out / "heads.pt")
    if len(shards):
        torch_save({k: m.state_dict() for k, m in shards.items()}, _rank_file(out, "heads", dd.rank))
    log.close()
    return final


def _merge_shards(method: Method, shards: nn.ModuleDict, dd: Dist) -> dict:
    """Rank 0: the method's merge of every rank's sharded modules (gathered only if the method merges)."""
    if type(method).merge_shards is Method.merge_shards:
        return {}
    mine = {k: {n: t.detach().cpu() for n, t in m.state_dict().items()} for k, m in shards.items()}
    parts: list[Any] | None = [mine]
    if dd.world > 1:
        parts = [None] * dd.world if dd.main else None
        dist.gather_object(mine, parts, dst=0)
    return method.merge_shards(parts) if dd.main and parts is not None else {}


def _load_shards(st: dict, shards: nn.ModuleDict, out: Path, dd: Dist) -> dict:
    """This rank's part of a resume state (``last.rank{r}.pt``), checked against ``last.pt``: same
    sharded modules, same number of processes, same step."""
    last = out / "last.pt"
    info = st.get("sharded") or {}
    names, saved = list(shards), list(info.get("modules", []))
    if sorted(names) != sorted(saved):
        raise FacetoolError(f"cannot resume {last}: it holds per-process modules {saved or 'none'} but the method "
                            f"has {names or 'none'}; use another --out or --overwrite")
    if int(info["world"]) != dd.world:
        raise FacetoolError(f"cannot resume {last}: it was trained by {info['world']} processes, each holding its own "
                            f"part of {', '.join(names)}, and this run has {dd.world}; resume it with "
                            f"torchrun --nproc_per_node={info['world']}")
    path = _rank_file(out, "last", dd.rank)
    if not path.is_file():
        raise FacetoolError(f"cannot resume {last}: {path.name} (process {dd.rank}'s part of {', '.join(names)}) "
                            "is missing")
    part = torch_load(path, "resume state")
    if part.get("step") != st.get("step") or part.get("world") != dd.world:
        raise FacetoolError(f"cannot resume {last}: {path.name} is from step {part.get('step')} but last.pt from step "
                            f"{st.get('step')} (the run stopped while saving); use --overwrite to start again")
    return part


class _Logger:
    """Rank-0 console output: a progress bar on a terminal, one line per epoch otherwise."""

    def __init__(self, enabled: bool, total: int, keys: tuple[str, ...] = ()) -> None:
        self.enabled = enabled
        self.keys = tuple(keys)
        self.progress = None
        if not enabled:
            return
        from facetool.console import err_console

        self.console = err_console
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), console=self.console)
            self.task = self.progress.add_task("train", total=total)
            self.progress.start()

    def step(self, step: int, epoch: int, vals: dict, lr: float, every: int) -> None:
        if not self.enabled:
            return
        text = f"epoch {epoch + 1} loss {vals['loss']:.4f} lr {lr:.3g}"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, description=text)
        elif every and step % every == 0:
            self.console.print(f"step {step}  {text}", highlight=False, soft_wrap=True)

    def epoch(self, row: dict) -> None:
        if not self.enabled:
            return
        keys = [k for k in row if any(fnmatch.fnmatchcase(k, p) for p in self.keys)]
        self.console.print("  ".join(f"{k} {row[k]:.4g}" if isinstance(row[k], float) else f"{k} {row[k]}" for k in keys),
                           highlight=False, soft_wrap=True)  # one line per epoch, also in a narrow log

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


__all__ = ["Method", "EpochEnd", "TrainConfig", "ShardSGD", "train", "validate", "lr_at", "seed_everything", "EpochSampler", "SCHEDULES"]
