"""Recipes: TOML files listing facetool command lines, run in order (the quickstart, the papers'
tables). ``{name}`` placeholders are filled from ``[vars]`` and ``--set name=value``.

    [vars]
    out = "runs/quickstart"
    store = "{out}/synthetic.h5"          # variables may use other variables

    [[step]]
    name = "prepare synthetic faces"
    run = "prepare synthetic --out {store} --identities 16"

A ``--set`` value is ONE argument, spaces and quotes included (``--set "out=my runs"``), unless the
recipe's own value of that variable holds several arguments (e.g. a shared list of options): then the
value given is split like a shell line, as the recipe's own is.
"""

from __future__ import annotations

import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

from facetool.errors import FacetoolError, require_file


@dataclass
class Step:
    name: str
    argv: list[str]


def resume_argv(argv: list[str], options: set[str]) -> list[str]:
    """The step's command line continuing its interrupted run: ``--overwrite`` (which would start over)
    becomes ``--resume`` when the command has ``--resume``; otherwise the line is unchanged."""
    if "--resume" not in options:
        return list(argv)
    out = [a for a in argv if a != "--overwrite"]
    return out if "--resume" in out else [*out, "--resume"]


def _resolve_vars(raw: dict[str, str], literal: set[str], path: Path) -> dict[str, str]:
    """Fill variables that use other variables (``store = "{out}/synthetic.h5"``); the ``literal`` ones
    (values a user gave) are taken as they are. An undefined name or a circle is an error."""
    import string

    done: dict[str, str] = {}

    def value(name: str, stack: tuple[str, ...]) -> str:
        if name in done:
            return done[name]
        if name in stack:
            raise FacetoolError(f"recipe {path}: its variables refer to each other in a circle: "
                                + " -> ".join((*stack, name)))
        if name not in raw:
            raise FacetoolError(f"recipe {path}: variable {stack[-1]!r} uses undefined variable {name!r}")
        text = raw[name]
        if name not in literal:
            try:
                parts = list(string.Formatter().parse(text))
            except ValueError as e:
                raise FacetoolError(f"recipe {path}: variable {name!r} holds a malformed {{placeholder}}: {e}") from None
            text = "".join(lit + (value(field, (*stack, name)) if field is not None else "")
                           for lit, field, _, _ in parts)
        done[name] = text
        return text

    return {k: value(k, ()) for k in raw}


def load_recipe(path: str | Path, overrides: dict[str, str] | None = None) -> tuple[str, list[Step]]:
    p = require_file(path, "recipe")
    try:
        doc = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FacetoolError(f"recipe {p} is not valid TOML: {e}") from None
    own = {k: str(v) for k, v in doc.get("vars", {}).items()}
    vars_ = dict(own)
    unknown = sorted(set(overrides or {}) - set(own))
    if unknown:
        raise FacetoolError(f"--set {unknown[0]}=...: recipe {p} has no variable {unknown[0]!r}; its variables are "
                            + (", ".join(sorted(own)) or "none"))
    for k, v in (overrides or {}).items():  # a user's value is one argument unless the recipe's holds several
        several = k in own and len(shlex.split(own[k])) > 1
        vars_[k] = v if several else shlex.quote(v)
    vars_ = _resolve_vars(vars_, set(overrides or {}), p)
    steps = []
    for i, s in enumerate(doc.get("step", [])):
        if "run" not in s:
            raise FacetoolError(f"recipe {p}: step {i + 1} has no 'run'")
        try:
            line = s["run"].format(**vars_)
        except KeyError as e:
            raise FacetoolError(f"recipe {p}: step {i + 1} uses undefined variable {e}") from None
        except (ValueError, IndexError) as e:
            raise FacetoolError(f"recipe {p}: step {i + 1} holds a malformed {{placeholder}}: {e}") from None
        steps.append(Step(s.get("name", line.split()[0]), shlex.split(line)))
    if not steps:
        raise FacetoolError(f"recipe {p} has no [[step]]")
    return str(doc.get("title", p.stem)), steps


def rerun_command(path: str | Path, sets: list[str], step: int, resume: bool = False) -> str:
    """The shell line that reruns a recipe from ``step`` with the same ``--set`` values (quoted)."""
    parts = ["facetool", "recipe", str(path), *[a for s in sets for a in ("--set", s)], "--from-step", str(step)]
    return " ".join(shlex.quote(a) for a in parts) + (" --resume" if resume else "")
