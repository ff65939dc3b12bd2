"""`facetool train condface` (thesis ch. 5): CosFace on a CondFace model through train arcface's recipe, the
routing temperature schedule, and the Sinkhorn prototype loss on the routing vectors (Eqs. 5.4-5.6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import run_facetool

from facetool.errors import FacetoolError
from facetool.models import create_model
from facetool.trainers.condface import (CondFaceMethod, condface_network, parse_temperature, routing_dim, sinkhorn,
                                        temperature_at)

TINY = ["--width", "4", "--input-size", "32", "--embedding-size", "8", "--epochs", "1", "--max-steps", "2",
        "--batch-size", "8"]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from facetool.data.synthetic import prepare_synthetic

    path, _ = prepare_synthetic(tmp_path_factory.mktemp("cf") / "s.h5", identities=4, per_identity=6, size=32, seed=0)
    return path


def test_train_dc_writes_a_model_that_info_and_export_read(tiny_store, tmp_path):
    r = run_facetool("train", "condface", "--store", tiny_store, "--out", tmp_path / "run", "--variant", "dc",
                     "--network", "r18", "--routing-temperature", "30:1", *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    model_pt = tmp_path / "run" / "model.pt"
    ck = torch.load(model_pt, weights_only=True)
    assert ck["config"]["name"] == "condface_dc_ir18" and ck["config"]["temperature"] == 1.0
    assert ck["meta"]["method"] == "condface" and ck["meta"]["loss"] == "cosface"
    assert ck["meta"]["routing_temperature"] == [30.0, 1.0] and ck["meta"]["routing_dim"] == 24
    r = run_facetool("info", model_pt, cwd=tmp_path)
    assert r.returncode == 0 and "condface_dc_ir18" in r.stdout, r.stderr
    r = run_facetool("export", "--model", model_pt, "--out", tmp_path / "m.onnx", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "m.onnx").stat().st_size > 0, r.stderr


@pytest.mark.parametrize("argv,option", [
    (["--variant", "dynamic"], "--variant"),
    (["--prototypes", "1", "--clustering", "sinkhorn"], "--prototypes"),
    (["--clustering", "sinkhorn", "--cluster-head", "transformer"], "--cluster-head"),
    (["--clustering", "kmeanz"], "--clustering"),
    (["--routing-temperature", "30"], "--routing-temperature"),
    (["--routing-temperature", "30:-1"], "--routing-temperature"),
    (["--network", "mbf"], "--network"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_store, tmp_path, argv, option):
    r = run_facetool("train", "condface", "--store", tiny_store, "--out", tmp_path / "run", *argv, *TINY, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and option in lines[0], r.stderr
    assert not (tmp_path / "run").exists()


def test_names_and_temperature_schedule():
    assert condface_network("dc", "r18") == "condface_dc_ir18" and condface_network("dgconv", "r50") == "condface_ir50"
    assert parse_temperature("30:1") == (30.0, 1.0) and parse_temperature("") is None
    for bad in ("30", "a:b", "0:1", "1:inf", "1:2:3", "nan:1"):
        with pytest.raises(FacetoolError, match="--routing-temperature"):
            parse_temperature(bad)
    assert [temperature_at((30.0, 1.0), e, 3) for e in range(3)] == [30.0, 15.5, 1.0]
    assert temperature_at((30.0, 1.0), 0, 1) == 30.0
    model = create_model("condface_ir18", embedding_size=8, input_size=32, width=4)
    method = CondFaceMethod(4, 8, routing_dim=routing_dim(model), temperature=(30.0, 1.0), epochs=3)
    method.start_epoch(model, 1)
    assert {b.router.temperature for b in model.routing_blocks()} == {15.5}
    assert routing_dim(model) == 96


def test_engine_calls_start_epoch_every_epoch(tiny_store, tmp_path):
    """The temperature schedule runs through the engine's per-epoch hook: epoch e's steps see temperature_at(e)."""
    from facetool.engine import TrainConfig
    from facetool.trainers.condface import train_condface

    seen = []
    orig = CondFaceMethod.loss

    def spy(self, model, batch, out, internals):
        seen.append(model.routing_blocks()[0].router.temperature)
        return orig(self, model, batch, out, internals)

    CondFaceMethod.loss = spy
    try:
        cfg = TrainConfig(out=tmp_path / "run", epochs=3, batch_size=16, verbose=False)
        train_condface(tiny_store, cfg, variant="dc", temperature=(9.0, 1.0), width=4, input_size=32, embedding_size=8,
                       pair_eval=False)
    finally:
        CondFaceMethod.loss = orig
    assert sorted(set(seen), reverse=True) == [9.0, 5.0, 1.0] and seen[0] == 9.0 and seen[-1] == 1.0


def test_sinkhorn_loss_terms_and_one_step_moves_the_prototypes(capsys):
    torch.manual_seed(0)
    for head in ("identity", "linear", "mlp"):
        method = CondFaceMethod(3, 4, routing_dim=6, s=10.0, clustering="sinkhorn", prototypes=5, head=head, lam=0.5)
        mods = method.modules()
        assert set(mods) == {"head", "cluster_head", "prototypes"}
        routing = torch.softmax(torch.randn(8, 3, 2), -1).flatten(1)  # 3 groups of 2 experts
        emb = torch.randn(8, 4, requires_grad=True)
        batch = {"label": torch.randint(0, 3, (8,))}
        terms = method.loss(None, batch, emb, {"routing": routing})
        assert list(terms) == ["ce", "cls"] and all(torch.isfinite(t) for t in terms.values())
        # L_cls by hand: CE(softmax(cos / 0.1), Sinkhorn(cos, .05, 3)) of the normalised head outputs and prototypes
        with torch.no_grad():
            z = F.normalize(mods["cluster_head"](routing), dim=1)
            s = z @ F.normalize(mods["prototypes"].weight, dim=1).t()
            q = sinkhorn(s, 0.05, 3)
            want = 0.5 * -(q * F.log_softmax(s / 0.1, 1)).sum(1).mean()
        assert terms["cls"].item() == pytest.approx(want.item(), rel=1e-5)
        before = mods["prototypes"].weight.detach().clone()
        params = [p for m in mods.values() for p in m.parameters()]
        opt = torch.optim.SGD(params, lr=0.5)
        terms["cls"].backward()
        opt.step()
        assert not torch.equal(before, mods["prototypes"].weight.detach())
    assert "note:" not in capsys.readouterr().err  # batch 8 >= 5 prototypes
    method = CondFaceMethod(3, 4, routing_dim=6, clustering="sinkhorn", prototypes=20, head="identity")
    for _ in range(2):
        method.loss(None, batch, emb, {"routing": routing})
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "--prototypes 20" in err  # a warning, once; not a refusal


def test_method_refuses_bad_settings():
    with pytest.raises(FacetoolError, match="--prototypes"):
        CondFaceMethod(3, 4, routing_dim=6, clustering="sinkhorn", prototypes=1)
    with pytest.raises(FacetoolError, match="--cluster-head"):
        CondFaceMethod(3, 4, routing_dim=6, clustering="sinkhorn", head="deep")
    with pytest.raises(FacetoolError, match="--clustering"):
        CondFaceMethod(3, 4, routing_dim=6, clustering="em")
    with pytest.raises(FacetoolError, match="--variant"):
        condface_network("cond", "r18")
