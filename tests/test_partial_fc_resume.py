"""`train arcface --partial-fc 0.5` on two gloo processes, interrupted inside an epoch (``max_steps``) and
resumed on the same two processes, ends exactly where the uninterrupted run ends: merged head, per-rank shards,
backbone, each rank's ShardSGD momentum and the logged losses, bit for bit (the sampled negatives come from each
rank's RNG stream, which the resume state carries)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from facetool.engine import TrainConfig
from test_distributed import _equal_states

TINY = dict(network="r18", loss="arcface", embedding_size=8, input_size=32, model_kwargs={"width": 4})
RATE = 0.5


def _cfg(out: str, **kw) -> TrainConfig:
    return TrainConfig(**{"out": out, "epochs": 2, "batch_size": 4, "lr": 0.05, "verbose": False, "seed": 3, **kw})


def _worker(rank: int, world: int, root: str, store: str) -> None:
    """One of two gloo processes: the whole run, then the same run cut at step 13 of 2 x 10 and resumed."""
    from facetool import distributed as fd
    from facetool.trainers.arcface import train_arcface

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    try:
        train_arcface(store, _cfg(f"{root}/full"), partial_fc=RATE, **TINY)
        train_arcface(store, _cfg(f"{root}/cut", max_steps=13), partial_fc=RATE, **TINY)
        fd.barrier()
        train_arcface(store, _cfg(f"{root}/cut", resume=True), partial_fc=RATE, **TINY)
    finally:
        dist.destroy_process_group()


def _sd(path: Path):
    return torch.load(path, weights_only=True)


def test_partial_fc_run_resumed_on_the_same_two_processes_equals_the_uninterrupted_run(tmp_path):
    """40 identities, 20 classes per rank, 10 sampled per step: every step draws random negatives (at most 8
    positives in a global batch of 8). Three runs on two spawned processes: 11 s on this machine at load 5
    (46 s at load 15)."""
    from facetool.data.synthetic import prepare_synthetic

    store, _ = prepare_synthetic(tmp_path / "s.h5", identities=40, per_identity=3, size=32, seed=0)
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp_path), str(store)), nprocs=2, join=True)

    full, cut = tmp_path / "full", tmp_path / "cut"
    for r in range(2):
        a, b = _sd(full / f"last.rank{r}.pt"), _sd(cut / f"last.rank{r}.pt")
        assert a["step"] == b["step"] == 20 and a["world"] == b["world"] == 2, r
        assert a["optimizer"]["state"] and _equal_states(a["optimizer"], b["optimizer"]), r  # the shard's momentum
        assert _equal_states(a["modules"], b["modules"]), r
        assert torch.equal(_sd(full / f"heads.rank{r}.pt")["head"]["weight"],
                           _sd(cut / f"heads.rank{r}.pt")["head"]["weight"]), r
    merged = _sd(full / "heads.pt")["head"]["weight"]
    assert merged.shape == (40, 8) and torch.equal(merged, _sd(cut / "heads.pt")["head"]["weight"])
    assert _equal_states(_sd(full / "model.pt")["state_dict"], _sd(cut / "model.pt")["state_dict"])
    assert _equal_states(_sd(full / "last.pt")["optimizer"], _sd(cut / "last.pt")["optimizer"])
    rows = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(ref) == 2
    assert [x["train_loss"] for x in rows] == [x["train_loss"] for x in ref]
    assert [x["val_loss"] for x in rows] == [x["val_loss"] for x in ref]
