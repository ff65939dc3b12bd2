"""Multi-task ABN forward time: one batched pass (attributes folded into the batch) vs the reference
per-attribute loop (``layer4`` once per attribute, as the official CelebA code does), and vs the plain
backbone (same ResNet without the attention branch, one head of sum(k_i) outputs).

All timings come from this run, on the same weights and batch, interleaved round by round so that
load from other processes hits every variant alike (medians of wall and process-CPU time). The
batched and loop outputs are checked to agree (max abs difference printed).

    .venv/bin/python benchmarks/bench_abn.py                 # quick: ResNet-18 width 16, 64 px, 8 attributes
    .venv/bin/python benchmarks/bench_abn.py --arch resnet101 --width 64 --size 224 --attributes 40 --batch 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


@torch.no_grad()
def _time(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    if x.is_cuda:
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    model(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> dict:
    from facetool.models import create_model
    from facetool.models.abn import per_attribute_loop

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18", help="resnet18|34|50|101, iresnet18|34|50|100")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--attributes", type=int, default=8, help="number of binary attributes (A)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    if a.attributes < 1 or a.batch < 1 or a.iters < 1:
        raise SystemExit("--attributes, --batch and --iters must be >= 1")
    heads = [2] * a.attributes
    torch.manual_seed(0)
    abn = create_model(f"abn_{a.arch}", num_classes=sum(heads), heads=heads, input_size=a.size, width=a.width).eval()
    if a.arch.startswith("iresnet"):
        plain = create_model(a.arch, width=a.width, input_size=max(16, a.size // 16 * 16)).eval()
    else:
        plain = create_model(a.arch, num_classes=sum(heads), input_size=a.size, width=a.width).eval()
    dev = torch.device(a.device)
    abn.to(dev), plain.to(dev)
    x = torch.randn(a.batch, 3, a.size, a.size, device=dev)

    class Loop(torch.nn.Module):
        def forward(self, x):
            with per_attribute_loop(abn):
                return abn(x)

    loop = Loop()
    with torch.no_grad():
        diff = float((abn(x) - loop(x)).abs().max())
    variants = {"plain backbone": plain, "ABN batched": abn, "ABN per-attribute loop": loop}
    for m in variants.values():  # warm-up
        _time(m, x)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for _ in range(a.iters):
        for k, m in variants.items():
            times[k].append(_time(m, x))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}
    base = med["plain backbone"]
    print(f"{a.arch} width {a.width}, {a.size} px, batch {a.batch}, {a.attributes} attributes, {a.device}, "
          f"{torch.get_num_threads()} threads; batched vs loop max |diff| {diff:.2e}")
    print(f"{'variant':<26}{'wall ms':>10}{'cpu ms':>10}{'x plain (wall)':>16}{'x plain (cpu)':>15}")
    for k, (w, c) in med.items():
        print(f"{k:<26}{1e3 * w:>10.1f}{1e3 * c:>10.1f}{w / base[0]:>16.2f}{c / max(base[1], 1e-9):>15.2f}")
    lw, lc = med["ABN per-attribute loop"]
    bw, bc = med["ABN batched"]
    print(f"per-attribute loop / batched: {lw / bw:.2f}x wall, {lc / max(bc, 1e-9):.2f}x cpu")
    return {"median": med, "max_abs_diff": diff}


if __name__ == "__main__":
    main()
