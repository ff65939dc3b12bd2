"""Inference throughput of an exported ONNX backbone (ONNX Runtime) against the same PyTorch model.

Builds the backbone, exports it with :func:`facetool.export.export_onnx` into a temporary folder and
prints images/s of PyTorch (eval, no_grad) — the baseline, measured in the same run — and of ONNX
Runtime on the same inputs, their ratio, and the largest difference of the normalised embeddings.

    .venv/bin/python benchmarks/bench_export.py --network iresnet50 --batch-size 16 --batches 5
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from facetool.export import export_onnx
from facetool.models import create_model
from facetool.models.onnx_model import OnnxModel


def _rate(fn, x: torch.Tensor, batches: int) -> float:
    fn(x)  # warm-up
    t = time.perf_counter()
    for _ in range(batches):
        fn(x)
    return batches * len(x) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--network", default="iresnet50")
    ap.add_argument("--width", type=int, default=64, help="IR-ResNet base width")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kw = {"width": args.width} if args.network.startswith("iresnet") and args.width != 64 else {}
    model = create_model(args.network, **kw)
    x = torch.rand(args.batch_size, 3, 112, 112) * 2 - 1
    with torch.no_grad():  # realistic BatchNorm statistics (at init, eval-mode activations reach ~1e26)
        model.train()(x)
    model.eval()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "model.onnx"
        t = time.perf_counter()
        report = export_onnx(model, out, dynamic_batch=True)
        export_s = time.perf_counter() - t
        ort = OnnxModel(out, providers=["CPUExecutionProvider"])
        with torch.no_grad():
            torch_rate = _rate(model, x, args.batches)
        ort_rate = _rate(ort, x, args.batches)
        with torch.no_grad():
            diff = (torch.nn.functional.normalize(ort(x)) - torch.nn.functional.normalize(model(x))).abs().max()
    print(f"{args.network} (width {args.width}), batch {args.batch_size}, {args.threads} thread(s), CPU")
    print(f"  export + verification      {export_s:8.1f} s")
    print(f"  PyTorch (baseline)         {torch_rate:8.1f} img/s")
    print(f"  ONNX Runtime               {ort_rate:8.1f} img/s   ratio {ort_rate / torch_rate:.2f}x")
    print(f"  max |normalised emb diff|  {float(diff):.2e} (export check {report['max_abs_diff_normalised']:.2e})")


if __name__ == "__main__":
    main()
