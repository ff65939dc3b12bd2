"""Atomic file output and safe loading of untrusted files."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Iterator

from facetool.errors import FacetoolError


def partial_path(path: str | Path) -> Path:
    """The temporary name an output is written under until it is complete (used for resume)."""
    p = Path(path)
    return p.with_name(p.name + ".partial")


def check_output(path: str | Path, overwrite: bool) -> Path:
    """Refuse to clobber an existing output unless asked; make sure its folder is writable."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise FacetoolError(f"output exists: {p} (pass --overwrite to replace it)")
    parent = p.parent if str(p.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FacetoolError(f"cannot create output folder {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise FacetoolError(f"output folder is not writable: {parent}")
    return p


def guard_output(
    path: str | Path,
    *,
    inputs: "tuple[str | Path | None, ...] | list[str | Path | None]" = (),
    overwrite: bool = False,
    option: str = "--out",
    is_dir: bool = False,
) -> Path:
    """THE check every command runs on each output path before it writes anything.

    * never an input of the same command (refused even with ``--overwrite``);
    * an existing file/folder is not replaced without ``--overwrite``;
    * the parent folder is created and must be writable; a folder output must not be a file and vice versa.

    Returns the path. ``option`` names the command-line option in the error message.
    """
    p = Path(path)
    for i in inputs:
        if i is None:
            continue
        ip = Path(i)
        try:
            same = p.exists() and ip.exists() and os.path.samefile(p, ip)
        except OSError:
            same = False
        if same or p.resolve() == ip.resolve():
            raise FacetoolError(f"{option} {p} is also an input of this command; choose another output path")
    if p.exists():
        if is_dir and not p.is_dir():
            raise FacetoolError(f"{option} {p} is a file, not a folder")
        if not is_dir and p.is_dir():
            raise FacetoolError(f"{option} {p} is a folder; give a file name")
        if not overwrite:
            raise FacetoolError(f"{option} {p} exists (pass --overwrite to replace it)")
    parent = p.parent if str(p.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FacetoolError(f"{option}: cannot create folder {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise FacetoolError(f"{option}: folder is not writable: {parent}")
    return p


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    tmp_p = Path(tmp)
    try:
        yield tmp_p
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_p, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual permissions
        os.replace(tmp_p, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_p.unlink()
        raise


def write_json(path: str | Path, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in blocks (provenance records, feature-cache keys)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def torch_load(path: str | Path, what: str = "checkpoint") -> Any:
    """Load a torch file without executing code (``weights_only=True``); errors become one line."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise FacetoolError(f"{what} not found: {p}")
    with open(p, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x89HDF"):
        raise FacetoolError(f"{what} {p} is an HDF5 file (a face store or feature cache), not a torch checkpoint")
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):  # zip format or legacy pickle
        raise FacetoolError(f"{what} {p} is not a torch checkpoint (nor an ONNX file: give those a .onnx suffix)")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # torch's message is long; the line naming the refused global is the useful one
        why = next((ln for ln in lines if "Unsupported global" in ln or "GLOBAL" in ln), lines[0] if lines else "unsafe content")
        raise FacetoolError(f"{what} {p} is not a plain weights file (refused to unpickle: {why[:160]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FacetoolError(f"{what} {p} is corrupt or not a torch file: {first[:160]}") from None


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for data files (e.g. insightface ``.bin`` packs) that allows no globals but
    plain builtins containers; anything that could execute code is refused."""

    ALLOWED = {
        ("builtins", "list"),
        ("builtins", "tuple"),
        ("builtins", "dict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytearray"),
        ("__builtin__", "list"),
        ("__builtin__", "tuple"),
        ("__builtin__", "set"),
        ("__builtin__", "bytearray"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def restricted_loads(data: bytes, encoding: str = "bytes") -> Any:
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
    except pickle.UnpicklingError as e:
        raise FacetoolError(f"refused to load pickle: {e}") from None
    except (EOFError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise FacetoolError(f"corrupt pickle: {type(e).__name__}: {e}") from None
