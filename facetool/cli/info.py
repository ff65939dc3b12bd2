"""`facetool info PATH`: what a face store, checkpoint or recipe holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from facetool.cli.common import arch_option, console, dict_table, guarded
from facetool.errors import require_file


def register(app: typer.Typer) -> None:
    @app.command("info")
    @guarded
    def info(
        path: Path = typer.Argument(..., help="A face store (.h5), a checkpoint (.pt/.pth) or an ONNX model."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
        arch: Optional[str] = arch_option(of="PATH"),
    ) -> None:
        """Show what a face store or a model file holds."""
        require_file(path)
        if path.suffix.lower() in (".h5", ".hdf5"):
            from facetool.store import FaceStore

            with FaceStore(path) as s:
                summary = s.summary()
            if as_json:
                typer.echo(json.dumps(summary, indent=2))
                return
            attrs = summary.pop("attributes")
            landmark_sets = summary.pop("landmark_sets", {})
            console.print(dict_table(f"face store {path.name}", {k: v for k, v in summary.items()}))
            if landmark_sets:
                rows = {conv: f"{d['points']} points, {100 * d['visible']:.1f}% visible"
                        for conv, d in landmark_sets.items()}
                console.print(dict_table("landmark sets (besides the 5 alignment points)", rows, "convention",
                                         "landmarks"))
            for name, counts in attrs.items():
                console.print(dict_table(f"attribute {name}", counts, "value", "images"))
            return
        from facetool.models import load_model

        if path.suffix.lower() in (".pt", ".pth"):
            heads = _heads_file(path)
            if heads is not None:  # a heads.pt facetool wrote (train arcface, distill): module -> state_dict
                rows = [(f"{name}.{k}", "x".join(map(str, v.shape)) + f" {str(v.dtype).replace('torch.', '')}")
                        for name, sd in heads.items() for k, v in sd.items()]
                if as_json:
                    typer.echo(json.dumps({"heads": {n: {k: list(v.shape) for k, v in sd.items()}
                                                     for n, sd in heads.items()}}, indent=2))
                else:
                    console.print(dict_table(f"heads file {path.name}: {', '.join(heads)} (method modules, "
                                             "not a model)", rows, "tensor", "shape"))
                return
        model = load_model(path, name=arch)
        if path.suffix.lower() == ".onnx":
            n_params = _onnx_parameters(path)
        else:
            n_params = sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else 0
        meta = getattr(model, "meta", {}) or {}
        rows = {"model": getattr(model, "name", type(model).__name__), "output": _output_kind(model),
                "parameters (M)": round(n_params / 1e6, 3),
                "config": json.dumps(getattr(model, "config", {}), default=str)}
        for k in ("method", "epochs_done", "metrics"):
            if k in meta:
                rows[f"meta.{k}"] = json.dumps(meta[k], default=str) if isinstance(meta[k], (dict, list)) else meta[k]
        if as_json:
            typer.echo(json.dumps(rows | {"meta": meta}, indent=2, default=str))
        else:
            console.print(dict_table(f"model {path.name}", rows))


def _output_kind(model) -> str:
    """classification | embedding: what the model returns (``model.output_kind``, CONTRACTS.md "Models")."""
    return str(getattr(model, "output_kind", "?"))


def _heads_file(path: Path) -> dict | None:
    """The module -> state_dict mapping of a facetool ``heads.pt``, else None (a checkpoint, a state_dict)."""
    import torch

    from facetool.io import torch_load

    obj = torch_load(path)
    if not isinstance(obj, dict) or not obj or "format" in obj or "state_dict" in obj:
        return None
    if all(isinstance(v, dict) and v and all(isinstance(t, torch.Tensor) for t in v.values()) for v in obj.values()):
        return obj
    return None


def _onnx_parameters(path: Path) -> int:
    """Number of weights stored in an ONNX graph (its initializers)."""
    import onnx
    import numpy as np

    graph = onnx.load(str(path), load_external_data=False).graph
    return int(sum(int(np.prod(t.dims)) for t in graph.initializer))
