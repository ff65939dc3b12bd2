"""Loader throughput from a RecordIO pack (JPEG payloads decoded in the loader workers) vs the same images
read from a face store (uint8 HDF5 rows), with 0, 1 and 2 DataLoader workers.

A synthetic store is made, its images are written to a pack as insightface packs them (JPEG, record 0 with
identity ranges), and both are read through ``facetool.data.open_dataset`` + ``make_loader`` (the training
path). All timings come from this run, the variants interleaved round by round so that load from other
processes hits them alike; medians of images/s, and ratios pack / store at the same worker count.

    .venv/bin/python benchmarks/bench_rec.py                       # 16 x 25 images, 112 px
    .venv/bin/python benchmarks/bench_rec.py --identities 50 --per-identity 40 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def write_pack_from_store(store: Path, rec: Path, quality: int = 95) -> Path:
    """The store's images as a pack laid out like MS1MV3's: images at keys 1..N (JPEG), record 0, identity records."""
    import cv2
    import numpy as np

    from facetool.data.recordio import IRHeader, pack, write_rec
    from facetool.store import FaceStore

    with FaceStore(store) as s:
        order = np.argsort(s.labels, kind="stable")
        labels, images, m, size = s.labels[order], s.images(order.tolist()), s.num_classes, s.image_size

    def records():
        n = len(labels)
        yield 0, pack(IRHeader(2, (n + 1, n + 1 + m)))
        for k in range(n):
            ok, jpg = cv2.imencode(".jpg", images[k][:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
            yield k + 1, pack(IRHeader(0, float(labels[k]), k + 1), jpg.tobytes())
        counts = np.bincount(labels, minlength=m)
        starts = 1 + np.concatenate([[0], np.cumsum(counts)[:-1]])
        for i in range(m):
            yield n + 1 + i, pack(IRHeader(2, (int(starts[i]), int(starts[i] + counts[i]))))

    return write_rec(rec, records(), num_classes=m, image_size=size)


def _epoch(ds, workers: int, batch: int) -> float:
    from facetool.data import make_loader

    loader = make_loader(ds, batch, workers=workers)
    t0 = time.perf_counter()
    n = sum(len(b["label"]) for b in loader)
    dt = time.perf_counter() - t0
    del loader  # persistent workers end here
    return n / dt


def main(argv: list[str] | None = None) -> dict:
    import torch

    from facetool.data import open_dataset
    from facetool.data.synthetic import prepare_synthetic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--identities", type=int, default=16)
    ap.add_argument("--per-identity", type=int, default=25)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", default="0,1,2")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    workers = [int(w) for w in a.workers.split(",")]
    with tempfile.TemporaryDirectory() as d:
        store = Path(d) / "faces.h5"
        prepare_synthetic(store, identities=a.identities, per_identity=a.per_identity, size=a.size, seed=0)
        rec = write_pack_from_store(store, Path(d) / "train.rec")
        sources = {"store": open_dataset(store, None), "rec": open_dataset(rec, None)}
        n = len(sources["store"])
        rates: dict[tuple[str, int], list[float]] = {(s, w): [] for s in sources for w in workers}
        for _ in range(a.rounds):
            for w in workers:
                for s, ds in sources.items():
                    rates[(s, w)].append(_epoch(ds, w, a.batch))
        print(f"{n} images {a.size}x{a.size}, batch {a.batch}, {a.rounds} rounds (median images/s); "
              f"pack {rec.stat().st_size / 2**20:.1f} MiB JPEG, store {store.stat().st_size / 2**20:.1f} MiB")
        print(f"{'workers':>7} {'store img/s':>12} {'rec img/s':>10} {'rec/store':>10} {'rec/rec@0':>10}")
        out = {}
        base = statistics.median(rates[("rec", workers[0])])
        for w in workers:
            st, rc = statistics.median(rates[("store", w)]), statistics.median(rates[("rec", w)])
            out[w] = {"store": st, "rec": rc, "ratio": rc / st}
            print(f"{w:>7} {st:>12.0f} {rc:>10.0f} {rc / st:>10.2f} {rc / base:>10.2f}")
    return out


if __name__ == "__main__":
    main()
