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
            console.print(dict_table(f"face store {path.name}", {k: v for k, v in summary.items()}))
            for name, counts in attrs.items():
                console.print(dict_table(f"attribute {name}", counts, "value", "images"))
            return
        from facetool.models import load_model

        model = load_model(path, name=arch)
        n_params = sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else 0
        rows = {"model": getattr(model, "name", type(model).__name__), "task": getattr(model, "output_kind", "?"),
                "parameters (M)": round(n_params / 1e6, 3),
                "config": json.dumps(getattr(model, "config", {}), default=str)}
        if as_json:
            typer.echo(json.dumps(rows | {"meta": getattr(model, "meta", {})}, indent=2, default=str))
        else:
            console.print(dict_table(f"model {path.name}", rows))
