"""Multi-process training and inference under ``torchrun``, in one place.

``torchrun --nproc_per_node=N`` starts N copies of a command with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
in the environment. :func:`setup` turns that into a process group (NCCL on GPU, gloo on CPU) and
:func:`teardown` ends it again; a group that the caller initialised itself (``init_process_group`` with
any ``init_method``) is used as it is and left alone. Everything else asks this module, never the
environment: :func:`rank`, :func:`world_size`, :func:`is_main` (the rank that logs and writes shared
files), :func:`on_main` (run a write on rank 0 only), :func:`barrier`, :func:`all_reduce`, :func:`all_gather_object`,
:func:`gather_rows` (per-rank rows of a sharded pass back in index order on rank 0),
:class:`EpochSampler` (each rank's shard of an epoch's shuffled order), and the one helper every sharded
long job uses: :func:`shard_indices` (DistributedSampler's shard of an index range, or contiguous blocks) and
:func:`map_sharded` (run a function on this rank's batches, gather ``(index, result)`` to rank 0, dedupe the
padding and put the results in index order; :func:`concat_results` joins them).

Outside ``torchrun`` (and with no group initialised) every function answers for one process:
rank 0 of 1, gathers return their input, barriers return at once.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from facetool.io import launch_rank

T = TypeVar("T")


@dataclass
class Dist:
    """This process's place in the job: ``rank`` of ``world``, its ``local_rank`` (GPU index on its
    node), and whether :func:`setup` created the process group (then :func:`teardown` destroys it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def setup() -> Dist:
    """The process group of this job: the one already initialised, else one from ``torchrun``'s
    environment (NCCL and this process's GPU when CUDA is available, gloo otherwise), else none (one
    process)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if _initialised():
        return Dist(dist.get_rank(), dist.get_world_size(), local, False)
    rank, world = launch_rank()
    if world <= 1:
        return Dist()
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Dist(rank, world, local, True)


def teardown(d: Dist) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if d.initialised_here and _initialised():
        dist.destroy_process_group()


@contextmanager
def job() -> Iterator[Dist]:
    """:func:`setup` ... :func:`teardown` around a sharded command (one process outside ``torchrun``)."""
    d = setup()
    try:
        yield d
    finally:
        teardown(d)


def sharded() -> bool:
    """True when a process group of more than one process exists (a sharded job's work is split)."""
    return _initialised() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: the process group's, else ``torchrun``'s (0 outside it)."""
    return dist.get_rank() if _initialised() else launch_rank()[0]


def world_size() -> int:
    """Number of processes: the process group's, else ``torchrun``'s (1 outside it)."""
    return dist.get_world_size() if _initialised() else launch_rank()[1]


def is_main() -> bool:
    """True on rank 0, the process that logs and writes the files every rank shares."""
    return rank() == 0


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """``fn(*args, **kwargs)`` on rank 0 only (writing a shared file); None on the other ranks."""
    return fn(*args, **kwargs) if is_main() else None


def barrier() -> None:
    """Wait until every rank gets here (no-op without a process group)."""
    if _initialised() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum", group: Any = None) -> torch.Tensor:
    """``tensor`` reduced in place over the ranks of ``group`` (default: the whole job) with ``op``
    (``sum`` or ``max``) and returned; without a process group, or in a group of one, it is returned
    as it is (no communication)."""
    if op not in ("sum", "max"):
        raise ValueError(f"all_reduce op must be 'sum' or 'max', got {op!r}")
    if _initialised() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process). Pickled
    between the job's own processes only."""
    if not _initialised() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_rows(rows: np.ndarray | torch.Tensor, indices: np.ndarray | torch.Tensor | list[int],
                total: int | None = None) -> np.ndarray | torch.Tensor | None:
    """Rows computed on each rank for dataset ``indices`` (e.g. its :class:`EpochSampler` shard,
    unshuffled) put back in index order on rank 0: an array (tensor in, CPU tensor out) of
    ``total`` rows (default: the largest index + 1) where row ``i`` is the row computed for index
    ``i``. Indices that several ranks computed (the sampler's padding) must hold equal rows; an index
    no rank computed is an error. Other ranks get None."""
    is_tensor = isinstance(rows, torch.Tensor)
    local = rows.detach().cpu().numpy() if is_tensor else np.asarray(rows)
    idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64).reshape(-1)
    if len(idx) != len(local):
        raise ValueError(f"{len(local)} rows for {len(idx)} indices")
    parts = [(idx, local)]
    if _initialised() and dist.get_world_size() > 1:
        gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object((idx, local), gathered, dst=0)
        if gathered is None:
            return None
        parts = gathered
    n = total if total is not None else max((int(i.max()) + 1 for i, _ in parts if len(i)), default=0)
    out = np.zeros((n, *local.shape[1:]), dtype=local.dtype)
    seen = np.zeros(n, dtype=bool)
    for i, r in parts:
        out[i] = r
        seen[i] = True
    if not seen.all():
        raise ValueError(f"no rank computed rows {np.flatnonzero(~seen)[:5].tolist()} ... of {n}")
    return torch.from_numpy(out) if is_tensor else out


def shard_indices(n: int, rank: int, world: int, *, contiguous: bool = False, pad: bool = True,
                  drop_last: bool = False) -> np.ndarray:
    """This rank's share of ``range(n)``, as ``torch.utils.data.DistributedSampler`` (unshuffled) makes it:
    the range padded with wrap-around duplicates to ``ceil(n / world) * world`` (or, ``drop_last``, cut to
    ``floor(n / world) * world``) and strided ``[rank::world]`` (n=10, world=4: [0,4,8] [1,5,9] [2,6,0]
    [3,7,1]). ``pad=False`` leaves the padding out (ranks may then get one index less). ``contiguous``:
    blocks ``[rank * ceil(n / world), ...)`` instead of a stride (the padding, if any, at the last ranks'
    ends), for jobs that write their share in order (a store's shard file)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of {world} processes")
    idx = np.arange(n, dtype=np.int64)
    if drop_last:
        total = (n // world) * world
        idx = idx[:total]
    else:
        total = math.ceil(n / world) * world
        if pad and n:
            idx = np.resize(idx, total)  # cycles as often as needed (n < world)
    if contiguous:
        per = math.ceil(total / world)
        return idx[rank * per: (rank + 1) * per]
    return idx[rank::world]


def _dedupe(parts: list[tuple[np.ndarray, list[Any]]], n: int) -> list[Any]:
    """``parts`` [(unit indices, results)] from every rank -> one result per unit, in unit order; a unit
    computed twice (the padding) keeps one copy, whichever rank sent it (the copies are the same work).
    Every unit of ``range(n)`` must be there."""
    out: list[Any] = [None] * n
    seen = np.zeros(n, dtype=bool)
    for units, results in parts:
        for u, r in zip(units.tolist(), results):
            if not seen[u]:
                out[u], seen[u] = r, True
    if not seen.all():
        raise ValueError(f"no rank computed units {np.flatnonzero(~seen)[:5].tolist()} ... of {n}")
    return out


def sharded_batches(n: int, batch_size: int, *, start: int = 0, contiguous: bool = False,
                    pad: bool = True) -> list[np.ndarray]:
    """This rank's batches (index arrays) of ``range(start, n)``, in the order :func:`map_sharded` hands
    them to its function (so a caller can build one DataLoader over them)."""
    count = max(0, math.ceil((n - start) / batch_size))
    r, w = (dist.get_rank(), dist.get_world_size()) if _initialised() else (0, 1)
    return [np.arange(start + u * batch_size, min(start + (u + 1) * batch_size, n), dtype=np.int64)
            for u in shard_indices(count, r, w, contiguous=contiguous, pad=pad).tolist()]


def map_sharded(n: int, fn: Callable[[np.ndarray], T], *, batch_size: int = 1, start: int = 0,
                contiguous: bool = False, pad: bool = True, to_all: bool = False,
                on_result: Callable[[int, T], None] | None = None) -> list[T] | None:
    """``[fn(batch) for batch in batches of range(start, n)]`` with the batches split over the ranks.

    ``range(start, n)`` is cut into batches of ``batch_size`` consecutive indices (the last one shorter),
    exactly the batches one process makes, so a batch-dependent computation gives one process's numbers;
    the batches are sharded with :func:`shard_indices` (``contiguous``, ``pad``); ``fn`` gets each of this
    rank's batches as an index array. The ``(batch number, result)`` pairs go to rank 0 (every rank with
    ``to_all``), the padding's duplicates are dropped and the results come back in index order: a list
    with one result per batch there, None on the other ranks. Outside ``torchrun`` it is the plain loop.
    ``on_result(batch_number, result)`` is called on this rank after each of its own batches (progress)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    count = max(0, math.ceil((n - start) / batch_size))
    r, w = (dist.get_rank(), dist.get_world_size()) if _initialised() else (0, 1)  # no group: one process's work
    units = shard_indices(count, r, w, contiguous=contiguous, pad=pad)
    results: list[T] = []
    for u in units.tolist():
        lo = start + u * batch_size
        res = fn(np.arange(lo, min(lo + batch_size, n), dtype=np.int64))
        results.append(res)
        if on_result is not None:
            on_result(u, res)
    if w == 1:
        return _dedupe([(units, results)], count)
    if to_all:
        parts = all_gather_object((units, results))
    else:
        gathered: list[Any] | None = [None] * w if r == 0 else None
        dist.gather_object((units, results), gathered, dst=0)
        if gathered is None:
            return None
        parts = gathered
    return _dedupe(parts, count)


def concat_results(results: list[Any]) -> Any:
    """Per-batch results of :func:`map_sharded` joined: arrays (tensors) concatenated along rows, tuples
    element-wise (None stays None), lists chained."""
    if not results:
        raise ValueError("no results to join")
    first = results[0]
    if isinstance(first, tuple):
        return tuple(None if first[k] is None else concat_results([r[k] for r in results]) for k in range(len(first)))
    if isinstance(first, torch.Tensor):
        return torch.cat(results)
    if isinstance(first, np.ndarray):
        return np.concatenate(results)
    if isinstance(first, list):
        return [x for r in results for x in r]
    raise TypeError(f"cannot join results of type {type(first).__name__}")


class EpochSampler(Sampler[int]):
    """Shuffled indices of one epoch as a pure function of (seed, epoch), this rank's shard, from a
    start offset (used to resume inside an epoch). Every rank gets the same number of indices."""

    def __init__(self, n: int, *, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True) -> None:
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.per_rank = math.ceil(n / world)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed * 100_003 + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        total = self.per_rank * self.world
        while len(idx) < total:  # pad (cycling, as often as needed when n < world) so ranks get equal shares
            idx += idx[: total - len(idx)]
        return idx[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start


__all__ = ["Dist", "setup", "teardown", "rank", "world_size", "is_main", "on_main", "barrier", "all_reduce",
           "all_gather_object", "gather_rows", "EpochSampler",
           "shard_indices", "sharded_batches", "map_sharded", "concat_results", "job", "sharded"]
