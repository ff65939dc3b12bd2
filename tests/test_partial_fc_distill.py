"""`distill --partial-fc RATE`: an embedding student's margin head as PartialFC through the engine's sharded
modules. At rate 1 on one process the student's cross-entropy is the full margin head's (loss and gradients);
under torchrun two processes train, write their shards and one merged head; students whose logits a term needs
are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import run_facetool

from facetool.models import create_model
from facetool.models.heads import MARGINS, MarginHead
from facetool.models.partial_fc import PartialFC
from facetool.trainers.distill.method import DistillMethod
from test_partial_fc_cli import _torchrun

TINY = ["--student", "iresnet18", "--width", "4", "--input-size", "32", "--embedding-size", "8", "--batch-size", "4",
        "--student-loss", "cosface", "--no-amp", "--epochs", "1"]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from facetool.data.synthetic import prepare_synthetic

    path, _ = prepare_synthetic(tmp_path_factory.mktemp("pfcd") / "s.h5", identities=5, per_identity=6, size=32, seed=0)
    return path


def test_rate_one_student_cross_entropy_is_the_full_margin_heads():
    torch.manual_seed(0)
    student = create_model("iresnet18", embedding_size=8, input_size=32, width=4)
    pfc = PartialFC(8, 5, 1.0, "arcface", seed=1)
    full = MarginHead(8, 5, MARGINS["arcface"])
    with torch.no_grad():
        full.weight.copy_(pfc.weight)
    probe = torch.randn(2, 3, 32, 32)
    m_pfc = DistillMethod("none", None, student, probe=probe, student_head=pfc)
    m_full = DistillMethod("none", None, student, probe=probe, student_head=full)
    assert m_pfc.sharded_modules() == {"head": pfc} and "head" not in m_pfc.modules()
    assert m_full.sharded_modules() == {} and m_full.modules()["head"] is full
    emb, labels = torch.randn(6, 8), torch.randint(0, 5, (6,))
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    ce_pfc = m_pfc.loss(student, {"label": labels}, e1, {})["ce"]
    ce_full = m_full.loss(student, {"label": labels}, e2, {})["ce"]
    assert float(ce_full) > 1.0 and abs(float(ce_pfc) - float(ce_full)) < 1e-5
    assert float(ce_full) == pytest.approx(float(F.cross_entropy(full(emb, labels), labels)), abs=1e-6)
    ce_pfc.backward()
    ce_full.backward()
    assert torch.allclose(e1.grad, e2.grad, atol=1e-5, rtol=0) and e2.grad.abs().max() > 1e-3
    assert torch.allclose(pfc.weight.grad, full.weight.grad, atol=1e-3, rtol=1e-5)  # |grad| ~ 200 (centres ~ 0.01)
    assert m_pfc.merge_shards([{"head": pfc.state_dict()}])["head"]["weight"].shape == (5, 8)
    assert m_pfc.meta()["partial_fc"] == 1.0 and m_pfc.meta()["loss"] == "arcface"


@pytest.mark.slow  # two torchrun processes training and diagnosing a tiny student: ~40 s on this machine
def test_distill_partial_fc_on_two_gloo_processes_writes_shards_and_the_merged_head(tiny_store, tmp_path):
    run = tmp_path / "run"
    r = _torchrun("distill", "none", "--store", tiny_store, "--out", run, "--partial-fc", "0.5", *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(run / "model.pt", weights_only=True)
    assert ck["meta"]["partial_fc"] == 0.5 and ck["meta"]["sharded"] == {"world": 2, "modules": ["head"]}
    shards = [torch.load(run / f"heads.rank{r}.pt", weights_only=True)["head"]["weight"] for r in range(2)]
    assert [s.shape[0] for s in shards] == [3, 2] and shards[0].shape[1] == 8  # 5 identities over 2 ranks
    merged = torch.load(run / "heads.pt", weights_only=True)["head"]
    assert torch.equal(merged["weight"], torch.cat(shards))
    init = torch.cat([PartialFC(8, 5, 0.5, rank=r, world=2, seed=0).weight for r in range(2)])
    assert merged["weight"].shape == init.shape
    res = json.loads((run / "result.json").read_text())
    assert res["metrics"]["train_loss"] > 0 and "diagnostics" in res  # rank 0 diagnosed with the merged head


@pytest.mark.parametrize("extra, message", [
    (["--student", "resnet18", "--student-loss", "arcface"], "is a classifier"),
    (["--student-loss", "softmax"], "needs a margin head"),
    (["--gamma", "0"], "--gamma must be > 0"),
])
def test_distill_partial_fc_refusals_are_one_line(tiny_store, tmp_path, extra, message):
    r = run_facetool("distill", "none", "--store", tiny_store, "--out", tmp_path / "run", "--partial-fc", "0.5",
                     *TINY, *extra, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "run" / "model.pt").exists()


def test_condface_method_takes_partial_fc_as_arcfaces_sharded_head():
    """CondFace trains with the ArcFace method's margin head: --partial-fc makes it the sharded PartialFC head (the
    clustering modules stay replicated) and its loss is the distributed cross-entropy."""
    from facetool.trainers.condface import CondFaceMethod

    m = CondFaceMethod(5, 8, routing_dim=6, clustering="sinkhorn", prototypes=3, partial_fc=0.5)
    assert isinstance(m.head, PartialFC) and m.sharded_modules() == {"head": m.head}
    assert "head" not in m.modules() and {"cluster_head", "prototypes"} <= set(m.modules())
    assert m.meta()["partial_fc"] == 0.5 and m.head.num_sample == 2


def test_train_condface_partial_fc_subprocess_writes_the_merged_head(tiny_store, tmp_path):
    run = tmp_path / "cf"
    r = run_facetool("train", "condface", "--store", tiny_store, "--out", run, "--variant", "dgconv", "--width", "4",
                     "--input-size", "32", "--embedding-size", "8", "--batch-size", "4", "--epochs", "1", "--no-amp",
                     "--partial-fc", "0.5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(run / "model.pt", weights_only=True)
    assert ck["meta"]["partial_fc"] == 0.5 and ck["meta"]["sharded"] == {"world": 1, "modules": ["head"]}
    merged = torch.load(run / "heads.pt", weights_only=True)["head"]["weight"]
    assert torch.equal(merged, torch.load(run / "heads.rank0.pt", weights_only=True)["head"]["weight"])
    assert merged.shape == (5, 8)
