"""PartialFC vs the replicated full margin head: peak memory and step time with W gloo processes.

Each configuration (classes C, head = full | PartialFC at rate r) runs as its own job of W fresh
processes (``torch.multiprocessing.spawn``), so peaks never mix: a process measures its resident set
after importing torch, drawing its inputs and one warm-up collective and backward (the base; the
kernel's peak counter VmHWM is reset there), builds the head and its SGD optimizer (momentum,
weight decay), runs one warm-up and ``--steps`` timed steps on random embeddings (B per rank), and reports
``VmHWM - base`` (what the head cost at its peak) and the median step time. The full head is what
``train arcface`` does without ``--partial-fc``: every rank holds all C centres and all-reduces their
gradient (torch's SGD); PartialFC holds ceil(C / W), gathers the embeddings, and below rate 1 its gradient
holds only the sampled rows, which the engine's ShardSGD applies as the dense update (so weight + momentum,
no full-size gradient). Beside each measurement the memory formula of REFERENCE.md
(:func:`facetool.models.partial_fc.memory_estimate`): centres x3 (weight, gradient, momentum; x2 + the
sampled rows below rate 1) + one fp32 copy of the logits (the full head: C * D * 4 x3 + B * C * 4). Ratios
are against the full head at the same C, from this run. The default batch is 32 per rank (insightface
trains with 128 per GPU, which favours PartialFC further since the full head's B x C logits dominate it;
``--batch 128`` at 10^6 classes needs ~7 GB for the two processes).

    .venv/bin/python benchmarks/bench_partialfc.py                                   # 10^5 at D 512, 10^6 at D 64
    .venv/bin/python benchmarks/bench_partialfc.py --classes 100000 --embedding 512 --batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

MB = 2**20


def _rss() -> int:
    """Current resident set in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    """Start the kernel's peak resident set (VmHWM) again from the current one (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak() -> int:
    """Peak resident set since :func:`_reset_peak`, in bytes (VmHWM; ru_maxrss cannot be reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _job(rank: int, world: int, root: str, spec: dict) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from facetool.engine import ShardSGD
    from facetool.models.heads import MarginHead
    from facetool.models.partial_fc import PartialFC

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    try:
        c, d, b = spec["classes"], spec["embedding"], spec["batch"]
        g = torch.Generator().manual_seed(rank)
        embs = [torch.randn(b, d, generator=g) for _ in range(spec["steps"] + 1)]
        labels = [torch.randint(0, c, (b,), generator=g) for _ in range(spec["steps"] + 1)]
        def make(classes: int):
            # the optimizers train uses: torch's SGD for a replicated head, ShardSGD for a sharded one
            if spec["rate"] is None:
                head = MarginHead(d, classes)
                return head, torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
            head = PartialFC(d, classes, spec["rate"], seed=0)
            return head, ShardSGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

        def step(head, opt, e, y) -> torch.Tensor:
            e = e.clone().requires_grad_()
            loss = F.cross_entropy(head(e, y), y) if spec["rate"] is None else head(e, y)
            opt.zero_grad()
            loss.backward()
            if spec["rate"] is None:  # the replicated head: gradients averaged over the ranks (engine)
                dist.all_reduce(head.weight.grad)
                head.weight.grad /= world
            opt.step()
            return loss

        # one step of a tiny head of the same kind first: the code pages, autograd threads and gloo buffers a
        # first step brings in (~180 MB, whatever C) are not the head's memory
        step(*make(8 * world), embs[0], labels[0] % (8 * world))
        _reset_peak()
        base = _rss()
        head, opt = make(c)
        times = []
        for e, y in zip(embs, labels):
            dist.barrier()
            t0 = time.perf_counter()
            loss = step(head, opt, e, y)
            times.append(time.perf_counter() - t0)
        peak = _peak()
        Path(root, f"rank{rank}.json").write_text(json.dumps(
            {"peak": peak - base, "base": base, "step_s": statistics.median(times[1:]), "loss": float(loss.detach())}))
    finally:
        dist.destroy_process_group()


def run(spec: dict, world: int) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as root:
        mp.spawn(_job, args=(world, root, spec), nprocs=world, join=True)
        ranks = [json.loads(Path(root, f"rank{r}.json").read_text()) for r in range(world)]
    return {"peak": max(r["peak"] for r in ranks), "step_s": max(r["step_s"] for r in ranks),
            "base": max(r["base"] for r in ranks)}


def main(argv: list[str] | None = None) -> list[dict]:
    from facetool.models.partial_fc import memory_estimate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", default="100000:512,1000000:64",
                    help="C:D pairs, comma-separated (D 64 at 10^6 keeps the full head under ~6 GB for both processes)")
    ap.add_argument("--rates", default="1.0,0.3,0.1")
    ap.add_argument("--batch", type=int, default=32, help="embeddings per rank per step")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args(argv)
    rates = [float(r) for r in a.rates.split(",")]
    rows = []
    print(f"{'classes':>9} {'D':>4} {'head':>10} {'peak MB':>9} {'formula MB':>10} {'peak/full':>9} "
          f"{'step s':>8} {'time/full':>9}")
    for pair in a.classes.split(","):
        c, d = (int(v) for v in pair.split(":"))
        full = None
        for rate in [None, *rates]:
            spec = {"classes": c, "embedding": d, "batch": a.batch, "steps": a.steps, "rate": rate}
            res = run(spec, a.world)
            if rate is None:
                est = memory_estimate(c, d, 1, a.batch, 1.0)
                full = res
            else:
                est = memory_estimate(c, d, a.world, a.batch, rate)
            formula = est["state"] + est["logits"]
            row = {**spec, "world": a.world, **res, "formula": formula,
                   "peak_ratio": res["peak"] / full["peak"], "time_ratio": res["step_s"] / full["step_s"]}
            rows.append(row)
            name = "full" if rate is None else f"pfc {rate:g}"
            print(f"{c:>9} {d:>4} {name:>10} {res['peak'] / MB:>9.0f} {formula / MB:>10.0f} "
                  f"{row['peak_ratio']:>9.3f} {res['step_s']:>8.3f} {row['time_ratio']:>9.3f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
