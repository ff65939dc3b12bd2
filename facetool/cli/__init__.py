"""The facetool command line: a thin Typer layer over the library.

Each ``facetool.cli.<module>`` in :data:`COMMAND_MODULES` exposes ``register(app)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import typer

from facetool import __version__

COMMAND_MODULES = ["prepare", "annotate", "train", "distill", "eval", "dissect", "invert", "export", "recipe", "info"]

app = typer.Typer(
    name="facetool",
    help="Research bench for interpretable, efficient face recognition.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"facetool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """facetool: prepare, annotate, train, distil, evaluate and explain face models."""


for _m in COMMAND_MODULES:
    if importlib.util.find_spec(f"facetool.cli.{_m}") is not None:
        importlib.import_module(f"facetool.cli.{_m}").register(app)


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    app()
