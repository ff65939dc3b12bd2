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


#: The planted-bias experiment of the relevance (issue 10) and unit-dissection (issue 11) learning tests.
BIAS = "accessory=glasses,attribute=gender,value=male,p={p}"
BIAS_SIZE, BIAS_IDS, BIAS_PER, BIAS_EPOCHS = 48, 96, 4, 10  # many identities, few images each: gender, not identities


@pytest.fixture(scope="session")
def gender_bias_models(tmp_path_factory) -> dict:
    """Gender classifiers (`train resnet --task attribute:gender` through its library call: ResNet-18 of
    width 16, 48 px, 10 epochs) trained on the same 96 x 4 synthetic faces planted two ways: "biased"
    (males wear glasses in 90 % of their images, females in 10 %) and "clean" (everyone in 50 %), for
    each of ``learning_seeds(2)``; plus a "dict" store of 40 other identities x 4 images with glasses on
    exactly half of each identity's images (independent of gender), on which both are examined.
    Returns {"stores": {name: path}, "models": {(name, seed): checkpoint path}}. Trained once per session."""
    from facetool.data.synthetic import prepare_synthetic
    from facetool.engine import TrainConfig
    from facetool.trainers.classify import ClassificationMethod, train_on_store
    from facetool.tasks import resolve_task

    d = tmp_path_factory.mktemp("gender_bias")
    stores = {}
    for name, p, seed, ids, per in (("biased", 0.9, 1, BIAS_IDS, BIAS_PER), ("clean", 0.5, 1, BIAS_IDS, BIAS_PER),
                                    ("dict", 0.5, 7, 40, 4)):
        stores[name] = d / f"{name}.h5"
        prepare_synthetic(stores[name], identities=ids, per_identity=per, size=BIAS_SIZE, seed=seed,
                          test_fraction=0.0, bias=BIAS.format(p=p))
    models = {}
    for seed in learning_seeds(2):
        for name in ("biased", "clean"):
            cfg = TrainConfig(out=d / f"{name}_{seed}", epochs=BIAS_EPOCHS, batch_size=32, lr=0.05, seed=seed,
                              verbose=False)
            train_on_store(stores[name], "resnet18", lambda m: ClassificationMethod(), cfg, model_kwargs={"width": 16},
                           task=resolve_task("attribute:gender", stores[name]))
            models[name, seed] = cfg.out / "model.pt"
    return {"stores": stores, "models": models}
