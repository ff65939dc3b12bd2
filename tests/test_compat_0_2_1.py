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


def test_info_reads_heads_files_onnx_parameters_and_meta(tmp_path):
    """`info` on a heads.pt facetool wrote lists its tensors; on an ONNX file it counts the weights
    (not 0 M); on a checkpoint it shows the meta's method and epochs."""
    r = run_facetool("info", FIX / "arc" / "heads.pt", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["heads"]["head"]["weight"] == [4, 16]
    r = run_facetool("info", FIX / "srrl" / "model.pt", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["meta.method"] == "distill-srrl", r.stderr
    onnx = tmp_path / "arc.onnx"
    assert run_facetool("export", "--model", FIX / "arc" / "model.pt", "--out", onnx).returncode == 0
    pt = json.loads(run_facetool("info", FIX / "arc" / "model.pt", "--json").stdout)["parameters (M)"]
    r = run_facetool("info", onnx, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["parameters (M)"] == pytest.approx(pt, rel=0.1) and pt > 0
