"""IJB-C-sized 1:1 scoring benchmark: facetool's pair scoring + TAR@FAR vs a straightforward chunked NumPy
implementation (insightface's: gather both templates' features per chunk of pairs, multiply, sum;
sklearn ``roc_curve`` on all scores; TPR at the closest FPR), measured in the same run.

The synthetic set has IJB-C's shape: 3,531 gallery and 19,557 probe templates (23,088 in all), each probe
compared with ~22.6 % of the gallery (15.6 M pairs, one genuine pair per probe), D = 512, float64
template features as insightface keeps them. Both sides must give identical TAR values.

    .venv/bin/python benchmarks/bench_ijb.py            # full size (~2 GB RAM)
    .venv/bin/python benchmarks/bench_ijb.py --scale 0.1
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import roc_curve

from facetool.eval.ijb import pair_scores
from facetool.eval.roc import FARS, tar_at_far, verification_tars


def synthetic_ijbc(scale: float, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_gal, n_probe = max(10, int(3531 * scale)), max(10, int(19557 * scale))
    p = 15_658_489 / (3531 * 19557)
    gal = rng.standard_normal((n_gal, dim))
    gal /= np.linalg.norm(gal, axis=1, keepdims=True)
    subj = rng.integers(0, n_gal, n_probe)
    alpha = rng.uniform(0.0, 0.4, n_probe)[:, None]  # per-probe quality: how much identity survives
    probe = alpha * gal[subj] + rng.standard_normal((n_probe, dim)) / np.sqrt(dim)
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    feats = np.concatenate([gal, probe])  # template rows: gallery first, then probes
    i1, i2, lab = [], [], []
    for c0 in range(0, n_probe, 1024):
        m = rng.random((min(1024, n_probe - c0), n_gal), dtype=np.float32) < p
        m[np.arange(len(m)), subj[c0: c0 + len(m)]] = True
        pr, g = np.nonzero(m)
        i1.append((n_gal + c0 + pr).astype(np.int32))
        i2.append(g.astype(np.int32))
        lab.append(g == subj[c0 + pr])
    return feats, np.concatenate(i1), np.concatenate(i2), np.concatenate(lab)


def baseline(feats, i1, i2, labels, chunk: int = 20_000):
    scores = np.empty(len(i1))
    for c0 in range(0, len(i1), chunk):
        f1, f2 = feats[i1[c0: c0 + chunk]], feats[i2[c0: c0 + chunk]]
        scores[c0: c0 + chunk] = np.sum(f1 * f2, -1)
    fpr, tpr, _ = roc_curve(labels, scores)
    return tar_at_far(fpr, tpr, FARS), scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of IJB-C's template counts")
    ap.add_argument("--dim", type=int, default=512)
    a = ap.parse_args()
    t = time.perf_counter()
    feats, i1, i2, labels = synthetic_ijbc(a.scale, a.dim)
    print(f"templates {len(feats):,}  pairs {len(i1):,}  genuine {int(labels.sum()):,}  D {a.dim}"
          f"  (generated in {time.perf_counter() - t:.1f} s)")

    t0 = time.perf_counter()
    ref_tars, ref_scores = baseline(feats, i1, i2, labels)
    t1 = time.perf_counter()
    scores = pair_scores(feats, i1, i2)
    t2 = time.perf_counter()
    tars, _, _ = verification_tars(labels, scores, FARS)
    t3 = time.perf_counter()

    print(f"{'FAR':>6} {'baseline TAR':>13} {'facetool TAR':>13} {'interp':>8}")
    for k in ref_tars:
        print(f"{k:>6} {ref_tars[k]['closest']:13.6f} {tars[k]['closest']:13.6f} {tars[k]['interp']:8.4f}")
    same = all(ref_tars[k]["closest"] == tars[k]["closest"] for k in ref_tars)
    print(f"identical TAR values: {same}   max |score difference|: {np.abs(scores - ref_scores).max():.2e}")
    base, ours = t1 - t0, t3 - t1
    print(f"baseline (chunked NumPy + sklearn roc_curve): {base:.2f} s")
    print(f"facetool (block matmul + ROC head):           {ours:.2f} s  (scoring {t2 - t1:.2f} s, TAR {t3 - t2:.2f} s)")
    print(f"speed-up: {base / ours:.1f}x")


if __name__ == "__main__":
    main()
