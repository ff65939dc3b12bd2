"""Shared fixtures. Tests never need a GPU; torch runs on at most 2 CPU threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


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
