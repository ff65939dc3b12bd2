#!/usr/bin/env bash
# Idempotent set-up of facetool into ./.venv (CPU or GPU machine), installed from requirements.lock:
# every package pinned with hashes (refresh deliberately with scripts/lock.sh). The lock holds a matched
# torch + torchvision pair from PyPI and exactly one ONNX Runtime distribution (onnxruntime-gpu, which
# falls back to the CPU provider without CUDA); `uv pip sync` removes anything the lock does not name.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FACETOOL_VENV:-.venv}
UV_VERSION=$(sed -n 's/^uv==\([^ ]*\).*/\1/p' requirements.lock)
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if [ "$("$VENV/bin/uv" --version 2>/dev/null | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
fi
# uv ignores pip's find-links folder, whose CPU torch wheel would not match torchvision.
# --compile-bytecode: fresh interpreters (the CLI, subprocess tests) then start without recompiling
# torch, also where PYTHONDONTWRITEBYTECODE is set.
"$VENV/bin/uv" pip sync -q --python "$VENV/bin/python" --require-hashes --compile-bytecode requirements.lock
"$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --no-deps --no-build-isolation -e .
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch, torchvision, onnxruntime  # noqa: F401
from torchvision.ops import nms  # fails when torch and torchvision do not match
dists = {d.metadata["Name"].lower() for d in md.distributions()}
ort = sorted(d for d in dists if d.startswith("onnxruntime"))
assert ort == ["onnxruntime-gpu"], f"expected exactly one ONNX Runtime (onnxruntime-gpu), found {ort}"
print(f"facetool env ok: torch {torch.__version__}, torchvision {torchvision.__version__}, onnxruntime {onnxruntime.__version__}")
PY
