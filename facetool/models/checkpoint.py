"""Checkpoints: a plain state_dict plus a small JSON-able config, in one torch file.

    {"format": "facetool-checkpoint", "version": 1, "config": {...}, "state_dict": {...},
     "meta": {...}}   # meta: JSON-able (training store, metrics, attribute masks, ...)

``config`` is ``model.config``: ``name`` and the constructor arguments, plus ``task`` (what a classifier
predicts, :mod:`facetool.tasks`; absent for identity models) -- the task's one stored copy, read back
by :func:`facetool.tasks.task_of`. Checkpoints of facetool 0.2.1 also carry it in ``meta["task"]``;
it is the same, and a checkpoint with only that copy gets it moved into the config on load.
See CONTRACTS.md "Checkpoints".

They load with ``torch.load(weights_only=True)`` in anyone's code. ``load_model`` also accepts
bare state_dicts of other projects (architecture inferred by the matchers in the registry,
:func:`facetool.models.registry.match_state_dict`, or named by the caller: ``--arch``) and ONNX files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from facetool.errors import FacetoolError
from facetool.io import file_head, torch_load, torch_save
from facetool.models.registry import STATE_DICT_MATCHERS, create_model, list_models, match_state_dict, model_family

FORMAT = "facetool-checkpoint"

__all__ = ["FORMAT", "MAX_INPUT_SIZE", "STATE_DICT_MATCHERS", "check_finite", "load_model", "load_state_dict_checked",
           "read_checkpoint", "save_checkpoint"]


def save_checkpoint(path: str | Path, model: torch.nn.Module, meta: dict | None = None) -> Path:
    model = getattr(model, "module", model)  # unwrap DDP
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return torch_save({"format": FORMAT, "version": 1, "config": dict(model.config), "state_dict": sd,
                       "meta": meta or {}}, path)


def load_state_dict_checked(model: torch.nn.Module, sd: dict, source: str) -> None:
    """Strict load; a mismatch names the missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)}≠{tuple(own[k].shape)}" for k in own
              if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def few(xs: list[str]) -> str:
            return ", ".join(xs[:4]) + (f" … ({len(xs)} in all)" if len(xs) > 4 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch: {few(shapes)}")
        name = getattr(model, "config", {}).get("name", type(model).__name__)
        raise FacetoolError(f"checkpoint {source} does not fit model {name}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


#: a recorded input size beyond this is damage, not a face model (the CLI trains at most 1024 px; a model
#: built at 100000 px would allocate ~100 GB before its weights are even compared)
MAX_INPUT_SIZE = 4096

#: integer constructor arguments a config may record, with the largest plausible value (a larger one is
#: damage: it would only allocate memory before the weights are compared with the state_dict)
SIZE_ARGUMENTS = {"input_size": MAX_INPUT_SIZE, "num_classes": 10_000_000, "width": 1024, "embedding_size": 65536,
                  "gate_hidden": 65536, "att_channels": 65536,
                  "num_landmarks": 1024}  # a FAN's heatmaps (68 / 98 / dense 468 in practice)


def _few(xs: list[str], n: int = 3) -> str:
    return ", ".join(xs[:n]) + (f" … ({len(xs)} in all)" if len(xs) > n else "")


def check_finite(sd: dict, source: str) -> None:
    """Refuse a state_dict holding NaN or infinite values (a diverged or damaged file): one line naming
    ``source`` and the tensors, instead of a NaN loss (or NaN scores) much later."""
    bad = [k for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise FacetoolError(f"{source} holds non-finite weights (NaN or inf) in {_few(bad)}: a diverged or "
                            "damaged file cannot be used")


def _check_state_dict(sd: Any, path: Path) -> None:
    if not isinstance(sd, dict) or not sd:
        raise FacetoolError(f"checkpoint {path} is damaged: its state_dict is "
                            + ("empty" if isinstance(sd, dict) else f"a {type(sd).__name__}, not a dict of tensors"))
    bad = [str(k) for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise FacetoolError(f"checkpoint {path} is damaged: its state_dict has entries that are not named tensors: "
                            f"{_few(bad)}")
    check_finite(sd, f"checkpoint {path}")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint in ``path``, validated: a facetool checkpoint has a dict ``config`` naming its
    architecture (a string ``name``), a non-empty ``state_dict`` of named, finite tensors and a dict (or
    no) ``meta``; a bare state_dict has finite tensors; a TorchScript archive gives its tensors as a bare
    state_dict (:mod:`facetool.models.torchscript`, its code never runs). Anything else is a one-line error naming the file
    and what is wrong in it."""
    p = Path(path)
    if p.is_file() and file_head(p).startswith(b"PK\x03\x04"):
        from facetool.models.torchscript import is_torchscript_archive, torchscript_state_dict

        if is_torchscript_archive(p):  # its tensors only, read without running its code
            sd = torchscript_state_dict(p)
            _check_state_dict(sd, p)
            return {"format": "torchscript", "state_dict": sd, "config": None, "meta": {}}
    obj = torch_load(p)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if "state_dict" not in obj:
            raise FacetoolError(f"checkpoint {p} is damaged: it has no state_dict (the weights)")
        _check_state_dict(obj["state_dict"], p)
        cfg = obj.get("config")
        if not isinstance(cfg, dict):
            what = "no config" if cfg is None else f"a config that is a {type(cfg).__name__}, not a JSON object"
            raise FacetoolError(f"checkpoint {p} is damaged: it has {what} (the config records the architecture and "
                                "its arguments)")
        if not isinstance(cfg.get("name"), str) or not cfg["name"]:
            raise FacetoolError(f"checkpoint {p} is damaged: its config has no architecture name ('name')")
        if obj.get("meta") is not None and not isinstance(obj["meta"], dict):
            raise FacetoolError(f"checkpoint {p} is damaged: its meta is a {type(obj['meta']).__name__}, not a "
                                "JSON object")
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        # state_dicts saved from a DDP-wrapped model carry a "module." prefix on every key
        if all(isinstance(k, str) and k.startswith("module.") for k in obj):
            obj = {k[len("module."):]: v for k, v in obj.items()}
        _check_state_dict(obj, p)
        return {"format": "state_dict", "state_dict": obj, "config": None, "meta": {}}
    raise FacetoolError(f"{path} is neither a facetool checkpoint nor a state_dict")


def _checked_config(cfg: dict, path: Path) -> None:
    """The recorded architecture is known and its size arguments are positive whole numbers in range:
    a damaged config is the file's fault, never an option the user did not type."""
    name = cfg["name"]
    try:
        model_family(name)
    except FacetoolError:
        raise FacetoolError(f"checkpoint {path} records an unknown architecture {name!r} in its config (written by "
                            f"another facetool version, or damaged); this facetool knows: "
                            f"{', '.join(list_models())}") from None
    for key, top in SIZE_ARGUMENTS.items():
        v = cfg.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
            raise FacetoolError(f"checkpoint {path} is damaged: its config has {key} {v!r} (a whole number from 1 to "
                                f"{top} is needed)")


def _as_config_words(message: str) -> str:
    """A model constructor's message about an option (``--input-size``) reworded for a config value
    (``input_size``): the user did not type that option."""
    import re

    message = re.sub(r"^\w+\(\) got an unexpected keyword argument", "an argument it does not take:", message)
    return re.sub(r"--([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"), message)


def load_model(path: str | Path, *, name: str | None = None, option: str = "--arch", **kwargs: Any):
    """Load a model from a facetool checkpoint, a foreign state_dict or (for embedding models)
    an ONNX file. Returns the model in eval mode; ``model.meta`` holds the checkpoint's meta.

    ``name`` is the architecture (a registered model name) of a file that does not record one: a bare
    state_dict no matcher recognises. For a facetool checkpoint it must agree with the recorded one.
    ``kwargs`` override the recorded / inferred constructor arguments. ``option`` is the command-line
    option that sets ``name``, for the error messages."""
    p = Path(path)
    if p.suffix.lower() == ".onnx":
        if name is not None:
            raise FacetoolError(f"{p} is an ONNX model; {option} applies only to PyTorch state_dicts")
        from facetool.models.onnx_model import OnnxModel

        return OnnxModel(p)
    ck = read_checkpoint(p)
    task = None
    recorded = ck["config"] is not None
    if recorded:
        cfg = dict(ck["config"])
        _checked_config(cfg, p)
        mname = cfg.pop("name")
        if name is not None and name != mname:
            raise FacetoolError(f"{p} is a facetool checkpoint of {mname}; {option} {name} contradicts it "
                                f"(leave {option} out)")
        task = cfg.pop("task", None)  # what the model predicts (facetool.tasks), not a constructor argument
        if task is not None:
            from facetool.tasks import Task

            try:
                Task.from_json(task, cfg.get("num_classes"))
            except FacetoolError as e:
                raise FacetoolError(f"checkpoint {p} is damaged: its config's task: {e}") from None
        cfg.update(kwargs)
    else:
        found = match_state_dict(ck["state_dict"], name)
        if found is None and name is None:
            raise FacetoolError(f"cannot tell the architecture of {p}: not a facetool checkpoint and no known "
                                f"state_dict layout matches; pass {option} NAME, one of: {', '.join(list_models())}")
        mname, inferred = found if found is not None else (name, {})
        cfg = {**inferred, **kwargs}
    if recorded and not kwargs:
        try:
            model = create_model(mname, **cfg)
        except (FacetoolError, TypeError, ValueError) as e:  # e.g. an argument this architecture does not take
            raise FacetoolError(f"checkpoint {p}: its config does not build {mname}: "
                                f"{_as_config_words(str(e))}") from None
    else:
        model = create_model(mname, **cfg)
    sd = ck["state_dict"]
    adapt = getattr(model, "adapt_state_dict", None)
    if callable(adapt):  # e.g. FAN: files without num_batches_tracked, the first stacks of a deeper FAN
        sd = adapt(sd)
    load_state_dict_checked(model, sd, str(p))
    model.meta = ck.get("meta") or {}
    task = task or model.meta.get("task")  # 0.2.1 wrote a second copy into the meta; only it may be there
    if task:
        model.config["task"] = task
    model.eval()
    return model
