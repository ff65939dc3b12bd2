"""Shared fixtures. Tests never need a GPU; torch runs on at most 2 CPU threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402


def _threads() -> int:
    """At most 2 torch threads, fewer when ``$OMP_NUM_THREADS`` asks (heavy runs on shared cores use 1)."""
    try:
        asked = int(os.environ["OMP_NUM_THREADS"])
    except ValueError:
        asked = 2
    return max(1, min(2, asked, os.cpu_count() or 1))


torch.set_num_threads(_threads())


#: Learning tests draw their seeds from here, so the whole slow suite can be re-run with other seeds:
#: ``FACETOOL_TEST_SEED=100 .venv/bin/python -m pytest -m slow``.
SEED_BASE = int(os.environ.get("FACETOOL_TEST_SEED", "0"))


def learning_seeds(n: int = 2) -> list[int]:
    """The ``n`` seeds a learning test averages over (offset by ``$FACETOOL_TEST_SEED``)."""
    return [SEED_BASE + i for i in range(n)]


def run_facetool(*args, cwd=None, env=None, timeout: float = 600):
    """Run ``python -m facetool ARGS`` in a fresh interpreter (no state from the test process).

    Returns ``subprocess.CompletedProcess`` with text ``stdout``/``stderr``.
    """
    import subprocess
    import sys

    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "2", "COLUMNS": "200", "NO_COLOR": "1"})
    e.pop("FACETOOL_DEBUG", None)
    if env:
        e.update(env)
    return subprocess.run([sys.executable, "-m", "facetool", *[str(a) for a in args]], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory) -> Path:
    """A small synthetic face store (112x112, 8 identities x 12 images, seed 0)."""
    from facetool.data.synthetic import prepare_synthetic

    out = tmp_path_factory.mktemp("synthetic") / "synthetic.h5"
    prepare_synthetic(out, identities=8, per_identity=12, size=112, seed=0)
    return out


@pytest.fixture
def cli():
    """Invoke the facetool CLI in-process; returns click's Result (exit_code, output)."""
    from typer.testing import CliRunner

    from facetool.cli import app

    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return run
