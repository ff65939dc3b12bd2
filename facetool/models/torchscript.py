"""The weights of a TorchScript archive (``torch.jit.save``'s zip, e.g. face-alignment's
``2DFAN4-cd938726ad.zip``) as a plain state_dict, **without loading the archive's code**.

A TorchScript archive is code plus tensors: ``torch.jit.load`` compiles and runs the program it holds,
which facetool never does with a user's file (as it never unpickles untrusted data). Here ``data.pkl`` is
read with an unpickler that allows only what the module tree needs -- placeholder objects for the
archive's ``__torch__.*`` classes (their attributes are kept, nothing of them runs), tensors rebuilt by
``torch._utils._rebuild_tensor_v2`` over storages read from ``data/<key>``, ``collections.OrderedDict`` --
and refuses every other global. The tree of modules is then flattened into dotted keys
(``m0.b1_4.conv1.weight``), the same names the module's ``state_dict()`` had; the architecture itself comes
from facetool's own model (the state-dict matchers), never from the archive.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from facetool.errors import FacetoolError

#: storage classes a tensor record may name -> their dtype
_STORAGES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stands in for an archive class (``__torch__.…``): holds the attributes the pickle sets, runs nothing."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state if isinstance(state, dict) else {}


class _Storage:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def is_torchscript_archive(path: str | Path) -> bool:
    """A zip holding ``<prefix>/data.pkl`` and ``<prefix>/constants.pkl``: what ``torch.jit.save`` writes
    (``torch.save`` archives have no ``constants.pkl``)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any(n.endswith("/data.pkl") for n in names)


class _ArchiveUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, torch.UntypedStorage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return _ScriptObject
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        if module == "torch" and name in _STORAGES:
            return _Storage(_STORAGES[name])
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)):
            raise pickle.UnpicklingError(f"unknown persistent record {str(pid)[:80]}")
        _, kind, key, _location, _numel = pid
        key = str(key)
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
            self.storages[key] = torch.frombuffer(raw, dtype=torch.uint8).untyped_storage() if raw \
                else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=self.storages[key], dtype=kind.dtype, _internal=True)


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor], depth: int = 0) -> None:
    if depth > 64:
        raise FacetoolError("its module tree is deeper than 64 levels")
    state = obj.__dict__.get("_state", obj.__dict__) if isinstance(obj, _ScriptObject) else {}
    for k, v in state.items():
        if not isinstance(k, str):
            continue
        if isinstance(v, torch.Tensor):
            out[prefix + k] = v.detach().clone()
        elif isinstance(v, _ScriptObject):
            _flatten(v, f"{prefix}{k}.", out, depth + 1)


def torchscript_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of the TorchScript archive ``path``, keyed as the scripted module's
    ``state_dict()`` (see the module docstring). A damaged archive or one needing other globals is a
    FacetoolError naming the file."""
    p = Path(path)
    try:
        with zipfile.ZipFile(p) as z:
            pkl = next(n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1)
            prefix = pkl.rsplit("/", 1)[0]
            root = _ArchiveUnpickler(z.read(pkl), z, prefix).load()
    except StopIteration:
        raise FacetoolError(f"TorchScript archive {p} has no data.pkl at its top level") from None
    except pickle.UnpicklingError as e:
        raise FacetoolError(f"TorchScript archive {p} is not plain weights: {e}; facetool reads only the tensors of "
                            "a scripted module and never runs an archive's code") from None
    except (zipfile.BadZipFile, KeyError, EOFError, OSError, ValueError, TypeError, RuntimeError,
            AttributeError, IndexError) as e:
        raise FacetoolError(f"TorchScript archive {p} is corrupt or truncated: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else ''}") from None
    if not isinstance(root, _ScriptObject):
        raise FacetoolError(f"TorchScript archive {p} does not hold a module")
    out: dict[str, torch.Tensor] = {}
    _flatten(root, "", out)
    if not out:
        raise FacetoolError(f"TorchScript archive {p} holds no tensors")
    return out
