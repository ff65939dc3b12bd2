"""Recipes: TOML files listing facetool command lines, run in order (the quickstart, the papers'
tables). ``{name}`` placeholders are filled from ``[vars]`` and ``--set name=value``.

    [vars]
    out = "runs/quickstart"

    [[step]]
    name = "prepare synthetic faces"
    run = "prepare synthetic --out {out}/synthetic.h5 --identities 16"
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


def load_recipe(path: str | Path, overrides: dict[str, str] | None = None) -> tuple[str, list[Step]]:
    p = require_file(path, "recipe")
    try:
        doc = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FacetoolError(f"recipe {p} is not valid TOML: {e}") from None
    vars_ = {k: str(v) for k, v in doc.get("vars", {}).items()}
    vars_.update(overrides or {})
    steps = []
    for i, s in enumerate(doc.get("step", [])):
        if "run" not in s:
            raise FacetoolError(f"recipe {p}: step {i + 1} has no 'run'")
        try:
            line = s["run"].format(**vars_)
        except KeyError as e:
            raise FacetoolError(f"recipe {p}: step {i + 1} uses undefined variable {e}") from None
        steps.append(Step(s.get("name", line.split()[0]), shlex.split(line)))
    if not steps:
        raise FacetoolError(f"recipe {p} has no [[step]]")
    return str(doc.get("title", p.stem)), steps
