"""Walking the Typer app for the CLI-wide tests (outputs guard, bad-input matrix): the click commands,
their options, one in-process invocation, and a digest that proves inputs unchanged."""

from __future__ import annotations

import hashlib
from pathlib import Path


def root_command():
    """The click command of the facetool app (build it once: CliRunner rebuilds it per call)."""
    import typer

    from facetool.cli import app

    return typer.main.get_command(app)


def walk_commands(cmd, path: tuple[str, ...] = ()):
    """``(("train", "resnet"), command)`` for every leaf command."""
    if hasattr(cmd, "commands"):
        for name, sub in sorted(cmd.commands.items()):
            yield from walk_commands(sub, (*path, name))
    else:
        yield path, cmd


def invoke(root, capsys, argv) -> tuple[int, str]:
    """Run ``facetool ARGV`` in this process: (exit code, stdout + stderr), usage errors printed as
    facetool.cli.main prints them."""
    import typer

    capsys.readouterr()
    try:
        rc = root.main([str(a) for a in argv], standalone_mode=False, prog_name="facetool")
    except typer.TyperException as e:  # usage errors (typer vendors click)
        rc = getattr(e, "exit_code", 2)
        print(e.format_message() if hasattr(e, "format_message") else e)
    cap = capsys.readouterr()
    return (rc if isinstance(rc, int) else 0), cap.out + cap.err


def long_flag(param) -> str:
    """The longest ``--flag`` of an option; an argument's name."""
    opts = [o for o in param.opts if o.startswith("--")]
    return max(opts, key=len) if opts else param.name


def is_flag(param) -> bool:
    return bool(getattr(param, "is_flag", False)) or isinstance(param.default, bool)


def digest(p: Path) -> str:
    """sha256 of a file, or of every file below a folder."""
    if p.is_dir():
        return "|".join(f"{q.relative_to(p)}:{digest(q)}" for q in sorted(p.rglob("*")) if q.is_file())
    return hashlib.sha256(p.read_bytes()).hexdigest()
