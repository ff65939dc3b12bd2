"""The facetool command line: a thin Typer layer over the library.

Each ``facetool.cli.<module>`` in :data:`COMMAND_MODULES` exposes ``register(app)``.
"""

from __future__ import annotations

import importlib
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


for _m in COMMAND_MODULES:  # a command module that fails to import is an error, never a missing command
    importlib.import_module(f"facetool.cli.{_m}").register(app)


def main() -> None:
    """Entry point: usage errors (a missing option, a number out of range) are one line, exit 2."""
    import sys

    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    try:
        rc = app(standalone_mode=False)
    except typer.Abort:  # end of input at a prompt (Ctrl-C already comes back as exit code 130)
        sys.exit(1)
    except typer.TyperException as e:  # click's usage errors (typer vendors click)
        if not hasattr(e, "format_message"):
            raise
        from facetool.cli.common import print_error

        if not e.format_message().strip():  # e.g. no_args_is_help: the help was printed already
            sys.exit(getattr(e, "exit_code", 2))
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        print_error(e.format_message() + hint)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(rc if isinstance(rc, int) else 0)
