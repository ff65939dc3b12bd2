"""`facetool dissect routing` (CondFace, thesis Table 5.1): routing vectors or BL features, k-means, purity/AMI
against the cohort code and each attribute, the table, CSV/JSON and plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_facetool

from facetool.errors import FacetoolError
from facetool.explainers.routing import (bl_stages, kmeans, model_vectors, own_assignments, parse_clusters,
                                         score_clustering, store_targets)
from facetool.models import create_model

TINY = ["--width", "4", "--input-size", "32", "--embedding-size", "8", "--epochs", "1", "--max-steps", "2",
        "--batch-size", "8"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from facetool.data.synthetic import prepare_synthetic

    path, _ = prepare_synthetic(tmp_path_factory.mktemp("dr") / "s.h5", identities=6, per_identity=10, size=32, seed=0)
    return path


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """A CondFace model trained with Sinkhorn clustering and a BL (IR-18), both by `facetool train`."""
    d = tmp_path_factory.mktemp("runs")
    r = run_facetool("train", "condface", "--store", store, "--out", d / "cf", "--variant", "dgconv", "--clustering",
                     "sinkhorn", "--prototypes", "4", *TINY, cwd=d)
    assert r.returncode == 0, r.stderr
    r = run_facetool("train", "arcface", "--store", store, "--out", d / "bl", "--network", "r18", *TINY, cwd=d)
    assert r.returncode == 0, r.stderr
    return d / "cf" / "model.pt", d / "bl" / "model.pt"


@pytest.mark.parametrize("t,p,purity,ami", [
    ([0, 0, 1, 1, 2, 2], [2, 2, 0, 0, 1, 1], 1.0, 1.0),  # a permutation
    ([0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0], 1 / 3, 0.0),  # one cluster
    ([0, 0, 1, 1, 2, 2], [0, 1, 2, 3, 4, 5], 1.0, 0.0),  # singletons
    ([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2], 0.833333, 0.298792),
    ([0, 0, 1, 1], [0, 1, 0, 1], 0.5, -0.5),
])
def test_reference_purity_and_ami_through_the_routing_scores(t, p, purity, ami):
    """REFERENCE's purity/AMI examples (sklearn 'arithmetic'), through the scoring dissect routing uses,
    in % in the table rows (score_clustering -> cluster_scores)."""
    sc = score_clustering(np.array(p), {"cohort": np.array(t)})["cohort"]
    assert sc["purity"] == pytest.approx(purity, abs=1e-6) and sc["ami"] == pytest.approx(ami, abs=1e-6)
    assert sc["images"] == len(t)


def test_unknown_targets_are_left_out():
    sc = score_clustering(np.array([0, 0, 1, 1, 5]), {"a": np.array([0, 0, 1, 1, -1]), "b": np.full(5, -1)})
    assert sc["a"]["purity"] == 1.0 and sc["a"]["images"] == 4
    assert sc["b"]["images"] == 0 and np.isnan(sc["b"]["purity"])


@pytest.mark.parametrize("name,kw,stages,dim", [
    ("iresnet18", {"width": 64}, ["layer2", "layer3", "layer4"], 128 + 256 + 512),  # the thesis's 896-d BL input
    ("resnet18", {"width": 8, "num_classes": 3}, ["layer2", "layer3", "layer4"], 16 + 32 + 64),
    ("mobilefacenet", {}, ["conv2_dw", "blocks", "conv_sep"], None),
])
def test_bl_features_are_the_gap_of_the_last_three_stages(name, kw, stages, dim):
    torch.manual_seed(0)
    model = create_model(name, input_size=32 if name != "mobilefacenet" else 112, **kw).eval()
    x = torch.randn(2, 3, model.config["input_size"], model.config["input_size"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model(x)
    assert bl_stages(model) == stages
    v = model_vectors(model, x)
    # by hand: each stage's output pooled over space, concatenated in forward order
    outs = {}
    hs = [model.get_layer(n).register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o)) for n in stages]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    want = torch.cat([outs[n].mean((2, 3)) for n in stages], 1)
    assert v.shape == want.shape and torch.allclose(v, want, atol=1e-6)
    if dim is not None:
        assert v.shape == (2, dim)
    assert torch.equal(model(x), ref) and all(torch.equal(before[k], t) for k, t in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


def test_condface_vectors_are_its_routing():
    model = create_model("condface_ir18", embedding_size=8, input_size=32, width=4).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        _, internals = model(x, return_internals=True)
    v = model_vectors(model, x)
    assert v.shape == (3, 96) and torch.equal(v, internals["routing"])


def test_kmeans_finds_separated_groups_deterministically():
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:4] * 5
    truth = np.repeat(np.arange(4), 25)
    x = centres[truth] + rng.normal(0, 0.1, (100, 8))
    for spherical in (True, False):
        a = kmeans(x, 4, seed=1, spherical=spherical)
        assert score_clustering(a, {"t": truth})["t"]["ami"] == pytest.approx(1.0)
        assert np.array_equal(a, kmeans(x, 4, seed=1, spherical=spherical))
    # duplicates: as many clusters as rows still works (no NaN centroid, every label in range)
    dup = np.repeat(np.eye(3), 2, axis=0)
    lab = kmeans(dup, 6, seed=0)
    assert lab.min() >= 0 and lab.max() < 6 and score_clustering(lab, {"t": np.repeat(np.arange(3), 2)})["t"]["purity"] == 1.0
    with pytest.raises(FacetoolError, match="clusters"):
        kmeans(x[:3], 4)


def test_parse_clusters():
    assert parse_clusters("30,300,1000") == [30, 300, 1000] and parse_clusters("5, 5,2") == [5, 2]
    for bad, msg in (("1", ">= 2"), ("a,b", "comma list"), ("", "at least one"), ("0,5", ">= 2")):
        with pytest.raises(FacetoolError, match=msg):
            parse_clusters(bad)
    with pytest.raises(FacetoolError, match="more than the 12 images"):
        parse_clusters("5,13", 12)


def test_cohort_targets_of_a_synthetic_store_are_the_cohort_code(store):
    from facetool.eval.clusters import cohort_codes, cohort_parts

    rows = np.array([0, 3, 7, 20, 41, 59])
    targets, used, notes = store_targets(store, rows)
    assert used == ["age", "gender", "race", "pitch", "yaw"] and list(targets) == ["cohort", *used]
    assert np.array_equal(targets["cohort"], cohort_codes(store)[rows])
    parts = cohort_parts(store)
    assert all(np.array_equal(targets[p], parts[p][rows]) for p in used)
    assert any("group" in n for n in notes)


def test_a_store_without_pose_uses_what_is_there(tmp_path):
    """CelebA-like: no pose, no gender but the binary 'Male': the cohort is age x gender x race (3*2*5),
    gender from Male, and the notes say both."""
    from facetool.store import Record, StoreWriter

    ages = ["0-2", "20-29", "70+"]
    races = ["Black", "White", "Indian"]
    w = StoreWriter(tmp_path / "c.h5", image_size=(16, 16), identities=["a", "b"],
                    attribute_values={"Male": ["no", "yes"], "age": ages, "race": races})
    spec = [(0, 1, 0), (1, 0, 1), (2, 1, 2), (1, -1, 0)]  # (age, Male, race) codes
    for i, (a, m, r) in enumerate(spec):
        w.append(Record(np.zeros((16, 16, 3), np.uint8), i % 2, attributes={"age": a, "Male": m, "race": r}))
    w.finalize()
    targets, used, notes = store_targets(tmp_path / "c.h5", np.arange(4))
    assert used == ["age", "gender", "race"]
    # age 0-2 -> 0, 20-29 -> 1, 70+ -> 2; Male no -> 0, yes -> 1; Black 0, White 4, Indian 2
    want = [(0 * 2 + 1) * 5 + 0, (1 * 2 + 0) * 5 + 4, (2 * 2 + 1) * 5 + 2, -1]
    assert targets["cohort"].tolist() == want and targets["gender"].tolist() == [1, 0, 1, -1]
    assert any("pitch, yaw" in n and "age x gender x race" in n for n in notes)
    assert any("'Male'" in n for n in notes)


def test_own_classifier_assignments_are_the_argmax_cosine(tmp_path):
    """The classifier of a clustering-trained model: heads.pt's cluster head then prototypes, argmax cosine."""
    from facetool.io import torch_save
    from facetool.trainers.condface import cluster_head

    torch.manual_seed(0)
    model = create_model("condface_dc_ir18", embedding_size=8, input_size=32, width=4)
    head, protos = cluster_head("linear", 24), torch.nn.Linear(24, 5, bias=False)
    torch_save({"head": {}, "cluster_head": head.state_dict(), "prototypes": protos.state_dict()}, tmp_path / "heads.pt")
    model.meta = {"clustering": "sinkhorn", "cluster_head": "linear"}
    beta = torch.softmax(torch.randn(20, 6, 4), -1).flatten(1)
    label, got = own_assignments(tmp_path / "model.pt", model, beta.numpy())
    with torch.no_grad():
        want = (F.normalize(head(beta), dim=1) @ F.normalize(protos.weight, dim=1).t()).argmax(1).numpy()
    assert label == "sinkhorn, P=5" and np.array_equal(got, want)
    # k-means (train condface --clustering kmeans): frozen L2-normalised centroids in heads.pt["centroids"]
    cent = F.normalize(torch.randn(7, 24), dim=1)
    torch_save({"cluster_head": head.state_dict(), "centroids": {"centroids": cent, "assignments": torch.zeros(3).long()}},
               tmp_path / "heads.pt")
    model.meta = {"clustering": "kmeans", "cluster_head": "linear"}
    label, got = own_assignments(tmp_path / "model.pt", model, beta.numpy())
    with torch.no_grad():
        want = (F.normalize(head(beta), dim=1) @ cent.t()).argmax(1).numpy()
    assert label == "kmeans, P=7" and np.array_equal(got, want)
    torch_save({"centroids": {"centroids": torch.zeros(7, 24)}}, tmp_path / "heads.pt")  # never fitted
    notes: list[str] = []
    assert own_assignments(tmp_path / "model.pt", model, beta.numpy(), notes) is None and "never fitted" in notes[0]
    model.meta = {"clustering": "none"}
    assert own_assignments(tmp_path / "model.pt", model, beta.numpy()) is None
    model.meta = {"clustering": "kmeans"}
    (tmp_path / "heads.pt").unlink()
    with pytest.raises(FacetoolError, match="heads.pt"):
        own_assignments(tmp_path / "model.pt", model, beta.numpy())


def test_dissect_routing_on_trained_condface_and_bl(trained, store, tmp_path):
    """`train condface` + `train arcface` wrote the models; `dissect routing --compare BL` scores both."""
    cf, bl = trained
    out = tmp_path / "dr"
    r = run_facetool("dissect", "routing", "--model", cf, "--compare", bl, "--store", store, "--clusters", "3,6",
                     "--split", "all", "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "purity/AMI" in r.stdout and "cohort = age x gender x race x pitch x yaw" in r.stdout
    res = json.loads((out / "routing.json").read_text())
    assert res["images"] == 60 and res["clusters"] == [3, 6]
    models = res["models"]
    assert [m["dim"] for m in models.values()] == [96, 8 + 16 + 32]  # beta of AS4; the BL's GAP at width 4
    rows = [(x["model"], x["clustering"]) for x in res["rows"]]
    assert rows == [("cf_model", "k-means 3"), ("cf_model", "k-means 6"), ("cf_model", "own (sinkhorn, P=4)"),
                    ("bl_model", "k-means 3"), ("bl_model", "k-means 6")]
    for x in res["rows"]:
        assert 0 <= x["cohort_purity"] <= 100 and -100 <= x["cohort_ami"] <= 100
        assert x["scores"]["cohort"]["images"] == 60
    csv = (out / "routing.csv").read_text().splitlines()
    assert csv[0].startswith("model,clustering,clusters,cohort_purity,cohort_ami,age_purity") and len(csv) == 6
    for f in ("tsne_cf_model.png", "clusters_cf_model.png", "tsne_bl_model.png", "clusters_bl_model.png"):
        assert (out / f).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("clusters,msg", [("1", ">= 2"), ("5,13", "more than the 12 images")])
def test_bad_cluster_counts_are_one_line_and_exit_2(trained, store, tmp_path, clusters, msg):
    r = run_facetool("dissect", "routing", "--model", trained[0], "--store", store, "--clusters", clusters,
                     "--out", tmp_path / "o", cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--clusters" in lines[0] and msg in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


# -- invert --routing-prior (thesis Table 5.3) ---------------------------------------------------------
def test_invert_routing_prior_compares_with_and_without(trained, store, tmp_path):
    """`invert --routing-prior` on the CondFace model `train condface` wrote: the same faces are inverted
    without and with the prior, and metrics.json + the table compare SSIM, judge cosine and pair accuracy.
    (--no-bn-prior: a 2-step model's eval-mode activations reach 1e22, the BN prior overflows.)"""
    cf, bl = trained
    out = tmp_path / "inv"
    r = run_facetool("invert", "--model", cf, "--images", store, "--limit", 4, "--batch", 4, "--iterations", 3,
                     "--routing-prior", 10, "--judge", bl, "--pairs", "--no-bn-prior", "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "routing prior (thesis Table 5.3)" in r.stdout and "with routing prior 10" in r.stdout
    met = json.loads((out / "metrics.json").read_text())
    cmp = met["routing_prior_comparison"]
    assert cmp["weight"] == 10.0
    for side in ("without", "with"):
        assert cmp[side]["images"] == 4
        assert all(np.isfinite(cmp[side][k]) for k in ("ssim", "cosine_model", "cosine_judge", "pair_accuracy"))
    assert cmp["with"]["ssim"] == met["ssim"] and cmp["with"]["pair_accuracy"] == met["pair_accuracy"]
    # the prior is a term of the second inversion only
    assert "routing" in cmp["with"]["final_loss"] and "routing" not in cmp["without"]["final_loss"]
    assert cmp["with"]["final_loss"] == met["final_loss"] and set(cmp["without"]["final_loss"]) == {"id", "tv_l2", "l2", "total"}
    assert not list((out / "state").rglob("state-*.pt"))  # both runs' resume states are cleaned up


def test_invert_routing_prior_without_routing_is_refused_before_any_work(trained, store, tmp_path, cli, monkeypatch):
    import facetool.explainers.invert as inv

    def no_work(*a, **k):
        raise AssertionError("read the faces before refusing --routing-prior")

    monkeypatch.setattr(inv, "load_inputs", no_work)
    out = tmp_path / "inv"
    r = cli("invert", "--model", trained[1], "--images", store, "--routing-prior", 1, "--out", out)
    assert r.exit_code == 2 and "--routing-prior needs a model with routing vectors" in r.output, r.output
    assert not (out / "metrics.json").exists()
    monkeypatch.undo()
    # a CondFace model, but embeddings only: no target routing vectors
    import h5py

    emb = tmp_path / "e.h5"
    with h5py.File(emb, "w") as f:
        f["embeddings"] = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)
    r = run_facetool("invert", "--model", trained[0], "--embeddings", emb, "--routing-prior", 1, "--out",
                     tmp_path / "e", cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--routing-prior needs --images" in lines[0], r.stderr
