"""Speed and memory of `dissect units`: full HND dissection of one layer vs the forward pass alone,
and peak memory as the dictionary grows (it must stay flat: thresholds come from a fixed-size
streaming histogram, per-image maxima go to an on-disk scratch file).

    .venv/bin/python benchmarks/bench_dissect.py            # 64 px faces, 128 / 256 / 512 images (~1 min)
    .venv/bin/python benchmarks/bench_dissect.py --quick    # 64 / 128 images
    .venv/bin/python benchmarks/bench_dissect.py --sizes 500,2000,8000 --layer layer2 --width 64

Each store size runs in a fresh interpreter, so its peak resident memory (ru_maxrss) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(store: str, n: int, layer: str, width: int, batch: int) -> dict:
    import numpy as np
    import torch

    from facetool.data.transforms import normalize
    from facetool.explainers.units.dissect import dissect_units
    from facetool.explainers.units.dictionary import load_dictionary
    from facetool.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=2, input_size=64, width=width).eval()
    d = load_dictionary(store)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # forward alone over the same images (reading them from the store included)
    t = time.perf_counter()
    with torch.no_grad():
        for a in range(0, len(d), batch):
            model(normalize(d.store.images(np.arange(a, min(a + batch, len(d))))))
    fwd = time.perf_counter() - t
    t = time.perf_counter()
    res = dissect_units(model, d, [layer], batch_size=batch, device="cpu")
    full = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    d.close()
    return {"images": len(d), "forward_img_s": len(d) / fwd, "dissect_img_s": len(d) / full,
            "dissect_over_forward": full / fwd, "peak_rss_mb": peak / 1024, "rss_before_mb": base_rss / 1024,
            "units": res.layers[layer].shape[0], "pass1_s": res.timing["pass1_s"], "pass2_s": res.timing["pass2_s"],
            "pairing_s": res.timing["pairing_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128,256,512", help="dictionary sizes (images)")
    ap.add_argument("--quick", action="store_true", help="64 and 128 images")
    ap.add_argument("--layer", default="layer3")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), a.layer, a.width, a.batch)))
        return
    from facetool.data.synthetic import prepare_synthetic

    sizes = [64, 128] if a.quick else [int(x) for x in a.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            per = 8
            ids = max(1, n // per)
            store = Path(tmp) / f"d{n}.h5"
            prepare_synthetic(store, identities=ids, per_identity=per, size=64, seed=0,
                              bias="accessory=glasses,attribute=gender,value=male,p=0.5")
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
            r = subprocess.run([sys.executable, __file__, "--child", str(store), str(n), "--layer", a.layer,
                                "--width", str(a.width), "--batch", str(a.batch)], capture_output=True, text=True, env=env)
            if r.returncode != 0:
                sys.exit(r.stderr)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"resnet18 width {a.width}, layer {a.layer} ({rows[0]['units']} units), 64 px faces, CPU threads "
          f"{os.environ.get('OMP_NUM_THREADS', '2')}")
    print(f"{'images':>7} {'forward img/s':>14} {'dissect img/s':>14} {'dissect/forward':>16} {'peak RSS MB':>12} "
          f"{'peak vs first':>14}")
    for r in rows:
        print(f"{r['images']:>7} {r['forward_img_s']:>14.1f} {r['dissect_img_s']:>14.1f} {r['dissect_over_forward']:>16.2f} "
              f"{r['peak_rss_mb']:>12.1f} {r['peak_rss_mb'] / rows[0]['peak_rss_mb']:>14.3f}")
    print("dissection = 2 forward passes (thresholds, then IoU) + upsampling/IoU + pairing; "
          "'peak vs first' ~ 1.0 means memory does not grow with the dictionary")


if __name__ == "__main__":
    main()
