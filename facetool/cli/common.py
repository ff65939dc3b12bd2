"""Shared CLI plumbing: the rich console and turning errors into one line + exit code."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from typing import Any, Callable

import typer
from rich.table import Table

from facetool.console import console, err_console  # noqa: F401  (the CLI prints through these)
from facetool.errors import FacetoolError


def one_line(text: str) -> str:
    """The whole message on one line (newlines and runs of spaces become one space)."""
    return " ".join(str(text).split())


def print_error(message: str) -> None:
    """``error: MESSAGE`` on stderr, one line, the message printed literally (no rich markup)."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> None:
    print_error(message)
    raise typer.Exit(code)


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command: FacetoolError / Ctrl-C / unexpected errors become one line, non-zero exit.

    ``FACETOOL_DEBUG=1`` re-raises, to see the traceback while developing.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from facetool.io import interruption_report, release_claims

        release_claims()
        try:
            _check_arguments(kwargs)  # options are validated before any work
            with _sigint_remembered() as sigint:
                result = fn(*args, **kwargs)
            if sigint["seen"]:  # Ctrl-C landed where Python swallows exceptions (a weakref callback, __del__)
                raise KeyboardInterrupt
            return result
        except typer.Exit:
            raise
        except FacetoolError as e:
            if os.environ.get("FACETOOL_DEBUG"):
                raise
            fail(str(e) if str(e).strip() else type(e).__name__, e.exit_code)
        except KeyboardInterrupt:
            if os.environ.get("FACETOOL_DEBUG"):
                raise
            fail(interruption_report("--resume" in current_command()[1].values()), 130)
        except MemoryError:
            fail("out of memory; use a smaller --batch-size", 1)
        except OSError as e:  # a path the user gave that the system refuses (too long, permission, disk full)
            if os.environ.get("FACETOOL_DEBUG"):
                raise
            if not e.filename:
                fail(f"internal error: {type(e).__name__}: {one_line(e)} (set FACETOOL_DEBUG=1 for the traceback)", 1)
            fail(f"cannot use {e.filename}: {e.strerror or one_line(e)}", 2)
        except Exception as e:  # noqa: BLE001 - never show a traceback to a user
            if os.environ.get("FACETOOL_DEBUG"):
                raise
            msg = one_line(e)
            if len(msg) > 600:  # e.g. a library's multi-paragraph message: keep whole words
                msg = msg[:600].rsplit(" ", 1)[0] + " ..."
            fail(f"internal error: {type(e).__name__}: {msg} (set FACETOOL_DEBUG=1 for the traceback)", 1)
        finally:
            release_claims()

    return wrapper


def current_command() -> tuple[str, dict[str, str]]:
    """The running command's name (``"train resnet"``) and its parameters' option flags
    (python name -> longest ``--flag``), from the CLI parser's context; ``("", {})`` outside the CLI."""
    try:
        from typer._click.globals import get_current_context  # typer vendors click (pinned by the lock)
    except ImportError:  # pragma: no cover - another typer layout
        return "", {}
    ctx = get_current_context(silent=True)
    if ctx is None:
        return "", {}
    names, c = [], ctx
    while c is not None and c.parent is not None:
        names.append(c.info_name)
        c = c.parent
    flags = {}
    for p in ctx.command.params:
        opts = [o for o in getattr(p, "opts", []) if o.startswith("--")]
        flags[p.name] = max(opts, key=len) if opts else p.name  # an argument: its name (e.g. "path")
    return " ".join(reversed(names)), flags


def _check_arguments(kwargs: dict[str, Any]) -> None:
    """Every numeric option against its declared range and every input path against its declared kind
    (facetool/cli/limits.py): NaN, infinity, absurd values and missing or wrong files never reach the
    command. Numbers first, then paths, in the command's declaration order."""
    from pathlib import Path

    from facetool.cli.limits import check_number, check_path

    command, flags = current_command()
    for name, value in kwargs.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name in flags:
            check_number(command, flags[name], value)
    if isinstance(kwargs.get("device"), str) and flags.get("device") == "--device":
        checked_device(kwargs["device"])  # the one device validator, before the files
    for name, value in kwargs.items():
        if name in flags and (isinstance(value, Path) or (isinstance(value, (list, tuple)) and value
                                                          and all(isinstance(v, Path) for v in value))):
            check_path(command, flags[name], value)


@contextlib.contextmanager
def _sigint_remembered():
    """While a command runs, Ctrl-C raises KeyboardInterrupt as usual AND is remembered: Python only
    prints "Exception ignored" for one raised inside a weakref callback or ``__del__``, and the command
    would otherwise finish with exit 0 as if nobody had pressed it."""
    state = {"seen": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def on_sigint(signum, frame):
        state["seen"] = True
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, old)


def dict_table(title: str, rows: dict[str, Any] | list[tuple[str, Any]], key: str = "item", value: str = "value") -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column(key)
    t.add_column(value, justify="right")
    for k, v in (rows.items() if isinstance(rows, dict) else rows):
        t.add_row(str(k), f"{v:.4g}" if isinstance(v, float) else str(v))
    return t


def records_table(title: str, records: list[dict[str, Any]], columns: list[str] | None = None) -> Table:
    """A table with one row per record (e.g. one row per model)."""
    cols = columns or (list(records[0].keys()) if records else [])
    t = Table(title=title, title_justify="left")
    for i, c in enumerate(cols):
        t.add_column(c, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for r in records:
        t.add_row(*[(f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c, ""))) for c in cols])
    return t



def arch_option(flag: str = "--arch", of: str = "--model") -> Any:
    """``--arch NAME``: the architecture of a model file that does not record one."""
    return typer.Option(None, flag, metavar="NAME",
                        help=f"Architecture of {of} when the file does not record one (a bare state_dict no known "
                             "layout matches), e.g. iresnet50; the error lists the names.")


def device_option(default: str = "auto") -> Any:
    """``--device``: where a command runs its model; checked before any work by
    :func:`facetool.devices.resolve_device` (the one validator of every command with ``--device``).
    ``default`` is the command's own (``cpu`` where earlier versions always ran there)."""
    return typer.Option(default, "--device", metavar="DEVICE",
                        help="auto (cuda when available), cpu, cuda, cuda:N or mps; checked before any work.")


def checked_device(device: str | None) -> str:
    """``--device`` checked before any work: a one-line error naming what this machine allows."""
    from facetool.devices import resolve_device

    return resolve_device(device)


def print_notes(notes: list[str] | tuple[str, ...]) -> None:
    """A command's notes (what it dropped or doubts), one ``note:`` line each on stderr."""
    from rich.markup import escape

    for n in notes:
        err_console.print(f"note: {escape(one_line(n))}", highlight=False, soft_wrap=True)


def features_option(choices: tuple[str, ...] = ("embedding", "penultimate"), flag: str = "--features",
                    of: str = "--model") -> Any:
    """``--features``: which output of the model an embedding command uses (classifiers need it)."""
    return typer.Option("embedding", flag, metavar="|".join(choices),
                        help=f"Output of {of} to use: embedding (refuses a classifier); penultimate (a classifier's "
                             "pooled penultimate feature)" + ("; logits (a classifier's class logits)"
                                                              if "logits" in choices else "") + ".")
