"""Relevance maps per second: LRP (zennit + facetool canonizers) and Grad-CAM / Grad-CAM++
(pytorch-grad-cam) vs a plain forward + backward to the input, same model, weights and batch.

All timings come from this run, interleaved round by round so that load from other processes hits
every variant alike (medians reported); the ratio column is maps/s relative to forward+backward.
LRP canonizes on every call (attaching and detaching the canonizers and rule hooks), as the command
does; Grad-CAM enters its context manager (hooks) on every call too.

    .venv/bin/python benchmarks/bench_relevance.py --arch resnet18 --width 16 --size 112 --batch 16 --iters 3
    .venv/bin/python benchmarks/bench_relevance.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18", help="resnet18 | aig_resnet18 | iresnet18 | mobilefacenet ...")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="width 8, 64 px, batch 8, 2 rounds (a few seconds)")
    a = ap.parse_args()
    if a.quick:
        a.width, a.size, a.batch, a.iters = 8, 64, 8, 2

    from facetool.explainers.relevance import Explained, explain
    from facetool.models import create_model

    torch.manual_seed(0)
    emb = a.arch.startswith(("iresnet", "mobilefacenet"))
    kw = {"embedding_size": 128, "input_size": a.size} if emb else {"num_classes": 100, "input_size": a.size}
    if a.arch != "mobilefacenet":
        kw["width"] = a.width
    model = create_model(a.arch, **kw).eval()
    x = torch.randn(a.batch, 3, a.size, a.size)
    with torch.no_grad():
        out = model(x)
    what = Explained(refs=torch.randn_like(out)) if emb else Explained(classes=out.argmax(1))

    def plain() -> None:
        xx = x.clone().requires_grad_(True)
        o = model(xx)
        torch.autograd.grad(what.lrp_output(o).sum(), xx)

    variants = {"forward+backward": plain}
    for m in ("lrp", "lrp-gamma", "gradcam", "gradcam++"):
        variants[m] = (lambda m=m: explain(model, x, m, what))
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(a.iters):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    base = a.batch / statistics.median(times["forward+backward"])
    print(f"{a.arch} width {a.width} {a.size}px batch {a.batch}, {a.iters} rounds, {torch.get_num_threads()} threads")
    print(f"{'variant':18s} {'maps/s':>9s} {'vs fwd+bwd':>11s}")
    for k, t in times.items():
        mps = a.batch / statistics.median(t)
        print(f"{k:18s} {mps:9.1f} {mps / base:10.2f}x")


if __name__ == "__main__":
    main()
