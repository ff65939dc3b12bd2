"""THE check of ``--device`` strings, shared by every command that takes one."""

from __future__ import annotations

import torch

from facetool.errors import FacetoolError


def resolve_device(device: str | torch.device | None = "auto", option: str = "--device") -> str:
    """THE check of a device string, before any work: ``auto`` (cuda when available, else cpu),
    ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. An unknown or absent device is a one-line user error."""
    spec = "auto" if device is None else str(device).strip().lower()
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    allowed = "auto, cpu, cuda, cuda:N (N = GPU index) or mps"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise FacetoolError(f"{option} {device!r} is not a device; use {allowed}") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise FacetoolError(f"{option} {device}: no CUDA GPU is available on this machine; use {option} cpu")
        if dev.index is not None and dev.index >= n:
            raise FacetoolError(f"{option} {device}: this machine has {n} CUDA GPU(s) (cuda:0..cuda:{n - 1})")
        return str(dev)
    if dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise FacetoolError(f"{option} {device}: MPS is not available on this machine; use {option} cpu")
        return "mps"
    raise FacetoolError(f"{option} {device!r} is not supported; use {allowed}")
