"""`facetool recipe FILE`: run the steps of a recipe in this process, in order."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from rich.markup import escape

from facetool.cli.common import console, guarded, print_error
from facetool.errors import FacetoolError


def _options_of(root: typer.Typer):
    """``argv -> set of option names`` of the facetool command that ``argv`` runs."""
    command = typer.main.get_command(root)

    def options(argv: list[str]) -> set[str]:
        cmd = command
        for word in argv:
            sub = getattr(cmd, "commands", {}).get(word) if hasattr(cmd, "commands") else None
            if sub is None:
                break
            cmd = sub
        return {o for p in getattr(cmd, "params", []) for o in (*p.opts, *p.secondary_opts)}

    return options


def register(app: typer.Typer) -> None:
    @app.command("recipe")
    @guarded
    def recipe(
        path: Path = typer.Argument(..., help="Recipe TOML file (see recipes/)."),
        set_: list[str] = typer.Option([], "--set", help="Override a recipe variable: name=value (the value is one argument, spaces included; variables that use it, e.g. store = \"{out}/synthetic.h5\", follow it)."),
        from_step: int = typer.Option(1, "--from-step", help="Start at this step (1-based)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the command lines only."),
        resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run of the first step run "
                                                            "(--from-step): --overwrite becomes --resume where the "
                                                            "step's command can resume."),
    ) -> None:
        """Run a recipe: a list of facetool command lines (the quickstart, the papers' tables)."""
        from facetool.cli import app as root
        from facetool.recipe import load_recipe_summary, rerun_command, resume_argv

        overrides = {}
        for s in set_:
            if "=" not in s:
                raise FacetoolError(f"--set needs name=value, got {s!r}")
            k, v = s.split("=", 1)
            overrides[k] = v
        title, steps, summary = load_recipe_summary(path, overrides)
        seconds: dict[int, float] = {}
        if not 1 <= from_step <= len(steps):
            raise FacetoolError(f"--from-step must be in 1..{len(steps)} (the recipe has {len(steps)} steps), got {from_step}")
        options = _options_of(root)
        console.rule(f"[bold]{escape(title)}")
        for i, step in enumerate(steps, 1):
            if i < from_step:
                continue
            argv = step.argv
            if resume and i == from_step:
                argv = resume_argv(argv, options(argv))
            console.print(f"[bold cyan]step {i}/{len(steps)}[/] {escape(step.name)}: facetool {escape(' '.join(argv))}")
            if dry_run:
                continue
            t0 = time.time()
            try:
                rc = root(argv, standalone_mode=False)
            except typer.TyperException as e:  # usage errors inside a recipe line (typer vendors click)
                if not hasattr(e, "format_message"):
                    raise
                raise FacetoolError(f"recipe step {i} ({step.name}): {e.format_message()}") from None
            except (typer.Exit, SystemExit) as e:
                rc = getattr(e, "exit_code", getattr(e, "code", 1))
            if rc == 130:  # Ctrl-C inside the step: pass it through, with how to continue (same --set values)
                can_resume = "--resume" in options(argv)
                print_error(f"recipe interrupted at step {i} ({step.name}); continue with: "
                            + rerun_command(path, set_, i, resume=can_resume))
                raise typer.Exit(130)
            if rc:
                raise FacetoolError(f"recipe stopped at step {i} ({step.name}); fix it and rerun with "
                                    + rerun_command(path, set_, i))
            seconds[i] = time.time() - t0
            console.print(f"[dim]step {i} done in {seconds[i]:.1f}s[/]")
        if not dry_run:
            _print_summary(title, steps, seconds, summary)


def _print_summary(title: str, steps, seconds: dict[int, float], summary: str | None) -> None:
    """One table of every step's time, headline number and pictures (and the recipe's summary JSON)."""
    from facetool.cli.common import records_table
    from facetool.io import guard_output, write_json
    from facetool.recipe import summary_rows

    rows = summary_rows(steps, seconds)
    if not any(s.headlines or s.pictures for s in steps):
        return
    total = sum(seconds.values())
    console.print(records_table(f"summary: {title} ({total:.0f} s for the steps run now)", rows,
                                ["step", "name", "seconds", "headline", "pictures"]))
    if summary:
        guard_output(Path(summary), overwrite=True, option="summary", suffix=".json")
        write_json(summary, {"title": title, "seconds": round(total, 1), "steps": rows})
        console.print(f"wrote {summary}")
