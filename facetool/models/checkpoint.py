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
from facetool.io import torch_load, torch_save
from facetool.models.registry import STATE_DICT_MATCHERS, create_model, list_models, match_state_dict

FORMAT = "facetool-checkpoint"

__all__ = ["FORMAT", "STATE_DICT_MATCHERS", "load_model", "load_state_dict_checked", "read_checkpoint",
           "save_checkpoint"]


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


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    obj = torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        # state_dicts saved from a DDP-wrapped model carry a "module." prefix on every key
        if all(k.startswith("module.") for k in obj):
            obj = {k[len("module."):]: v for k, v in obj.items()}
        return {"format": "state_dict", "state_dict": obj, "config": None, "meta": {}}
    raise FacetoolError(f"{path} is neither a facetool checkpoint nor a state_dict")


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
    if ck["config"] is not None:
        cfg = dict(ck["config"])
        mname = cfg.pop("name")
        if name is not None and name != mname:
            raise FacetoolError(f"{p} is a facetool checkpoint of {mname}; {option} {name} contradicts it "
                                f"(leave {option} out)")
        task = cfg.pop("task", None)  # what the model predicts (facetool.tasks), not a constructor argument
        cfg.update(kwargs)
    else:
        found = match_state_dict(ck["state_dict"], name)
        if found is None and name is None:
            raise FacetoolError(f"cannot tell the architecture of {p}: not a facetool checkpoint and no known "
                                f"state_dict layout matches; pass {option} NAME, one of: {', '.join(list_models())}")
        mname, inferred = found if found is not None else (name, {})
        cfg = {**inferred, **kwargs}
    model = create_model(mname, **cfg)
    load_state_dict_checked(model, ck["state_dict"], str(p))
    model.meta = ck.get("meta") or {}
    task = task or model.meta.get("task")  # 0.2.1 wrote a second copy into the meta; only it may be there
    if task:
        model.config["task"] = task
    model.eval()
    return model
