"""Checkpoints written by facetool 0.2.1 still load and compute the same outputs.

``tests/fixtures/v0_2_1`` holds tiny checkpoints written by the 0.2.1 CLI (``gen.sh``: identity, attribute,
ConvNet-AIG, ConvNet-IIG, multi-task ABN, IR-ResNet + ArcFace head, an SRRL student) and their outputs on
fixed inputs computed by 0.2.1 (``expect.py`` -> ``expected.pt``, ``expected.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_facetool

FIX = Path(__file__).parent / "fixtures" / "v0_2_1"
NAMES = ["resnet", "gender", "aig", "iig", "abn", "arc", "srrl"]
EXPECTED = json.loads((FIX / "expected.json").read_text())


@pytest.fixture(scope="module")
def expected():
    return torch.load(FIX / "expected.pt", weights_only=True)


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_of_0_2_1_loads_with_the_same_outputs_and_task(name, expected):
    from facetool.models import load_model
    from facetool.tasks import task_of

    m = load_model(FIX / name / "model.pt").eval()
    want = EXPECTED[name]
    assert m.config["name"] == want["name"]
    with torch.no_grad():
        y, internals = m(expected[f"{name}/x"], return_internals=True)
    torch.testing.assert_close(y, expected[f"{name}/y"], rtol=1e-4, atol=1e-5)  # thread counts change float sums
    for k in want["internals"]:
        torch.testing.assert_close(internals[k], expected[f"{name}/{k}"], rtol=1e-4, atol=1e-5)  # thread counts change float sums
    t = task_of(m)
    assert (t.to_json() if t is not None else None) == want["task"]


def test_0_2_1_checkpoints_in_a_fresh_process(tmp_path):
    """The real files through the CLI: Table II on two 0.2.1 classifiers, `info` on an embedding model
    and its margin head."""
    from facetool.data.synthetic import prepare_synthetic

    store = tmp_path / "s.h5"
    prepare_synthetic(store, identities=4, per_identity=6, size=32, seed=0)  # the store gen.sh trained on
    r = run_facetool("eval", "classify", "--store", store, "--model", FIX / "resnet" / "model.pt",
                     "--model", FIX / "aig" / "model.pt", "--json", tmp_path / "t.json")
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "t.json").read_text())
    assert "aig" in json.dumps(rows) and "resnet" in json.dumps(rows)
    r = run_facetool("info", FIX / "arc" / "model.pt")
    assert r.returncode == 0 and "iresnet18" in r.stdout, r.stderr
