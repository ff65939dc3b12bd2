"""Command groups whose subcommands live in separate modules (one module per method family)."""

from __future__ import annotations

import importlib
import importlib.util

import typer


def make_group(name: str, help: str, modules: list[str], root: typer.Typer) -> typer.Typer:
    group = typer.Typer(help=help, no_args_is_help=True)
    for m in modules:
        if importlib.util.find_spec(m) is not None:
            importlib.import_module(m).register(group)
    if group.registered_commands or group.registered_groups:  # a group appears once it has commands
        root.add_typer(group, name=name)
    return group
