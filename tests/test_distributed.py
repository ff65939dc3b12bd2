"""facetool.distributed and the engine's sharded modules: a class-sharded classifier trained by two gloo
processes saves one part per rank, resumes exactly and refuses another number of processes."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from facetool import distributed as fd
from facetool.engine import Method, TrainConfig, train
from facetool.errors import FacetoolError
from facetool.models import create_model
from test_engine import ToyFaces

CLASSES, DIM = 4, 16


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class _GatherRows(torch.autograd.Function):
    """Every rank's rows, in rank order; backward: this rank's rows of the gradient summed over ranks."""

    @staticmethod
    def forward(ctx, x):
        rank, world = _world()
        ctx.rank, ctx.b = rank, x.shape[0]
        if world == 1:
            return x.clone()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        if _world()[1] > 1:
            dist.all_reduce(g)
        return g[ctx.rank * ctx.b : (ctx.rank + 1) * ctx.b]


class _SumRanks(torch.autograd.Function):
    """Sum over ranks; the loss built on it is the same on every rank, so the gradient passes unchanged."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        if _world()[1] > 1:
            dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, g):
        return g


class ShardedSoftmax(Method):
    """Softmax cross-entropy whose classifier rows are split over the ranks (PartialFC-like, without
    sampling): rank r holds the classes ``[r * per, (r + 1) * per)`` and scores every rank's features."""

    name = "sharded-softmax"

    def __init__(self, rank: int = 0, world: int = 1) -> None:
        per = math.ceil(CLASSES / world)
        self.offset = rank * per
        g = torch.Generator().manual_seed(100 + rank)
        self.fc = nn.Linear(DIM, min(per, CLASSES - self.offset), bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(0.1 * torch.randn(self.fc.weight.shape, generator=g))

    def sharded_modules(self):
        return {"fc": self.fc}

    def loss(self, model, batch, out, internals):
        feats = _GatherRows.apply(out.float())
        labels = _GatherRows.apply(batch["label"].float()).long()
        z = self.fc(feats)
        top = z.detach().max(1).values
        if _world()[1] > 1:
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
        z = z - top[:, None]
        local = labels - self.offset
        own = (local >= 0) & (local < z.shape[1])
        target = torch.where(own, z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None])[:, 0], torch.zeros_like(top))
        return {"ce": (_SumRanks.apply(z.exp().sum(1)).log() - _SumRanks.apply(target)).mean()}


def _backbone():
    torch.manual_seed(0)
    return create_model("resnet18", num_classes=0, input_size=32, width=2)  # 16-d pooled feature


def _cfg(out, **kw) -> TrainConfig:
    return TrainConfig(**{"out": out, "epochs": 2, "batch_size": 4, "lr": 0.05, "verbose": False, **kw})


def _data():
    return ToyFaces(n=16, classes=CLASSES), ToyFaces(n=8, classes=CLASSES, seed=1)


def _sd(path):
    return torch.load(path, weights_only=True)


def _equal_states(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal_states(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_states(x, y) for x, y in zip(a, b))
    return a == b


def _worker(rank: int, world: int, root: str) -> None:
    """One of two gloo processes (group initialised here; the engine uses it as it is)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    try:
        assert (fd.rank(), fd.world_size(), fd.is_main()) == (rank, world, rank == 0)
        assert fd.all_gather_object({"r": rank}) == [{"r": r} for r in range(world)]
        s = fd.EpochSampler(7, seed=3, rank=rank, world=world)  # 7 images, 4 per rank: one padded
        idx = list(s)
        rows = fd.gather_rows(torch.tensor(idx, dtype=torch.float64)[:, None] * 10, idx)
        fd.on_main(lambda: open(f"{root}/gather.json", "w").write(json.dumps(rows[:, 0].tolist())))
        assert (rows is None) == (rank != 0)

        ds, val = _data()
        train(_backbone(), ShardedSoftmax(rank, world), ds, _cfg(f"{root}/full"), val)
        train(_backbone(), ShardedSoftmax(rank, world), ds, _cfg(f"{root}/cut", max_steps=3), val)  # inside epoch 2 of 2 x 2 steps
        fd.barrier()
        train(_backbone(), ShardedSoftmax(rank, world), ds, _cfg(f"{root}/cut", resume=True), val)
    finally:
        dist.destroy_process_group()


def test_gather_rows_and_rank_in_one_process(monkeypatch):
    rows = np.arange(12.0).reshape(6, 2)
    back = fd.gather_rows(rows[[3, 1, 0, 5, 4, 2]], [3, 1, 0, 5, 4, 2])
    assert np.array_equal(back, rows)
    t = fd.gather_rows(torch.tensor(rows[[1, 0]]), torch.tensor([1, 0]), total=2)
    assert isinstance(t, torch.Tensor) and torch.equal(t, torch.tensor(rows[:2]))
    with pytest.raises(ValueError, match="no rank computed"):
        fd.gather_rows(rows[:2], [0, 2])
    assert (fd.rank(), fd.world_size(), fd.is_main(), fd.all_gather_object(5)) == (0, 1, True, [5])
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's environment, no group yet (run folders are guarded first)
    assert (fd.rank(), fd.world_size(), fd.is_main(), fd.on_main(lambda: 1)) == (1, 2, False, None)


def test_sharded_module_in_one_process_trains_saves_and_resumes(tmp_path):
    ds, val = _data()
    m = ShardedSoftmax()
    before = m.fc.weight.detach().clone()
    train(_backbone(), m, ds, _cfg(tmp_path / "full"), val)
    assert not torch.equal(before, m.fc.weight)  # optimised, though not among modules()
    assert torch.equal(_sd(tmp_path / "full" / "heads.rank0.pt")["fc"]["weight"], m.fc.weight.detach())
    assert not (tmp_path / "full" / "heads.pt").exists()
    train(_backbone(), ShardedSoftmax(), ds, _cfg(tmp_path / "cut", max_steps=3), val)  # inside epoch 2 of 2 x 4 steps
    part = _sd(tmp_path / "cut" / "last.rank0.pt")
    assert part["step"] == 3 and part["world"] == 1 and part["optimizer"]["state"]  # momentum kept per rank
    resumed = ShardedSoftmax()
    train(_backbone(), resumed, ds, _cfg(tmp_path / "cut", resume=True), val)
    assert torch.equal(resumed.fc.weight, m.fc.weight)


def test_class_sharded_module_on_two_gloo_processes(tmp_path):
    """Two processes, 4 classes: each rank trains, saves and resumes its own 2 rows of the classifier."""
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    assert json.loads((tmp_path / "gather.json").read_text()) == [0, 10, 20, 30, 40, 50, 60]

    full, cut = tmp_path / "full", tmp_path / "cut"
    w = [_sd(full / f"heads.rank{r}.pt")["fc"]["weight"] for r in range(2)]
    assert w[0].shape == w[1].shape == (2, DIM) and not torch.equal(w[0], w[1])
    init = [ShardedSoftmax(r, 2).fc.weight.detach() for r in range(2)]
    assert not torch.equal(w[0], init[0]) and not torch.equal(w[1], init[1])  # both parts learnt
    for r in range(2):  # the resumed run is the uninterrupted one, rank by rank
        assert torch.equal(_sd(cut / f"heads.rank{r}.pt")["fc"]["weight"], w[r]), r
        a, b = _sd(full / f"last.rank{r}.pt"), _sd(cut / f"last.rank{r}.pt")
        assert a["step"] == b["step"] == 4 and _equal_states(a["optimizer"], b["optimizer"]), r
    assert _equal_states(_sd(full / "model.pt")["state_dict"], _sd(cut / "model.pt")["state_dict"])
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in ref] and "val_loss" in rows[-1]
    st = _sd(cut / "last.pt")
    assert st["sharded"] == {"world": 2, "modules": ["fc"]} and "fc" not in str(list(st["heads"]))

    ds, val = _data()  # one process cannot continue a run whose classifier is split in two
    with pytest.raises(FacetoolError, match=r"trained by 2 processes.*torchrun --nproc_per_node=2") as e:
        train(_backbone(), ShardedSoftmax(), ds, _cfg(cut, resume=True), val)
    assert "\n" not in str(e.value)
    os.remove(cut / "last.rank0.pt")  # and a missing part is named
    st["sharded"]["world"] = 1
    torch.save(st, cut / "last.pt")
    with pytest.raises(FacetoolError, match="last.rank0.pt .* is missing"):
        train(_backbone(), ShardedSoftmax(), ds, _cfg(cut, resume=True), val)


class Replicated(ShardedSoftmax):
    """The same classifier as an ordinary (replicated) method module."""

    def sharded_modules(self):
        return {}

    def modules(self):
        return {"fc": self.fc}


def test_sharded_modules_are_optimised_and_clipped_like_replicated_ones_in_one_process(tmp_path):
    """One process: a sharded module takes the same steps as a replicated one (own optimizer, same
    settings), also when the gradient norm is clipped over both groups."""
    ds, _ = _data()
    a, b = ShardedSoftmax(), Replicated()
    ma, mb = _backbone(), _backbone()
    train(ma, a, ds, _cfg(tmp_path / "a", epochs=1, grad_clip=0.05))
    train(mb, b, ds, _cfg(tmp_path / "b", epochs=1, grad_clip=0.05))
    assert torch.allclose(a.fc.weight, b.fc.weight, atol=1e-6)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ma.parameters(), mb.parameters()))
    assert not torch.equal(a.fc.weight, ShardedSoftmax().fc.weight)  # it did learn (slowly: clipped)


def test_epoch_sampler_pads_every_rank_even_with_fewer_items_than_half_the_ranks():
    """n = 1 item over 4 ranks: every rank gets one index (the padding cycles); before, ranks 2 and 3
    got none and the ranks fell out of step."""
    from facetool.distributed import EpochSampler

    for n, world in ((1, 4), (2, 5), (3, 8), (10, 3)):
        shares = [list(EpochSampler(n, seed=0, rank=r, world=world)) for r in range(world)]
        assert all(len(s) == -(-n // world) for s in shares), (n, world, shares)
        assert set(sum(shares, [])) == set(range(n))
