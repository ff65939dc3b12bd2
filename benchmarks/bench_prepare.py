"""Prepare throughput: IMDb-Face bbox vs detection+alignment mode, workers 1 vs 2, and batched vs
one-by-one RetinaFace detection. Every ratio is against a baseline measured in the same run.

    .venv/bin/python benchmarks/bench_prepare.py [--images 120] [--batch 16]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from facetool.data.imdbface import prepare_imdbface
from facetool.detect import RetinaFace, read_rgb


def make_dataset(root: Path, n: int) -> None:
    """n JPEGs (about 480x400) cut around the six faces of insightface's t1.jpg, in IMDb-Face format."""
    spec = importlib.util.find_spec("insightface")
    t1 = read_rgb(Path(spec.origin).parent / "data" / "images" / "t1.jpg")
    boxes = RetinaFace().detect(t1).boxes
    (root / "nm0000001").mkdir(parents=True)
    rows = ["name,index,image,rect,height width,url"]
    rng = np.random.default_rng(0)
    H, W = t1.shape[:2]
    for i in range(n):
        b = boxes[i % len(boxes)]
        cx, cy = (b[0] + b[2]) / 2 + rng.uniform(-20, 20), (b[1] + b[3]) / 2 + rng.uniform(-20, 20)
        x0, y0 = int(np.clip(cx - 240, 0, W - 480)), int(np.clip(cy - 200, 0, H - 400))
        img = t1[y0 : y0 + 400, x0 : x0 + 480]
        cv2.imwrite(str(root / "nm0000001" / f"{i}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        fx, fy, r = cx - x0, cy - y0, 70
        rows.append(f"Bench,nm0000001,{i}.jpg,{fx - r:.1f} {fy - r:.1f} {fx + r:.1f} {fy + r:.1f},400 480,u")
    (root / "IMDb-Face.csv").write_text("\n".join(rows) + "\n")


def time_prepare(root: Path, out: Path, n: int, align: str, workers: int) -> float:
    t = time.perf_counter()
    _, rep = prepare_imdbface(None, root, out, min_images=1, per_identity=None, align=align, workers=workers,
                              test_fraction=0.0, overwrite=True)
    dt = time.perf_counter() - t
    assert rep["images"] == n, rep
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "imdb"
        make_dataset(root, a.images)
        rows = []
        for align in ("bbox", "retinaface"):
            time_prepare(root, Path(d) / "warm.h5", a.images, align, 1)  # warm-up (imports, ONNX session)
            r1 = time_prepare(root, Path(d) / "w1.h5", a.images, align, 1)
            r2 = time_prepare(root, Path(d) / "w2.h5", a.images, align, 2)
            rows.append((f"imdb-face {align}", r1, r2, r2 / r1))
        print(f"{'prepare mode':<24}{'w=1 img/s':>12}{'w=2 img/s':>12}{'w2/w1':>8}")
        for name, r1, r2, ratio in rows:
            print(f"{name:<24}{r1:>12.1f}{r2:>12.1f}{ratio:>8.2f}")
        print(f"detection+alignment costs {rows[0][1] / rows[1][1]:.1f}x the bbox crop (workers=1)")

        imgs = [read_rgb(p) for p in sorted((root / "nm0000001").glob("*.jpg"))[: 4 * a.batch]]
        det = RetinaFace(input_size=480)
        det.detect_batch(imgs[: a.batch])  # warm-up
        t = time.perf_counter()
        one = [det.detect(im) for im in imgs]
        t_one = time.perf_counter() - t
        t = time.perf_counter()
        batched = [r for i in range(0, len(imgs), a.batch) for r in det.detect_batch(imgs[i : i + a.batch])]
        t_batch = time.perf_counter() - t
        assert [len(x) for x in one] == [len(x) for x in batched]
        print(f"detection 480x400, {len(imgs)} images: one-by-one {len(imgs) / t_one:.1f} img/s, "
              f"batch {a.batch} {len(imgs) / t_batch:.1f} img/s, ratio {t_one / t_batch:.2f}x")


if __name__ == "__main__":
    main()
