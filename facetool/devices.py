"""THE check of ``--device`` strings, shared by every command that takes one."""

from __future__ import annotations

import torch

from facetool.errors import FacetoolError


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def allowed_devices() -> str:
    """What ``--device`` accepts on this machine, for messages and help: ``auto, cpu`` plus ``cuda,
    cuda:0..cuda:N-1`` where CUDA GPUs are present and ``mps`` where Apple's GPU is."""
    n = _cuda_count()
    names = ["auto", "cpu"]
    if n:
        names += ["cuda", "cuda:0" if n == 1 else f"cuda:0..cuda:{n - 1}"]
    if _mps():
        names.append("mps")
    return ", ".join(names) + ("" if n else " (no CUDA device here)")


def resolve_device(device: str | torch.device | None = "auto", option: str = "--device") -> str:
    """THE check of a device string, before any work: ``auto`` (cuda when available, else cpu),
    ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. An unknown or absent device is a one-line user error that
    names what this machine allows."""
    spec = "auto" if device is None else str(device).strip().lower()
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise FacetoolError(f"{option} {device!r} is not a device; use {allowed_devices()}") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type == "cuda":
        n = _cuda_count()
        if n == 0:
            raise FacetoolError(f"{option} {device}: no CUDA device here; use {option} cpu (or auto)")
        if dev.index is not None and dev.index >= n:
            raise FacetoolError(f"{option} {device}: this machine has {n} CUDA device(s); use {allowed_devices()}")
        return str(dev)
    if dev.type == "mps":
        if not _mps():
            raise FacetoolError(f"{option} {device}: MPS is not available here; use {allowed_devices()}")
        return "mps"
    raise FacetoolError(f"{option} {device!r} is not supported; use {allowed_devices()}")
