"""Import structure: no import circles, layers that do not reach up, and a CLI that answers --help /
--version without importing torch (timing lives in benchmarks/bench_cli.py, not here)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import facetool
from conftest import run_facetool

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "facetool"
HEAVY = ("torch", "torchvision", "numpy", "cv2", "h5py", "pandas", "onnxruntime", "scipy", "matplotlib")


def facetool_modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the package (packages by their ``__init__``)."""
    mods = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def import_edges(deferred: bool = True) -> dict[str, set[str]]:
    """``module -> facetool modules it imports`` from the source (``deferred``: also imports inside
    functions). ``from a.b import c`` counts as importing ``a.b.c`` when that is a module, else ``a.b``.
    Edges to a module's own enclosing packages are left out (importing a submodule runs them anyway)."""
    mods = facetool_modules()

    def resolve(dotted: str) -> str | None:
        parts = dotted.split(".")
        while parts and ".".join(parts) not in mods:
            parts.pop()
        return ".".join(parts) or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.name == "__init__.py" else m.rpartition(".")[0]

        def visit(node: ast.AST, top: bool, m: str = m, pkg: str = pkg) -> None:
            for ch in ast.iter_child_nodes(node):
                inner = top and not isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                targets: list[str] = []
                if isinstance(ch, ast.Import):
                    targets = [a.name for a in ch.names]
                elif isinstance(ch, ast.ImportFrom):
                    base = ch.module or ""
                    if ch.level:
                        up = pkg.split(".")[: len(pkg.split(".")) - ch.level + 1]
                        base = ".".join(up + ([base] if base else []))
                    targets = [f"{base}.{a.name}" for a in ch.names]
                if targets and (top or deferred):
                    for t in targets:
                        r = resolve(t)
                        if r and r != m and not m.startswith(r + "."):
                            edges[m].add(r)
                visit(ch, inner)

        visit(ast.parse(path.read_text(encoding="utf-8")), True)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    edges = import_edges()
    # the graph is real: known edges are seen, top-level and deferred
    assert "facetool.models.base" in edges["facetool.flops"]
    assert "facetool.flops" in edges["facetool.trainers.classify"]  # deferred (inside train_on_store)
    assert "facetool.flops" not in import_edges(deferred=False)["facetool.trainers.classify"]


def test_no_import_circles_even_through_deferred_imports():
    """A circle through an import inside a function still couples the modules both ways (and
    breaks as soon as someone moves that import to the top): there is none."""
    found = cycles(import_edges(deferred=True))
    assert not found, "import circles (move the shared piece into a lower module): " + "; ".join(
        " <-> ".join(c) for c in found)


#: The layers of the package, lowest first. A module may import modules of its own layer or a lower one,
#: never a higher one (not even inside a function), and every module of the package belongs to a layer.
LAYERS: list[tuple[str, ...]] = [
    # 0 foundations: no facetool imports beyond this layer
    ("facetool", "facetool.errors", "facetool.devices", "facetool.io", "facetool.console"),
    # 1 data, models and their mechanics
    ("facetool.store", "facetool.prepare", "facetool.tasks", "facetool.hooks", "facetool.distributed", "facetool.data",
     "facetool.detect", "facetool.models", "facetool.flops"),
    # 2 the engine, evaluation and export
    ("facetool.engine", "facetool.eval", "facetool.export"),
    # 3 what users run: training methods, explainers, annotation
    ("facetool.trainers", "facetool.explainers", "facetool.annotate"),
    # 4 the command line and recipes
    ("facetool.recipe", "facetool.cli", "facetool.__main__"),
]


def layer_of(module: str) -> int | None:
    """Layer index of ``module`` by its longest matching prefix (``facetool`` itself: the package only)."""
    best: tuple[int, int] | None = None
    for i, names in enumerate(LAYERS):
        for p in names:
            if module == p or (p != "facetool" and module.startswith(p + ".")):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    return None if best is None else best[0]


def test_every_module_has_a_layer():
    missing = sorted(m for m in facetool_modules() if layer_of(m) is None)
    assert not missing, f"modules in no layer (add them to LAYERS): {missing}"
    assert layer_of("facetool.data.folder") == 1 and layer_of("facetool.cli.train") == 4
    assert layer_of("facetool.trainers.distill.run") == 3 and layer_of("facetool.nowhere") is None


def test_no_module_imports_a_higher_layer():
    bad = [(m, t) for m, ts in import_edges().items() for t in ts
           if (layer_of(m) or 0) < (layer_of(t) or 0)]
    assert not bad, "imports that reach up a layer (move the shared piece down): " + "; ".join(
        f"{m} -> {t}" for m, t in sorted(bad))


def test_layer_rule_sees_an_upward_import(tmp_path):
    """The rule is real: an upward edge (as data.fairface -> annotate was in 0.2.1) is found."""
    edges = {"facetool.data.fairface": {"facetool.annotate"}, "facetool.annotate": {"facetool.store"}}
    bad = [(m, t) for m, ts in edges.items() for t in ts if layer_of(m) < layer_of(t)]
    assert bad == [("facetool.data.fairface", "facetool.annotate")]


_ISOLATED = r"""
import ast, importlib, json, os, sys, traceback
root, names = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, root)
# third-party modules imported at the top of any facetool module, loaded once in this parent so each
# forked child only pays for facetool's own modules (a child starts with no facetool module loaded)
third = set()
for dirpath, _, files in os.walk(os.path.join(root, "facetool")):
    for f in files:
        if f.endswith(".py"):
            for n in ast.parse(open(os.path.join(dirpath, f), encoding="utf-8").read()).body:  # module level
                if isinstance(n, ast.Import):
                    third |= {a.name for a in n.names}
                elif isinstance(n, ast.ImportFrom) and not n.level and n.module:
                    third |= {n.module} | {f"{n.module}.{a.name}" for a in n.names}
for t in sorted(t for t in third if t.split(".")[0] not in ("facetool", "__future__")):
    try:
        importlib.import_module(t)
    except Exception:
        pass
assert not [m for m in sys.modules if m.split(".")[0] == "facetool"]
failed = {}
for name in names:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            importlib.import_module(name)
        except BaseException:
            sys.stderr.write(traceback.format_exc(limit=-6))
            code = 1
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if status:
        failed[name] = status
print(json.dumps({"failed": failed, "checked": len(names)}))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module is imported first, alone, in a fresh interpreter (a fork of one that has loaded the
    third-party packages but no facetool module): an import circle or an order dependence fails here."""
    names = sorted(facetool_modules())
    r = subprocess.run([sys.executable, "-c", _ISOLATED, str(ROOT), json.dumps(names)], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["checked"] == len(names) > 50
    assert not res["failed"], f"cannot be imported first: {sorted(res['failed'])}\n{r.stderr[-3000:]}"


def _imported(importtime_stderr: str) -> set[str]:
    """Module names from ``-X importtime`` (``PYTHONPROFILEIMPORTTIME``) output."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("args", [("--help",), ("--version",), ("train", "aig", "--help")])
def test_help_and_version_do_not_import_torch(args):
    r = run_facetool(*args, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    mods = _imported(r.stderr)
    assert "facetool.cli" in mods and "typer" in mods  # the probe sees the imports
    heavy = sorted(m for m in mods if m.split(".")[0] in HEAVY)
    assert not heavy, f"`facetool {' '.join(args)}` imported {heavy[:8]}"
    assert (f"facetool {facetool.__version__}" in r.stdout) if args == ("--version",) else ("Usage" in r.stdout)


_WALK = r"""
import contextlib, io, json, sys
import typer.main
from facetool.cli import app

root = typer.main.get_command(app)

def walk(cmd, path):
    yield path
    for name, sub in sorted((getattr(cmd, "commands", None) or {}).items()):
        yield from walk(sub, path + [name])

helps = {}
for p in walk(root, []):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            root.main([*p, "--help"], prog_name="facetool", standalone_mode=False)
        except SystemExit:
            pass
    helps[" ".join(p)] = buf.getvalue()
print(json.dumps({"helps": helps, "modules": sorted(sys.modules)}))
"""


def test_every_subcommand_help_without_torch():
    r = subprocess.run([sys.executable, "-c", _WALK], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    helps = res["helps"]
    assert {"train aig", "eval ijbc", "prepare synthetic", "invert", "export"} <= set(helps)
    assert all("Usage" in h and "--help" in h for h in helps.values()), [k for k, h in helps.items() if "Usage" not in h]
    assert "accessory=glasses" in helps["prepare synthetic"]  # the --bias help text (synthetic_spec)
    assert {"eval lfw", "eval cplfw"} <= set(helps)  # one command per BIN_SETS entry
    heavy = sorted(m for m in res["modules"] if m.split(".")[0] in HEAVY)
    assert not heavy, f"rendering every --help imported {heavy[:8]}"


def test_import_facetool_is_light():
    code = ("import sys, facetool; print(sorted(m for m in sys.modules if m.split('.')[0] in %r), "
            "set(dir(facetool)) >= set(facetool.__all__))" % (HEAVY,))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["[]", "True"]


def test_lazy_names_are_the_real_objects():
    import importlib

    import facetool

    for name in facetool.__all__:  # every advertised entry point resolves, to the object of its module
        if name not in ("__version__", "FacetoolError"):
            assert getattr(facetool, name) is getattr(importlib.import_module(facetool._LAZY[name]), name)
    from facetool.engine import train
    from facetool.models import create_model, load_model
    from facetool.store import FaceStore

    assert facetool.train is train and facetool.create_model is create_model
    assert facetool.load_model is load_model and facetool.FaceStore is FaceStore
    with pytest.raises(AttributeError):
        facetool.no_such_entry_point  # noqa: B018
    from facetool.data import FaceDataset, synthetic
    from facetool.data.dataset import FaceDataset as direct

    assert FaceDataset is direct and synthetic.parse_bias("attribute=gender,value=male").p == 0.9


def test_a_command_module_that_fails_to_import_is_an_error(tmp_path):
    """A broken or missing command module stops the CLI with its import error (0.2.1 skipped a missing
    one silently: the command just vanished from --help)."""
    import shutil

    copy = tmp_path / "facetool"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "cli" / "info.py").unlink()
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", "import facetool, facetool.cli; print(facetool.__file__)"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode != 0 and "facetool.cli.info" in r.stderr, (r.stdout, r.stderr[-500:])
