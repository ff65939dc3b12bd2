"""PartialFC: a margin head whose class centres are split over the ranks, with sampled negatives.

insightface's ``partial_fc_v2`` (An et al., "Partial FC", 2021), rebuilt on facetool's margin
(:func:`facetool.models.heads.combined_margin`, the same ArcFace / CosFace numbers as
:class:`~facetool.models.heads.MarginHead`). With ``W`` processes and ``C`` classes, rank ``r`` holds

    num_local = C // W + (r < C % W) rows, the classes [class_start, class_start + num_local),
    class_start = C // W * r + min(r, C % W).

A step (:meth:`PartialFC.forward`):

1. all-gathers the embeddings and labels of every rank (``W * B`` rows; :class:`AllGather`'s backward
   sums the gradient over ranks and multiplies it by ``W``, which DDP's averaging of the backbone's
   gradients undoes);
2. labels outside this rank's classes become -1; in training at ``sample_rate < 1`` it keeps
   ``num_sample = max(1, int(sample_rate * num_local))`` centres: every positive (a class of the global
   batch) and random negatives (``perm = rand(num_local); perm[positives] = 2; topk(num_sample)``,
   sorted; labels remapped by ``searchsorted``), only the positives if they are more than ``num_sample``;
   in eval mode and at rate 1 it keeps all;
3. cosines of the normalised embeddings and centres in fp32, the margin on the target logit, scale ``s``;
4. the distributed cross-entropy (:class:`DistCrossEntropy`): the row max all-reduced (MAX), the sum of
   exponentials and the target logit all-reduced (SUM), ``log(sum) + max - target`` averaged over the
   ``W * B`` rows -- the same number on every rank. (insightface all-reduces the target probability and
   takes ``-log`` of it clamped at 1e-30, which caps a row's loss at 69.1, a cap an untrained ArcFace
   head at s = 64 reaches; the log-space form is the exact cross-entropy of the full head.)

At rate 1 on one process it is the full :class:`MarginHead` (loss and gradients). Below rate 1 the sampled
centres are gathered by :class:`RowGather`, whose gradient holds only their rows (sparse), and only they are
normalised; the engine's :class:`~facetool.engine.ShardSGD` applies that gradient exactly as dense SGD with
momentum and weight decay would. Memory per rank (the reason to use it): centres ``ceil(C / W) * D * 4``
bytes, x2 with SGD momentum (x3 at rate 1, with the dense gradient), the sampled rows' gradient and logits
``W * B * num_sample * 4`` bytes (:func:`memory_estimate`). Works without a process group (one
process: no communication). The weight's initial values depend on the seed only, not on ``W``, so a run
on one process and one on two start from the same head (:meth:`PartialFC.merge` joins the shards).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from facetool import distributed as fd
from facetool.errors import FacetoolError
from facetool.models.heads import MARGINS, combined_margin

#: rows per block of the seed-determined initial weight (so that the initial head does not depend on W)
INIT_BLOCK = 1024


def shard_range(num_classes: int, rank: int, world: int) -> tuple[int, int]:
    """``(class_start, num_local)`` of ``rank`` among ``world`` processes (insightface's split)."""
    num_local = num_classes // world + int(rank < num_classes % world)
    class_start = num_classes // world * rank + min(rank, num_classes % world)
    return class_start, num_local


def resolve_margin(margin: str | Sequence[float]) -> tuple[float, float, float]:
    """``(m1, m2, m3)`` of a margin name (``arcface``, ``cosface``) or of three numbers."""
    if isinstance(margin, str):
        if margin not in MARGINS:
            raise FacetoolError(f"PartialFC needs a margin head: arcface or cosface (or m1,m2,m3), got {margin!r}")
        return MARGINS[margin]
    m = tuple(float(v) for v in margin)
    if len(m) != 3 or not all(math.isfinite(v) for v in m):
        raise FacetoolError(f"PartialFC margins must be three finite numbers m1,m2,m3, got {margin!r}")
    return m  # type: ignore[return-value]


def memory_estimate(num_classes: int, embedding_size: int, world: int, batch_size: int,
                    sample_rate: float = 1.0) -> dict[str, int]:
    """Bytes per rank the head needs (REFERENCE's formula, with facetool's sparse gradient): ``weight`` =
    ceil(C/W) * D * 4; ``state`` = weight, its SGD momentum and its gradient: 3 x weight at rate 1 (a dense
    gradient), 2 x weight + the sampled rows' gradient floor(r * C / W) * D * 4 below (:class:`RowGather`);
    ``logits`` = W * B * floor(r * C / W) * 4 (one fp32 copy)."""
    rows = math.ceil(num_classes / world)
    weight = rows * embedding_size * 4
    sampled = max(1, int(sample_rate * num_classes // world))
    logits = world * batch_size * sampled * 4
    state = 3 * weight if sample_rate >= 1.0 else 2 * weight + sampled * embedding_size * 4
    return {"weight": weight, "state": state, "logits": logits}


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class AllGather(torch.autograd.Function):
    """Every rank's rows in rank order (equal row counts). Backward: the gradient of the gathered rows
    summed over the ranks, this rank's rows of it, times ``W`` (DDP then averages the backbone's
    gradients over the ``W`` ranks, which gives the gradient of the loss)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        rank, world = _world()
        ctx.rank, ctx.world, ctx.rows = rank, world, x.shape[0]
        if world == 1:
            return x.clone()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        if ctx.world == 1:
            return grad
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows] * ctx.world


def _gather_labels(labels: Tensor) -> Tensor:
    rank, world = _world()
    if world == 1:
        return labels
    parts = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(parts, labels.contiguous())
    return torch.cat(parts)


class DistCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of rows whose classes are split over the ranks: ``logits`` (N, k) this rank's
    columns, ``labels`` (N,) the target column here or -1 (the target is on another rank). The result is
    the same on every rank; the gradient of this rank's logits is ``(softmax - onehot) / N``."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor) -> Tensor:  # type: ignore[override]
        top = logits.detach().max(1, keepdim=True).values
        fd.all_reduce(top, "max")
        prob = (logits.detach() - top).exp_()
        total = prob.sum(1, keepdim=True)
        fd.all_reduce(total, "sum")
        prob.div_(total)
        rows = torch.nonzero(labels >= 0, as_tuple=True)[0]
        target = torch.zeros(logits.shape[0], dtype=prob.dtype, device=prob.device)
        target[rows] = logits.detach()[rows, labels[rows]]
        fd.all_reduce(target, "sum")
        ctx.save_for_backward(prob, labels)
        # -log p_target = log(sum exp(z - max)) - (z_target - max): exact also where p_target < 1e-30
        return (total[:, 0].log() + top[:, 0] - target).mean()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        prob, labels = ctx.saved_tensors
        out = prob.clone()
        rows = torch.nonzero(labels >= 0, as_tuple=True)[0]
        out[rows, labels[rows]] -= 1.0
        return out.mul_(grad / prob.shape[0]), None


class RowGather(torch.autograd.Function):
    """``weight[index]`` (``index`` sorted, unique) whose gradient is a sparse COO tensor holding only the
    gathered rows: a sampled step never materialises a gradient of the whole shard. The engine's
    :class:`facetool.engine.ShardSGD` applies it as the dense gradient it stands for (weight decay and momentum
    still move every row)."""

    @staticmethod
    def forward(ctx, weight: Tensor, index: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(index)
        ctx.shape = weight.shape
        return weight.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (index,) = ctx.saved_tensors
        return torch.sparse_coo_tensor(index[None], grad.contiguous(), ctx.shape, is_coalesced=True,
                                       check_invariants=False), None


class PartialFC(nn.Module):
    """This rank's class centres and the PartialFC loss (module doc). ``margin``: ``"arcface"``,
    ``"cosface"`` (the margins of :data:`facetool.models.heads.MARGINS`) or ``(m1, m2, m3)``; ``s`` the
    scale. ``rank``/``world`` default to the job's (:mod:`facetool.distributed`, also before the process
    group exists); ``seed`` (default: drawn from torch's generator) decides the initial weight
    N(0, 0.01) whatever ``world`` is. ``forward(emb, labels)`` returns the loss; ``last_top1`` is then the
    share of the global batch whose target scores highest among the centres used (all in eval mode)."""

    def __init__(self, embedding_size: int, num_classes: int, sample_rate: float = 1.0,
                 margin: str | Sequence[float] = "arcface", s: float = 64.0, *, easy_margin: bool = False,
                 rank: int | None = None, world: int | None = None, seed: int | None = None) -> None:
        super().__init__()
        if not (0.0 < sample_rate <= 1.0):
            raise FacetoolError(f"--partial-fc must be a sample rate in (0, 1], got {sample_rate}")
        if not (s > 0 and math.isfinite(s)):
            raise FacetoolError(f"PartialFC scale s must be a positive number, got {s}")
        self.rank = fd.rank() if rank is None else rank
        self.world = fd.world_size() if world is None else world
        if num_classes < self.world:
            raise FacetoolError(f"PartialFC splits the classes over the processes: {num_classes} classes cannot be "
                                f"split over {self.world}")
        self.embedding_size, self.num_classes, self.sample_rate = embedding_size, num_classes, float(sample_rate)
        self.m1, self.m2, self.m3 = resolve_margin(margin)
        self.s, self.easy_margin = float(s), easy_margin
        self.class_start, self.num_local = shard_range(num_classes, self.rank, self.world)
        self.num_sample = max(1, int(self.sample_rate * self.num_local))
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.weight = nn.Parameter(self._initial_weight(seed))
        self.last_top1 = float("nan")

    def _initial_weight(self, seed: int) -> Tensor:
        """Rows ``class_start ...`` of a (C, D) N(0, 0.01) matrix drawn in blocks of INIT_BLOCK rows, block
        ``b`` from seed ``seed + b``: the same global matrix for any number of processes. Written block by block
        into the shard (no list of blocks and no concatenated copy: the shard is the only full-size tensor)."""
        lo, hi = self.class_start, self.class_start + self.num_local
        weight = torch.empty(self.num_local, self.embedding_size)
        for b in range(lo // INIT_BLOCK, (hi - 1) // INIT_BLOCK + 1):
            g = torch.Generator().manual_seed(seed + b)
            rows = min(INIT_BLOCK, self.num_classes - b * INIT_BLOCK)
            block = torch.randn(rows, self.embedding_size, generator=g).mul_(0.01)
            a, z = max(lo, b * INIT_BLOCK), min(hi, (b + 1) * INIT_BLOCK)
            weight[a - lo:z - lo] = block[a - b * INIT_BLOCK:z - b * INIT_BLOCK]
        return weight

    def sample(self, local: Tensor) -> tuple[Tensor, Tensor]:
        """``(index, labels)``: the sorted rows of this shard a step uses (all positives, random negatives
        up to ``num_sample``) and ``local`` (this shard's row or -1) remapped to positions in ``index``."""
        own = local >= 0
        positive = torch.unique(local[own], sorted=True)
        if self.num_sample >= positive.numel():
            perm = torch.rand(self.num_local, device=local.device)
            perm[positive] = 2.0
            index = perm.topk(self.num_sample)[1].sort()[0]
        else:
            index = positive
        labels = local.clone()
        labels[own] = torch.searchsorted(index, local[own])
        return index, labels

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        rank, world = _world()
        if (rank, world) != (self.rank, self.world):
            raise FacetoolError(f"this PartialFC head was built for rank {self.rank} of {self.world} processes but "
                                f"runs as rank {rank} of {world}")
        if world > 1:
            sizes = [torch.zeros(1, dtype=torch.long, device=emb.device) for _ in range(world)]
            dist.all_gather(sizes, torch.tensor([emb.shape[0]], device=emb.device))
            if len({int(t) for t in sizes}) > 1:
                raise ValueError(f"PartialFC needs the same batch size on every rank, got {[int(t) for t in sizes]}")
        with torch.autocast(emb.device.type, enabled=False):
            emb_all = AllGather.apply(emb.float())
            local = _gather_labels(labels.long()) - self.class_start
            local = torch.where((local >= 0) & (local < self.num_local), local, torch.full_like(local, -1))
            weight = self.weight
            if self.training and self.num_sample < self.num_local:
                index, local = self.sample(local)
                weight = RowGather.apply(weight, index)  # only the sampled rows get a gradient (sparse)
            cos = F.linear(F.normalize(emb_all), F.normalize(weight.float()))
            with torch.no_grad():
                self.last_top1 = self._top1(cos, local)
            logits = combined_margin(cos, local, self.m1, self.m2, self.m3, self.s, self.easy_margin)
            del cos  # nothing keeps the cosines now: freed before the cross-entropy's probabilities exist
            return DistCrossEntropy.apply(logits, local)

    @staticmethod
    def _top1(cos: Tensor, local: Tensor) -> float:
        top = cos.max(1).values
        fd.all_reduce(top, "max")
        rows = torch.nonzero(local >= 0, as_tuple=True)[0]
        target = torch.full_like(top, -2.0)
        target[rows] = cos[rows, local[rows]]
        fd.all_reduce(target, "max")
        return float((target >= top).float().mean())

    @staticmethod
    def merge(parts: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """One head's state_dict (``weight`` (C, D), a :class:`MarginHead`'s) from the ranks' state_dicts in
        rank order."""
        return {"weight": torch.cat([p["weight"].detach().cpu() for p in parts])}

    def extra_repr(self) -> str:
        return (f"classes={self.num_classes}, local={self.class_start}+{self.num_local}, "
                f"sample_rate={self.sample_rate}, m=({self.m1}, {self.m2}, {self.m3}), s={self.s}")


__all__ = ["PartialFC", "AllGather", "DistCrossEntropy", "RowGather", "shard_range", "memory_estimate", "resolve_margin"]
