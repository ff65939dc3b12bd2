"""scripts/gpu_smoke.sh runs on a machine without CUDA: every GPU check is reported SKIP, none FAIL, exit 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("amp-train-step", "nccl-1-process", "nccl-2-processes", "partial-fc", "onnxruntime-cuda", "ijb-extraction")


def test_gpu_smoke_script_reports_each_check_and_skips_without_cuda():
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_smoke.sh")], env=env, capture_output=True, text=True,
                       timeout=600)
    lines = r.stdout.splitlines()
    for name in CHECKS:
        line = next((x for x in lines if x.split()[1:2] == [name]), None)
        assert line is not None and line.startswith(("PASS", "SKIP")), (name, r.stdout)
    if not torch.cuda.is_available():
        assert sum(x.startswith("SKIP") for x in lines) == len(CHECKS), r.stdout
    assert r.returncode == 0 and "FAIL" not in r.stdout and lines[-1] == "gpu smoke: ok", r.stdout + r.stderr
