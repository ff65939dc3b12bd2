"""Inversion speed: facetool.explainers.invert vs the same loop written plainly in PyTorch.

Both run the same maths on the same model and batch (identity cosine loss, BN-statistics prior with
the first layer x10, 4-direction TV-l2, l2 prior, roll jitter + flip, Adam with cosine decay,
pixel clipping). The plain loop hard-codes everything in one function; the library adds the prior
objects, the loss history, NaN checks and the resume machinery. Prints iterations/s of each and
the overhead ratio, measured in the same run (interleaved repeats, best of each).

    .venv/bin/python benchmarks/bench_invert.py [--model iresnet18 --width 16 --batch 8 --iters 20]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from facetool.explainers.invert import InversionConfig, invert
from facetool.models import create_model


def plain_loop(model: nn.Module, t: torch.Tensor, iters: int, size: int, cfg: InversionConfig) -> torch.Tensor:
    gen = torch.Generator().manual_seed(cfg.seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    stats: list[torch.Tensor] = []

    def hook(mod, inp, out):
        x = inp[0]
        stats.append(torch.norm(x.mean((0, 2, 3)) - mod.running_mean) + torch.norm(x.var((0, 2, 3), unbiased=False) - mod.running_var))

    handles = [b.register_forward_hook(hook) for b in bns]
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(len(t), 3, size, size, generator=gen).clamp(-1, 1).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    jit = int(round(cfg.jitter * size / 112))
    for k in range(iters):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * k / iters))
        dy, dx = torch.randint(-jit, jit + 1, (2,), generator=gen).tolist()
        xj = torch.roll(x, (dy, dx), (2, 3))
        if torch.rand((), generator=gen) < 0.5:
            xj = xj.flip(3)
        stats.clear()
        out = model(xj)
        l_id = (1 - F.cosine_similarity(out, t, dim=1)).mean()
        l_bn = cfg.first_bn_mult * stats[0] + sum(stats[1:])
        d = [x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :],
             x[..., 1:, 1:] - x[..., :-1, :-1], x[..., 1:, :-1] - x[..., :-1, 1:]]
        l_tv = sum(v.flatten(1).norm(dim=1).mean() for v in d)
        l_l2 = x.flatten(1).norm(dim=1).mean()
        loss = cfg.w_id * l_id + cfg.w_bn * l_bn + cfg.w_tv_l2 * l_tv + cfg.w_l2 * l_l2
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(-1, 1)
    for h in handles:
        h.remove()
    for p in model.parameters():
        p.requires_grad_(True)
    return x.detach()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="iresnet18")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model, width=args.width, input_size=args.size)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, args.size, args.size))
    model.eval()
    t = model(torch.rand(args.batch, 3, args.size, args.size) * 2 - 1).detach()
    cfg = InversionConfig(iterations=args.iters, size=args.size, batch=args.batch, save_every=0)
    plain_loop(model, t, 2, args.size, cfg)  # warm-up (first Adam import, allocator)
    invert(model, t, InversionConfig(iterations=2, size=args.size, save_every=0))
    best = {"plain": math.inf, "facetool": math.inf}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        plain_loop(model, t, args.iters, args.size, cfg)
        best["plain"] = min(best["plain"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        invert(model, t, cfg)
        best["facetool"] = min(best["facetool"], time.perf_counter() - t0)
    ips = {k: args.iters / v for k, v in best.items()}
    print(f"model {args.model} width {args.width}, batch {args.batch} at {args.size} px, {args.iters} iterations, "
          f"{args.threads} threads, best of {args.repeats}")
    print(f"  plain PyTorch loop : {ips['plain']:.2f} it/s")
    print(f"  facetool invert    : {ips['facetool']:.2f} it/s")
    print(f"  overhead (plain/facetool time ratio): {best['facetool'] / best['plain']:.3f}x")


if __name__ == "__main__":
    main()
