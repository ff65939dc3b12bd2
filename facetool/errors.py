"""One error type for everything a user can cause: the CLI prints its message on one line."""

from __future__ import annotations

from pathlib import Path


class FacetoolError(Exception):
    """A user-facing error. The message must be one line and say what to do."""

    exit_code = 2


class NonFiniteLossError(FacetoolError):
    """Raised by the training engine when a loss term becomes NaN or infinite."""


def clip_message(text: object, limit: int = 300) -> str:
    """A foreign library's message on one line, at most ``limit`` characters, cut at a sentence or word
    boundary (marked with ``...``), never mid-word."""
    msg = " ".join(str(text).split())
    if len(msg) <= limit:
        return msg
    head = msg[:limit]
    end = head.rfind(". ")
    return head[: end + 1] + " ..." if end > limit // 2 else head.rsplit(" ", 1)[0] + " ..."


def require_file(path: str | Path, what: str = "file") -> Path:
    p = Path(path)
    if not p.exists():
        raise FacetoolError(f"{what} not found: {p}")
    if not p.is_file():
        raise FacetoolError(f"{what} is not a file: {p}")
    return p


def require_dir(path: str | Path, what: str = "folder") -> Path:
    p = Path(path)
    if not p.exists():
        raise FacetoolError(f"{what} not found: {p}")
    if not p.is_dir():
        raise FacetoolError(f"{what} is not a folder: {p}")
    return p
