"""The set-up installs from the lock: requirements.lock pins every dependency with hashes, holds exactly one
ONNX Runtime and one OpenCV, and the running environment matches it."""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    text = (ROOT / "requirements.lock").read_text()
    pins = dict((_norm(m[1]), m[2]) for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", text, re.M))
    assert pins, "requirements.lock has no pins"
    # every pin carries at least one hash (uv pip sync --require-hashes)
    blocks = re.split(r"^(?=[A-Za-z0-9_.\-]+==)", text, flags=re.M)
    for b in blocks:
        if re.match(r"[A-Za-z0-9_.\-]+==", b):
            assert "--hash=sha256:" in b, f"unhashed pin: {b.splitlines()[0]}"
    return pins


def test_lock_pins_every_declared_dependency_once():
    pins = _pins()
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = meta["dependencies"] + meta["optional-dependencies"]["dev"]
    extra = [ln for ln in (ROOT / "scripts/requirements.in").read_text().splitlines() if ln and not ln.startswith("#")]
    for req in declared + extra:
        name = _norm(re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0])
        assert name in pins, f"{name} is declared but not pinned in requirements.lock (run scripts/lock.sh)"
    assert [n for n in pins if n.startswith("onnxruntime")] == ["onnxruntime-gpu"]
    assert [n for n in pins if n.startswith("opencv")] == ["opencv-python-headless"]


def test_environment_matches_the_lock():
    pins = _pins()
    installed = {_norm(d.metadata["Name"]): d.version for d in md.distributions()}
    wrong = {n: (v, installed.get(n)) for n, v in pins.items() if installed.get(n, "").split("+")[0] != v.split("+")[0]}
    assert not wrong, f"environment differs from requirements.lock (run scripts/setup.sh): {wrong}"
    assert not [n for n in installed if n == "onnxruntime" or n == "opencv-python"], "a second ONNX Runtime/OpenCV is installed"
