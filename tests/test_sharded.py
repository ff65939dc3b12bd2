"""Sharded long jobs: facetool.distributed.shard_indices / map_sharded (DistributedSampler's shards, the
padding deduplicated, results in index order on rank 0) in one process and on two gloo processes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist

from facetool import distributed as fd


def test_shard_indices_as_distributed_sampler():
    """N=10, W=4 (REFERENCE "Sharded extraction"): wrap-around padding, strided; drop_last cuts the tail."""
    got = [fd.shard_indices(10, r, 4).tolist() for r in range(4)]
    assert got == [[0, 4, 8], [1, 5, 9], [2, 6, 0], [3, 7, 1]]
    assert [fd.shard_indices(10, r, 4, drop_last=True).tolist() for r in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [fd.shard_indices(10, r, 4, pad=False).tolist() for r in range(4)] == [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]
    assert [fd.shard_indices(10, r, 4, contiguous=True).tolist() for r in range(4)] == [
        [0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 1]]
    assert [fd.shard_indices(2, r, 4).tolist() for r in range(4)] == [[0], [1], [0], [1]]  # n < world cycles
    sampler = torch.utils.data.DistributedSampler(range(10), num_replicas=4, rank=2, shuffle=False)
    assert list(sampler) == fd.shard_indices(10, 2, 4).tolist()
    for n in (1, 7, 10, 13):  # after dedupe every shard layout covers range(n) exactly once
        for kw in ({}, {"contiguous": True}, {"pad": False}):
            allidx = np.concatenate([fd.shard_indices(n, r, 4, **kw) for r in range(4)])
            assert sorted(set(allidx.tolist())) == list(range(n)), (n, kw)
    with pytest.raises(ValueError, match="rank 4 of 4"):
        fd.shard_indices(10, 4, 4)


def test_map_sharded_in_one_process_is_the_plain_loop():
    seen = []
    res = fd.map_sharded(10, lambda b: b * 10, batch_size=4, start=1, on_result=lambda u, r: seen.append(u))
    assert [r.tolist() for r in res] == [[10, 20, 30, 40], [50, 60, 70, 80], [90]] and seen == [0, 1, 2]
    assert fd.concat_results(res).tolist() == list(range(10, 100, 10))
    pairs = fd.concat_results([(np.ones((2, 3)), None), (np.zeros((1, 3)), None)])
    assert pairs[0].shape == (3, 3) and pairs[1] is None
    assert fd.map_sharded(0, lambda b: b) == []


def _worker(rank: int, world: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    try:
        calls = []

        def fn(b):
            calls.append(b.tolist())
            return (b[:, None] * 10.0, [f"i{i}" for i in b.tolist()])

        res = fd.map_sharded(10, fn, batch_size=1)  # W=2: 5 each, no padding needed
        odd = fd.map_sharded(7, fn, batch_size=2, to_all=True)  # 4 batches: [0,1] [2,3] [4,5] [6]
        blocks = fd.map_sharded(5, lambda b: b.copy(), contiguous=True)  # 3 + 3: index 0 computed twice
        out = {"rank": rank, "calls": calls, "odd": [r[1] for r in odd],
               "blocks": None if blocks is None else fd.concat_results(blocks).tolist(),
               "res": None if res is None else [fd.concat_results(res)[0][:, 0].tolist(), fd.concat_results(res)[1]]}
        with open(f"{root}/r{rank}.json", "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def test_map_sharded_on_two_gloo_processes(tmp_path):
    """Each rank computes its own batches once; rank 0 gets every index once, in order; the others None."""
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2))
    assert r0["calls"][:5] == [[0], [2], [4], [6], [8]] and r1["calls"][:5] == [[1], [3], [5], [7], [9]]
    assert r0["calls"][5:] == [[0, 1], [4, 5]] and r1["calls"][5:] == [[2, 3], [6]]
    assert r0["res"] == [[float(10 * i) for i in range(10)], [f"i{i}" for i in range(10)]] and r1["res"] is None
    assert r0["odd"] == r1["odd"] == [["i0", "i1"], ["i2", "i3"], ["i4", "i5"], ["i6"]]  # to_all: on every rank
    assert r0["blocks"] == [0, 1, 2, 3, 4] and r1["blocks"] is None
