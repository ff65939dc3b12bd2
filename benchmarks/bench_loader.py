"""Throughput of synthetic generation and of reading a face store for training.

Prints images/s for
  * rendering faces in-process (``render_face``, one thread) and writing a store (``prepare_synthetic``
    with 1 and 2 worker threads),
  * iterating ``FaceDataset`` through a ``DataLoader`` with 0 and 2 worker processes,
against a baseline measured in the same run: the whole image array read into RAM once and
normalised batch by batch (the upper bound for any loader). Ratios are loader / baseline.

    .venv/bin/python benchmarks/bench_loader.py --identities 20 --per-identity 40
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from facetool.data.dataset import FaceDataset, make_loader
from facetool.data.synthetic import make_identities, prepare_synthetic, render_face
from facetool.data.transforms import normalize
from facetool.store import FaceStore


def _rate(n: int, fn) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--identities", type=int, default=20)
    ap.add_argument("--per-identity", type=int, default=40)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2, help="loader passes to time (the first warms the workers)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = args.identities * args.per_identity
    rows: list[tuple[str, float, str]] = []

    people = make_identities(args.identities, 0)

    def render() -> None:
        for k in range(n):
            render_face(people[k % len(people)], np.random.default_rng(k), args.size)

    r_render = _rate(n, render)
    rows.append(("render_face (1 thread)", r_render, "1.00 (gen baseline)"))
    with tempfile.TemporaryDirectory() as d:
        store = Path(d) / "bench.h5"
        for w in (1, 2):
            r = _rate(n, lambda: prepare_synthetic(store, identities=args.identities, per_identity=args.per_identity,
                                                   size=args.size, workers=w, overwrite=True))
            rows.append((f"prepare_synthetic -> store (workers={w})", r, f"{r / r_render:.2f}"))

        with FaceStore(store) as s:
            idx = s.indices("all")

            def in_ram() -> None:
                with FaceStore(store) as s2:
                    arr = s2.images()
                for i in range(0, len(arr), args.batch_size):
                    normalize(arr[i : i + args.batch_size])

            r_ram = _rate(len(idx), in_ram)
        rows.append(("baseline: whole array in RAM", r_ram, "1.00 (read baseline)"))
        for workers in (0, 2):
            ds = FaceDataset(store, split="all")
            loader = make_loader(ds, args.batch_size, shuffle=True, workers=workers)
            rates = []
            for _ in range(args.epochs):
                rates.append(_rate(len(ds), lambda ld=loader: [b["image"] for b in ld]))
            r = max(rates[1:] or rates)
            rows.append((f"FaceDataset+DataLoader workers={workers}", r, f"{r / r_ram:.2f}"))
            del loader

    print(f"{n} images of {args.size}x{args.size}, batch {args.batch_size}")
    w = max(len(r[0]) for r in rows)
    print(f"{'what':<{w}}  {'images/s':>10}  ratio")
    for name, r, ratio in rows:
        print(f"{name:<{w}}  {r:>10.1f}  {ratio}")


if __name__ == "__main__":
    main()
