"""`facetool recipe FILE`: run the steps of a recipe in this process, in order."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from facetool.cli.common import console, guarded
from facetool.errors import FacetoolError


def register(app: typer.Typer) -> None:
    @app.command("recipe")
    @guarded
    def recipe(
        path: Path = typer.Argument(..., help="Recipe TOML file (see recipes/)."),
        set_: list[str] = typer.Option([], "--set", help="Override a recipe variable: name=value."),
        from_step: int = typer.Option(1, "--from-step", help="Start at this step (1-based)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the command lines only."),
    ) -> None:
        """Run a recipe: a list of facetool command lines (the quickstart, the papers' tables)."""
        from facetool.cli import app as root
        from facetool.recipe import load_recipe

        overrides = {}
        for s in set_:
            if "=" not in s:
                raise FacetoolError(f"--set needs name=value, got {s!r}")
            k, v = s.split("=", 1)
            overrides[k] = v
        title, steps = load_recipe(path, overrides)
        console.rule(f"[bold]{title}")
        for i, step in enumerate(steps, 1):
            if i < from_step:
                continue
            console.print(f"[bold cyan]step {i}/{len(steps)}[/] {step.name}: facetool {' '.join(step.argv)}")
            if dry_run:
                continue
            t0 = time.time()
            try:
                rc = root(step.argv, standalone_mode=False)
            except typer.TyperException as e:  # usage errors inside a recipe line (typer vendors click)
                if not hasattr(e, "format_message"):
                    raise
                raise FacetoolError(f"recipe step {i} ({step.name}): {e.format_message()}") from None
            except (typer.Exit, SystemExit) as e:
                rc = getattr(e, "exit_code", getattr(e, "code", 1))
            if rc:
                raise FacetoolError(f"recipe stopped at step {i} ({step.name}); fix it and rerun with --from-step {i}")
            console.print(f"[dim]step {i} done in {time.time() - t0:.1f}s[/]")
