"""CondFace's dynamic convolution: the batched form (one grouped convolution over the batch with the
per-sample aggregated kernels, what the models use) vs a per-sample loop (aggregate, convolve one image
at a time) vs a plain convolution of the same shape (the static layer it replaces), forward and
forward+backward.

All timings come from this run, on the same layer, weights and batch, interleaved round by round so
that load from other processes hits every variant alike (medians reported). The issue's bar: the
batched layer at least 3x faster than the loop at batch 64.

On a CPU the forward of both forms is compute-bound with the same FLOPs (the loop's per-image call costs
microseconds against milliseconds of convolution), so the forward ratio stays near 1x there (measured on
the shared 2-core dev box, 1 thread, 128 ch 14x14 batch 64: DC 0.89x, DGConv 0.83x forward; 8.8x / 2.2x
forward+backward; the grouped convolution with groups=B runs ~2.5x a plain convolution's time in oneDNN).
The 3x bar is a GPU bar (one kernel launch instead of B under-filled ones); unfold+bmm and channels-last
were measured slower or no faster on CPU (0.7x / ~1x of the grouped convolution), so the batched path is
unchanged.

    .venv/bin/python benchmarks/bench_condface.py --batch 64 --channels 128 --size 14 --iters 5
    .venv/bin/python benchmarks/bench_condface.py --layer dgconv --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def per_sample_loop(layer, x: torch.Tensor) -> torch.Tensor:
    """The naive form: route, then for each image aggregate its kernel and convolve it alone."""
    alpha = layer.route(x)
    w, b = layer.aggregated_weight(alpha), layer.aggregated_bias(alpha)
    g = layer.groups * layer.groups_m
    return torch.cat([F.conv2d(x[i:i + 1], w[i], None if b is None else b[i], layer.stride, layer.padding, groups=g)
                      for i in range(x.shape[0])])


def _timed(fn, x: torch.Tensor, backward: bool) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if backward:
        fn(x).square().mean().backward()
    else:
        with torch.no_grad():
            fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layer", choices=("dc", "dgconv"), default="dc")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--size", type=int, default=14, help="feature-map side (IR-18 stage 3 at 112 px: 14)")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from facetool.models.dynamic import DynamicConv2d, DynamicGroupConv2d

    torch.manual_seed(0)
    c, dev = args.channels, torch.device(args.device)
    if args.layer == "dc":
        layer = DynamicConv2d(c, c, 3, 1, 1, experts=args.experts)
        plain = torch.nn.Conv2d(c, c, 3, 1, 1, bias=False)
    else:
        layer = DynamicGroupConv2d(c, c, 3, 1, 1, groups_m=4, experts=args.experts)
        plain = torch.nn.Conv2d(c, c, 3, 1, 1, bias=False, groups=4)
    layer, plain = layer.to(dev), plain.to(dev)
    x = torch.randn(args.batch, c, args.size, args.size, device=dev, requires_grad=False)
    with torch.no_grad():
        assert torch.allclose(layer(x), per_sample_loop(layer, x), atol=1e-4), "batched != loop"
    variants = {"batched": layer, "loop": lambda t: per_sample_loop(layer, t), "plain conv": plain}
    for backward in (False, True):
        times: dict[str, list[float]] = {k: [] for k in variants}
        for k, fn in variants.items():  # warm-up
            _timed(fn, x, backward)
        for _ in range(args.iters):
            for k, fn in variants.items():
                times[k].append(_timed(fn, x, backward))
        med = {k: statistics.median(v) for k, v in times.items()}
        what = "forward+backward" if backward else "forward"
        print(f"{args.layer} {c}->{c} 3x3 at {args.size}x{args.size}, batch {args.batch}, {args.experts} experts, "
              f"{dev}, {what} (median of {args.iters}):")
        for k, t in med.items():
            print(f"  {k:<11} {1e3 * t:9.2f} ms")
        print(f"  loop / batched = {med['loop'] / med['batched']:.2f}x   "
              f"batched / plain conv = {med['batched'] / med['plain conv']:.2f}x")


if __name__ == "__main__":
    main()
