"""ConvNet-AIG inference: real compute skipping vs the same network with every gate forced open
(and vs masking ``z * F(x)``, what the reference code does), next to the executed-FLOPs ratio.

All timings come from this run, on the same model, weights and batch, interleaved round by round
so that load from other processes hits every variant alike (medians are reported). The gates'
last layer is re-initialised (weights N(0, 1)) and, block by block, its open bias is set to the
``1 - rate`` quantile of the logit differences on the batch, so each block runs on about ``rate``
of the samples, different samples per block (every block runs on a sub-batch: index_select /
index_add). ``--pinned`` keeps the target schedule's pinned first/last blocks always open.

    .venv/bin/python benchmarks/bench_aig.py --arch aig_resnet50 --batch 64 --iters 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


@torch.no_grad()
def calibrate_gates(model: torch.nn.Module, x: torch.Tensor, rate: float, pinned: bool = False, seed: int = 0) -> None:
    from facetool.trainers.aig import gated_blocks, target_schedule

    g = torch.Generator().manual_seed(seed)
    blocks = gated_blocks(model)
    targets = target_schedule(len(blocks), rate) if pinned else [rate] * len(blocks)
    for b, t in zip(blocks, targets):
        fc2 = b.gate.fc2
        fc2.weight.copy_(torch.randn(fc2.weight.shape, generator=g))
        fc2.bias.zero_()
        if t >= 1.0:
            fc2.bias[1] = 1e4
            continue
        seen = {}
        h = b.gate.register_forward_hook(lambda m, a, o: seen.__setitem__("x", a[0]))
        model(x)  # earlier blocks are already calibrated: this block sees its real inputs
        h.remove()
        lg = b.gate.logits(seen["x"])
        fc2.bias[1] = -torch.quantile(lg[:, 1] - lg[:, 0], 1.0 - t)


@torch.no_grad()
def _time(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one forward pass."""
    if x.is_cuda:
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    model(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def time_variants(model: torch.nn.Module, x: torch.Tensor, iters: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) time per batch of: gates forced open, masking, real skipping. The CPU
    time of this process is the steadier measure on a machine shared with other jobs."""
    from facetool.trainers.aig import forced_gates, set_skipping

    ts: dict[str, list[tuple[float, float]]] = {"open": [], "mask": [], "skip": []}
    for i in range(iters + 1):  # round 0 warms up
        with forced_gates(model, 1.0):
            t_open = _time(model, x)
        with set_skipping(model, False):
            t_mask = _time(model, x)
        with set_skipping(model, True):
            t_skip = _time(model, x)
        if i:
            ts["open"].append(t_open)
            ts["mask"].append(t_mask)
            ts["skip"].append(t_skip)
    return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in ts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="aig_resnet50")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rate", type=float, default=0.5, help="Fraction of samples each gated block runs on.")
    ap.add_argument("--pinned", action="store_true", help="Keep the target schedule's pinned blocks open.")
    ap.add_argument("--threads", type=int, default=1, help="1 is steadiest on a shared machine.")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    from facetool.flops import count_flops, executed_flops
    from facetool.models import create_model

    model = create_model(a.arch, num_classes=1000, input_size=a.size, width=a.width).eval()
    x = torch.randn(a.batch, 3, a.size, a.size)
    calibrate_gates(model, x, a.rate, a.pinned)
    with torch.no_grad():
        gates = model(x, return_internals=True)[1]["gates"]
    dense = float(count_flops(model, a.size))
    executed = float(executed_flops(model, gates, a.size).double().mean())
    model.to(a.device)
    t = time_variants(model, x.to(a.device), a.iters)
    print(f"{a.arch} width {a.width}, {a.size}px, batch {a.batch}, median of {a.iters}, {a.threads} threads, "
          f"device {a.device}")
    print(f"gate execution rate             {gates.mean():.3f} over {gates.shape[1]} gated blocks "
          f"(per block {min(gates.mean(0)):.2f}..{max(gates.mean(0)):.2f})")
    print(f"GFLOPs/image dense / executed   {dense / 1e9:.3f} / {executed / 1e9:.3f}")
    print(f"{'ms/batch':31s} {'wall':>9s} {'CPU':>9s}")
    for k, name in (("open", "all gates forced open"), ("mask", "masking z*F(x) (reference)"), ("skip", "real skipping")):
        print(f"{name:31s} {t[k][0] * 1e3:9.1f} {t[k][1] * 1e3:9.1f}")
    print(f"executed-FLOPs ratio            {executed / dense:.3f}")
    for i, what in ((0, "wall"), (1, "CPU")):
        print(f"{what + '-time ratio skip / open':31s} {t['skip'][i] / t['open'][i]:.3f}  "
              f"(skip / masking {t['skip'][i] / t['mask'][i]:.3f})")


if __name__ == "__main__":
    main()
