"""Relevance maps per second, all from one run: facetool's one-pass LRP (EpsilonPlusFlat) vs zennit's LRP
(its hooks, with its own ResNetCanonizer) vs a plain forward + backward to the input, on torchvision's
ResNet-18 (the network zennit's canonizer knows); then facetool's other methods on a facetool model
(LRP variants through ``explain``, Grad-CAM / Grad-CAM++ through pytorch-grad-cam), against the same
model's forward + backward.

Variants run interleaved round by round so that load from other processes hits them alike (medians
reported); ratios are times relative to forward+backward (and for LRP to zennit's). Each LRP call
attaches and detaches its canonizers and rules, as the command does. Run single-threaded:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_relevance.py              # ResNet-18, 112 px, batch 16
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_relevance.py --quick      # a few seconds
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch


def _timed(variants: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(rounds):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(t) for k, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=3, help="timed rounds (medians)")
    ap.add_argument("--arch", default="resnet18", help="facetool model for the method table (resnet18 | iresnet18 ...)")
    ap.add_argument("--width", type=int, default=16, help="its width")
    ap.add_argument("--skip-methods", action="store_true", help="only the LRP vs zennit table")
    ap.add_argument("--quick", action="store_true", help="64 px, batch 4, 2 rounds")
    a = ap.parse_args()
    if a.quick:
        a.size, a.batch, a.iters = 64, 4, 2

    import torchvision
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer

    from facetool.explainers.lrp import lrp

    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=100).eval()
    x = torch.randn(a.batch, 3, a.size, a.size)
    with torch.no_grad():
        cls = tv(x).argmax(1)
    onehot = torch.nn.functional.one_hot(cls, 100).float()

    def plain() -> None:
        xx = x.clone().requires_grad_(True)
        torch.autograd.grad(tv(xx), xx, onehot)

    def zennit_lrp() -> None:
        with Gradient(tv, EpsilonPlusFlat(canonizers=[ResNetCanonizer()])) as attributor:
            attributor(x, onehot)

    def facetool_lrp() -> None:
        lrp(tv, x, lambda out: onehot, "lrp")

    t = _timed({"forward+backward": plain, "zennit LRP": zennit_lrp, "facetool LRP": facetool_lrp}, a.iters)
    print(f"torchvision resnet18, {a.size}px, batch {a.batch}, EpsilonPlusFlat, {a.iters} rounds, "
          f"{torch.get_num_threads()} threads")
    print(f"{'variant':18s} {'s/batch':>8s} {'maps/s':>8s} {'vs fwd+bwd':>11s} {'vs zennit':>10s}")
    for k, v in t.items():
        print(f"{k:18s} {v:8.3f} {a.batch / v:8.1f} {v / t['forward+backward']:10.2f}x {v / t['zennit LRP']:9.2f}x")
    if a.skip_methods:
        return

    from facetool.explainers.relevance import Explained, explain
    from facetool.models import create_model

    emb = a.arch.startswith(("iresnet", "mobilefacenet"))
    kw = {"embedding_size": 128, "input_size": a.size} if emb else {"num_classes": 100, "input_size": a.size}
    if a.arch != "mobilefacenet":
        kw["width"] = a.width
    model = create_model(a.arch, **kw).eval()
    with torch.no_grad():
        out = model(x)
    what = Explained(refs=torch.randn_like(out)) if emb else Explained(classes=out.argmax(1))

    def model_plain() -> None:
        xx = x.clone().requires_grad_(True)
        torch.autograd.grad(what.lrp_output(model(xx)).sum(), xx)

    variants = {"forward+backward": model_plain}
    for m in ("lrp", "lrp-gamma", "lrp-ab", "gradcam", "gradcam++"):
        variants[m] = (lambda m=m: explain(model, x, m, what))
    t = _timed(variants, a.iters)
    print(f"\nfacetool {a.arch} width {a.width}, {a.size}px, batch {a.batch} (dissect relevance's explain)")
    print(f"{'variant':18s} {'maps/s':>8s} {'vs fwd+bwd':>11s}")
    for k, v in t.items():
        print(f"{k:18s} {a.batch / v:8.1f} {v / t['forward+backward']:10.2f}x")


if __name__ == "__main__":
    main()
