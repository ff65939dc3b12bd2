"""Recipes: TOML files listing facetool command lines, run in order (the quickstart, the papers'
tables). ``{name}`` placeholders are filled from ``[vars]`` and ``--set name=value``.

    [vars]
    out = "runs/quickstart"
    store = "{out}/synthetic.h5"          # variables may use other variables

    [[step]]
    name = "prepare synthetic faces"
    run = "prepare synthetic --out {store} --identities 16"

A step may name its headline number and its pictures; after the last step ``facetool recipe`` prints one summary
table of every step's time, headline and pictures (and writes it to the recipe's ``summary`` JSON, if set)::

    [[step]]
    name = "Table II"
    run = "eval classify ... --json {out}/table.json"
    headline = [{ label = "top-1 resnet", file = "{out}/table.json", key = "rows.0.top1" }]
    pictures = ["{out}/dissect/heatmap.png"]

``key`` is a dotted path into the JSON file (list positions as numbers).

A ``--set`` value is ONE argument, spaces and quotes included (``--set "out=my runs"``), unless the
recipe's own value of that variable holds several arguments (e.g. a shared list of options): then the
value given is split like a shell line, as the recipe's own is.
"""

from __future__ import annotations

import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from facetool.errors import FacetoolError, require_file


@dataclass
class Headline:
    """One number a step reports in the recipe's summary: ``key`` (dotted, list positions as numbers) in
    the JSON ``file`` the step wrote."""

    label: str
    file: str
    key: str


@dataclass
class Step:
    name: str
    argv: list[str]
    headlines: list[Headline] = field(default_factory=list)
    pictures: list[str] = field(default_factory=list)


def read_headline(h: Headline) -> str:
    """The headline's value as text (numbers to 4 significant digits); ``-`` where the file or key is missing
    (a step not run yet)."""
    import json

    try:
        v = json.loads(Path(h.file).read_text())
    except (OSError, ValueError):
        return "-"
    for part in h.key.split("."):
        if isinstance(v, list) and part.lstrip("-").isdigit() and -len(v) <= int(part) < len(v):
            v = v[int(part)]
        elif isinstance(v, dict) and part in v:
            v = v[part]
        else:
            return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v) if not isinstance(v, (dict, list)) else "-"


def summary_rows(steps: list[Step], seconds: dict[int, float]) -> list[dict]:
    """One row per step that names a headline or pictures or ran now: its number, name, seconds (this run),
    headline values and pictures (``(missing)`` after a picture the step did not write)."""
    rows = []
    for i, s in enumerate(steps, 1):
        if not (s.headlines or s.pictures or i in seconds):
            continue
        rows.append({"step": i, "name": s.name, "seconds": round(seconds[i], 1) if i in seconds else "-",
                     "headline": "; ".join(f"{h.label} {read_headline(h)}" for h in s.headlines) or "-",
                     "pictures": " ".join(p if Path(p).exists() else f"{p} (missing)" for p in s.pictures) or "-"})
    return rows


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
    title, steps, _ = load_recipe_summary(path, overrides)
    return title, steps


def load_recipe_summary(path: str | Path, overrides: dict[str, str] | None = None) -> tuple[str, list[Step], str | None]:
    """:func:`load_recipe` and the recipe's ``summary`` JSON path (``None`` if it names none)."""
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
        steps.append(Step(s.get("name", line.split()[0]), shlex.split(line),
                          _headlines(s.get("headline", []), vars_, p, i), _texts(s.get("pictures", []), vars_, p, i)))
    if not steps:
        raise FacetoolError(f"recipe {p} has no [[step]]")
    summary = _texts([doc["summary"]], vars_, p, -1)[0] if "summary" in doc else None
    return str(doc.get("title", p.stem)), steps, summary


def _texts(items, vars_: dict[str, str], p: Path, i: int) -> list[str]:
    where = "its summary" if i < 0 else f"step {i + 1}"
    if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
        raise FacetoolError(f"recipe {p}: {where}: pictures / summary must be text (a list of paths)")
    try:
        return [t.format(**vars_) for t in items]
    except KeyError as e:
        raise FacetoolError(f"recipe {p}: {where} uses undefined variable {e}") from None
    except (ValueError, IndexError) as e:
        raise FacetoolError(f"recipe {p}: {where} holds a malformed {{placeholder}}: {e}") from None


def _headlines(items, vars_: dict[str, str], p: Path, i: int) -> list[Headline]:
    if not isinstance(items, list) or not all(isinstance(h, dict) and {"label", "file", "key"} <= set(h) for h in items):
        raise FacetoolError(f"recipe {p}: step {i + 1}: headline must be a list of {{ label, file, key }} tables")
    return [Headline(*_texts([str(h["label"]), str(h["file"]), str(h["key"])], vars_, p, i)) for h in items]


def rerun_command(path: str | Path, sets: list[str], step: int, resume: bool = False) -> str:
    """The shell line that reruns a recipe from ``step`` with the same ``--set`` values (quoted)."""
    parts = ["facetool", "recipe", str(path), *[a for s in sets for a in ("--set", s)], "--from-step", str(step)]
    return " ".join(shlex.quote(a) for a in parts) + (" --resume" if resume else "")
