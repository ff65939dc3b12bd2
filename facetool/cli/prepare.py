"""`facetool prepare ...`: build face stores. Sources register themselves on ``prepare_app``."""

from __future__ import annotations

import importlib
import importlib.util

import typer

prepare_app = typer.Typer(help="Prepare a face store (HDF5) from a dataset or the synthetic generator.",
                          no_args_is_help=True)

#: modules exposing ``register(prepare_app)``
SOURCES = ["facetool.cli.prepare_synthetic", "facetool.cli.prepare_datasets"]


def register(app: typer.Typer) -> None:
    for m in SOURCES:
        if importlib.util.find_spec(m) is not None:
            importlib.import_module(m).register(prepare_app)
    app.add_typer(prepare_app, name="prepare")
