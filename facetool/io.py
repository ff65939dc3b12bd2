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

from facetool.errors import FacetoolError, clip_message


def partial_path(path: str | Path) -> Path:
    """The temporary name an output is written under until it is complete (used for resume)."""
    p = Path(path)
    return p.with_name(p.name + ".partial")


def check_output(path: str | Path, overwrite: bool) -> Path:
    """Deprecated alias of :func:`guard_output` (kept for callers on other branches)."""
    return guard_output(path, overwrite=overwrite)


#: Hidden file in an output's folder recording which files a command wrote there (so that rerunning the
#: same command may replace its own earlier result, and nothing else, without ``--overwrite``).
OUTPUTS_MANIFEST = ".facetool-outputs.json"

# resolved output path -> owner, set by guard_output(owner=...) and recorded once the file is written
_claims: dict[str, str] = {}

# what the running command has left on disk, in order: complete outputs (record_output) and partial work
# kept to be continued (note_kept); what an interrupted command reports (interruption_report)
_left: dict[str, str] = {}


def _manifest(folder: Path) -> dict:
    try:
        data = json.loads((folder / OUTPUTS_MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _signature(p: Path) -> dict:
    st = p.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_own_output(path: str | Path, owner: str) -> bool:
    """True when ``path`` was written by ``owner`` (a command + what identifies its result) and has not
    been changed since (same size and modification time as recorded)."""
    p = Path(path)
    entry = _manifest(p.parent).get(p.name)
    if not isinstance(entry, dict) or entry.get("owner") != owner or not p.is_file():
        return False
    return {k: entry.get(k) for k in ("size", "mtime_ns")} == _signature(p)


def record_output(path: str | Path) -> None:
    """Note that ``path`` was just written; if a guard claimed it with an owner, remember the owner.

    Called by :func:`atomic_path` and the store writer; harmless for paths nobody claimed.
    """
    p = Path(path)
    _left.setdefault(str(p), "complete")
    try:
        owner = _claims.pop(str(p.resolve()), None)
    except OSError:
        return
    if owner is None or not p.is_file():
        return
    folder = p.parent
    data = _manifest(folder)
    data = {k: v for k, v in data.items() if (folder / k).exists()}  # forget deleted files
    data[p.name] = {"owner": owner, **_signature(p)}
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{OUTPUTS_MANIFEST}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, folder / OUTPUTS_MANIFEST)
    except OSError:  # the record is a convenience: without it a rerun just needs --overwrite
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)


def release_claims() -> None:
    """Forget claims whose files were never written and what the last command left (called when a
    command starts and when it ends)."""
    _claims.clear()
    _left.clear()


def note_kept(path: str | Path) -> None:
    """Note that an interrupted writer kept its partial work in ``path`` (to be continued by a rerun)."""
    _left[str(path)] = "partial"


def interruption_report(resumable: bool) -> str:
    """What an interrupted command says, truthfully: the files it completed (every output is written
    whole or not at all) and the partial work it kept, or that nothing was written; ``resumable`` (the
    command has ``--resume``) adds how to continue."""
    if not _left:
        return "interrupted; nothing was written"
    names = [f"the partial {p}" if kind == "partial" else p for p, kind in _left.items()]
    text = "interrupted; kept " + ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    if resumable:
        return text + "; rerun the same command with --resume to continue"
    if "partial" in _left.values():
        return text + "; rerun the same command to continue"
    return text + " (complete files; nothing is half-written)"


def _existing_ancestor(p: Path) -> Path:
    q = p.parent if str(p.parent) else Path(".")
    while not q.exists() and q != q.parent:
        q = q.parent
    return q


#: file suffixes of a face store / feature cache (HDF5)
STORE_SUFFIXES = (".h5", ".hdf5")


def guard_output(
    path: str | Path,
    *,
    inputs: "tuple[str | Path | None, ...] | list[str | Path | None]" = (),
    overwrite: bool = False,
    option: str = "--out",
    is_dir: bool = False,
    owner: str | None = None,
    resumable: bool = False,
    suffix: "str | tuple[str, ...] | None" = None,
) -> Path:
    """THE check every command runs on each output path before it writes anything.

    * never an input of the same command, never an existing file inside an input folder (a dataset
      root), and a run folder (``resumable``) never holds an input (``--init``, a teacher): refused
      even with ``--overwrite``;
    * ``suffix``: the output's required file suffix(es) (``.h5`` for stores, ``.json`` for reports ...), so
      a typo cannot turn a checkpoint or an image into a store;
    * an existing file or non-empty folder is not replaced without ``--overwrite``, except a file this
      command wrote there earlier: with ``owner`` (the command and what identifies its result, e.g.
      ``"eval ijbc model=/abs/runs/a/model.pt"``) a file recorded with the same owner and unchanged since
      may be replaced by a rerun; stores, checkpoints and run folders pass no owner;
    * a folder output must not be a file and vice versa;
    * the folder it goes in must exist or be creatable (the nearest existing ancestor is a writable folder).

    Writes nothing (the writers create missing folders). Returns the path. ``option`` names the
    command-line option in the error messages; ``resumable`` adds "or --resume" to the advice.
    """
    p = Path(path)
    if str(p) in ("", "."):
        raise FacetoolError(f"{option} needs a path")
    for i in inputs:
        if i is None or str(i) == "":
            continue
        ip = Path(i)
        try:
            same = p.exists() and ip.exists() and os.path.samefile(p, ip)
        except OSError:
            same = False
        if same or p.resolve() == ip.resolve():
            raise FacetoolError(f"{option} {p} is also an input of this command; choose another output path")
        if ip.is_dir() and p.exists() and not p.is_dir() and ip.resolve() in p.resolve().parents:
            raise FacetoolError(f"{option} {p} is a file of the input folder {ip}; choose a path outside it")
        if is_dir and resumable and p.resolve() in ip.resolve().parents:  # a run folder replaces its files
            raise FacetoolError(f"{option} {p} holds the input {ip}; writing the run there would replace it: "
                                "choose another folder")
    if suffix is not None and not is_dir:
        allowed = (suffix,) if isinstance(suffix, str) else tuple(suffix)
        if p.suffix.lower() not in allowed:
            raise FacetoolError(f"{option} {p} must end in {' or '.join(allowed)}")
    if p.exists() or p.is_symlink():
        if is_dir and not p.is_dir():
            raise FacetoolError(f"{option} {p} is a file, not a folder; give a new or empty folder")
        if not is_dir and p.is_dir():
            raise FacetoolError(f"{option} {p} is a folder; give a file name")
        empty_dir = is_dir and p.is_dir() and not any(p.iterdir())
        own = owner is not None and not is_dir and is_own_output(p, owner)
        if not (overwrite or empty_dir or own):
            advice = "pass --resume to continue it or --overwrite to replace it" if resumable else \
                "pass --overwrite to replace it, or choose another path"
            what = "exists and was not written by this command" if owner is not None else "exists"
            raise FacetoolError(f"{option} {p} {what} ({advice})")
    anc = _existing_ancestor(p)
    if not anc.is_dir():
        raise FacetoolError(f"{option} {p}: cannot create a folder inside {anc}, which is a file")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise FacetoolError(f"{option} {p}: folder {anc} is not writable")
    if owner is not None and not is_dir:
        _claims[str(p.resolve())] = owner
    return p


def guard_run_folder(out: "str | Path | None", default_stem: str, *, inputs=(), overwrite: bool = False,
                     resume: bool = False, parent: str | Path = "runs") -> Path:
    """A training-style run folder: ``out``, or ``<parent>/<default_stem>-<n>`` (the next free n); guarded
    (a new or empty folder, or ``--overwrite``/``--resume``). Under ``torchrun`` every rank must name the
    same folder, so ``--out`` is required there and only rank 0 checks that it is free."""
    rank, world = launch_rank()
    distributed = world > 1
    if out is None:
        if resume:
            raise FacetoolError("--resume needs --out RUN_FOLDER (the run to continue)")
        if distributed:
            raise FacetoolError("under torchrun give --out RUN_FOLDER (every process must write the same run)")
        out = next_free_folder(parent, default_stem)
    return guard_output(out, inputs=inputs, overwrite=overwrite or resume or rank != 0, is_dir=True, resumable=True)


def launch_rank() -> tuple[int, int]:
    """``(rank, world size)`` that ``torchrun`` put in the environment (``(0, 1)`` outside it). Read before any
    process group exists (run folders are guarded first); :mod:`facetool.distributed` builds on it."""
    if "RANK" not in os.environ:
        return 0, 1
    return int(os.environ["RANK"]), max(1, int(os.environ.get("WORLD_SIZE", "1")))


def next_free_folder(parent: str | Path, stem: str) -> Path:
    """``parent/stem-1``, ``parent/stem-2``, ...: the first that does not exist (default run folders)."""
    base = Path(parent)
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in stem) or "run"
    n = 1
    while (base / f"{stem}-{n}").exists() or (base / f"{stem}-{n}").is_symlink():
        n += 1
    return base / f"{stem}-{n}"


def run_name(model: str | Path) -> str:
    """What eval outputs are named after: the checkpoint's folder + file stem
    (``runs/aig04/model.pt`` -> ``aig04_model``; a bare ``model.pt`` is named after the working folder)."""
    p = Path(model)
    folder = Path(os.path.abspath(p)).parent.name
    name = f"{folder}_{p.stem}" if folder else p.stem
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


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
        _claims.pop(str(p.resolve()), None)
        with contextlib.suppress(FileNotFoundError):
            tmp_p.unlink()
        raise
    record_output(p)


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


#: the first bytes of an HDF5 file (face stores, feature caches)
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def file_head(path: str | Path, n: int = 8) -> bytes:
    """The first ``n`` bytes of a file (what the format checks below look at)."""
    with open(path, "rb") as f:
        return f.read(n)


def is_hdf5_head(head: bytes) -> bool:
    return head.startswith(HDF5_SIGNATURE)


def is_torch_head(head: bytes) -> bool:
    """A torch file: the zip format or a legacy pickle."""
    return head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")


def torch_load(path: str | Path, what: str = "checkpoint") -> Any:
    """Load a torch file without executing code (``weights_only=True``); errors become one line."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise FacetoolError(f"{what} not found: {p}")
    head = file_head(p)
    if is_hdf5_head(head):
        raise FacetoolError(f"{what} {p} is an HDF5 file (a face store or feature cache), not a torch checkpoint")
    if not is_torch_head(head):
        raise FacetoolError(f"{what} {p} is not a torch checkpoint (nor an ONNX file: give those a .onnx suffix)")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise FacetoolError(f"{what} {p} " + _weights_only_reason(str(e))) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FacetoolError(f"{what} {p} is corrupt or not a torch file: {clip_message(first, 200)}") from None


def _weights_only_reason(message: str) -> str:
    """What torch's weights_only refusal means, in one clause (never its multi-paragraph advice): a
    pickle naming a global that exists is unsafe content; one naming a global that does not exist, or
    failing otherwise, is a damaged (e.g. truncated) file."""
    import importlib
    import re

    why = next((ln.strip() for ln in message.splitlines() if "WeightsUnpickler error:" in ln), "")
    why = why.split("WeightsUnpickler error:", 1)[-1].strip() or clip_message(message.strip().splitlines()[0], 200)
    m = re.search(r"GLOBAL ([\w.]+)", message)
    if m:
        module, _, attr = m.group(1).rpartition(".")
        try:
            exists = bool(module) and hasattr(importlib.import_module(module), attr)
        except Exception:  # noqa: BLE001 - an unknown module: not a real global either
            exists = False
        if exists:
            return (f"is not a plain weights file: it asks to run {m.group(1)} when unpickled, which facetool "
                    "refuses (only tensors, numbers, strings and containers load)")
    if "weights_only" in why:  # torch's advice, no reason given: keep none of it
        why = "its pickle does not read back"
        return f"is corrupt or truncated (its pickle names {m.group(1)!r}, which does not exist)"
    return f"is corrupt or truncated ({clip_message(why, 160)})"


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
        if str(e).startswith("refused global "):
            name = str(e).removeprefix("refused global ")
            raise FacetoolError(f"is not a plain data file: it asks to run {name} when unpickled, which facetool "
                                "refuses (only lists, tuples, bytes, numbers and strings load)") from None
        raise FacetoolError(f"is corrupt or truncated: {clip_message(str(e), 160)}") from None
    except (EOFError, ValueError, TypeError, IndexError, AttributeError, KeyError, MemoryError) as e:
        raise FacetoolError(f"is corrupt or truncated: {type(e).__name__}: {clip_message(str(e), 160)}") from None
