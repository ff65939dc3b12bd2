"""CondFace k-means clustering (DeepCluster-v2, the thesis's AS5): spherical k-means known answers, the same
result from two gloo processes as from one, the memory bank and the frozen classifier in the loss, and exact
resume with the cluster state in the checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import run_facetool

from facetool.engine import EpochEnd, TrainConfig
from facetool.trainers.condface import IGNORE, CondFaceMethod, KMeansClassifier, spherical_kmeans


def _blobs(seed: int = 0, per: int = 20, dim: int = 6, k: int = 3) -> tuple[torch.Tensor, np.ndarray]:
    """k tight clusters on the sphere around orthogonal directions (shuffled)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:k]
    labels = torch.arange(k).repeat_interleave(per)
    x = centres[labels] + 0.05 * torch.randn(k * per, dim, generator=g)
    perm = torch.randperm(k * per, generator=g)
    return F.normalize(x[perm], dim=1), labels[perm].numpy()


def test_kmeans_hand_example_one_iteration():
    """2-D, k=2, rows and initial centroids chosen by hand (generator: randperm picks rows 0 and 2)."""
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(4, generator=torch.Generator().manual_seed(0))[:2].tolist()
    cent, assign, counts = spherical_kmeans(x, 2, iterations=1, generator=g)
    c0, c1 = x[pick[0]], x[pick[1]]
    # one E step by hand, then the M step: the normalised means of the rows nearer each start
    near0 = [(r @ c0) >= (r @ c1) for r in x]
    want0 = F.normalize(x[torch.tensor(near0)].mean(0), dim=0)
    want1 = F.normalize(x[~torch.tensor(near0)].mean(0), dim=0)
    torch.testing.assert_close(cent, torch.stack([want0, want1]), rtol=0, atol=1e-6)
    assert counts.sum() == 4 and assign.tolist() == (x @ cent.t()).argmax(1).tolist()


def test_kmeans_recovers_blobs_and_empty_clusters_keep_their_centroid():
    x, labels = _blobs()
    cent, assign, counts = spherical_kmeans(x, 3, generator=torch.Generator().manual_seed(1))
    from sklearn.metrics import adjusted_mutual_info_score

    assert adjusted_mutual_info_score(labels, assign.numpy()) > 0.99  # blobs this tight: found whole
    torch.testing.assert_close(cent.norm(dim=1), torch.ones(3))
    # 5 clusters for 2 distinct points: the starting rows repeat, the repeats get no rows and stay where they were
    y = F.normalize(torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3), dim=1)
    cent, assign, counts = spherical_kmeans(y, 5, generator=torch.Generator().manual_seed(0))
    assert counts.sum() == 6 and (counts == 0).sum() == 3 and cent.isfinite().all()
    torch.testing.assert_close(cent.norm(dim=1), torch.ones(5))


def _worker(rank: int, world: int, root: str, x: torch.Tensor) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    try:
        # rank 0 first so that its rows are the one-process run's first rows (the initial centroids are its rows)
        part = x[:25] if rank == 0 else x[25:]
        cent, assign, counts = spherical_kmeans(part, 4, generator=torch.Generator().manual_seed(3))
        torch.save({"cent": cent, "assign": assign, "counts": counts}, f"{root}/k{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_kmeans_on_two_gloo_processes_equals_one_process(tmp_path):
    """Sums and counts all-reduced, the start drawn on rank 0 and sent: the same centroids, assignments
    and sizes as one process on all rows (rank 0's 25 rows come first in both)."""
    x, _ = _blobs(seed=2, per=15, dim=8, k=4)
    x = F.normalize(x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5)), dim=1)  # overlapping
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp_path), x), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"k{r}.pt", weights_only=True) for r in range(2)]
    # one process: rank 0's generator picks among its 25 rows; give the one-process run the same start
    g = torch.Generator().manual_seed(3)
    start = torch.randperm(25, generator=g)[:4]
    one = _kmeans_from(x, x[start], 10)
    torch.testing.assert_close(parts[0]["cent"], one[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(parts[1]["cent"], one[0], rtol=0, atol=1e-6)
    assert torch.cat([parts[0]["assign"], parts[1]["assign"]]).tolist() == one[1].tolist()
    assert parts[0]["counts"].tolist() == parts[1]["counts"].tolist() == one[2].tolist()
    assert len(set(one[1].tolist())) > 1


def _kmeans_from(x: torch.Tensor, start: torch.Tensor, iterations: int):
    """A plain reference: Lloyd's algorithm on the sphere from given centroids, empty clusters stay."""
    cent = start.clone()
    for _ in range(iterations):
        a = (x @ cent.t()).argmax(1)
        for j in range(len(cent)):
            if (a == j).any():
                cent[j] = F.normalize(x[a == j].mean(0), dim=0)
    a = (x @ cent.t()).argmax(1)
    return cent, a, torch.bincount(a, minlength=len(cent))


def test_one_process_kmeans_equals_the_plain_reference():
    x, _ = _blobs(seed=4, per=10, dim=5, k=3)
    x = F.normalize(x + 0.4 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9)), dim=1)
    start = x[torch.randperm(30, generator=torch.Generator().manual_seed(7))[:4]]
    cent, assign, counts = spherical_kmeans(x, 4, generator=torch.Generator().manual_seed(7))
    ref = _kmeans_from(x, start, 10)
    torch.testing.assert_close(cent, ref[0], rtol=0, atol=1e-6)
    assert assign.tolist() == ref[1].tolist() and counts.tolist() == ref[2].tolist()


def test_bank_epoch_end_and_ce_to_the_frozen_centroids():
    """Epoch 0: L_cls is 0 (no centroids) and the bank fills; on_epoch_end runs k-means on it; then L_cls is
    CE((z . centroids) / 0.1, assignment) by hand, the centroids get no gradient, unseen rows are ignored."""
    torch.manual_seed(0)
    method = CondFaceMethod(3, 4, routing_dim=6, s=10.0, clustering="kmeans", prototypes=3, head="linear", lam=0.5)
    mods = method.modules()
    assert set(mods) == {"head", "cluster_head", "centroids"}
    model = torch.nn.Linear(1, 1)  # only .training is read
    routing = torch.softmax(3 * torch.randn(12, 3, 2), -1).flatten(1)
    emb = torch.randn(12, 4, requires_grad=True)
    batch = {"label": torch.randint(0, 3, (12,)), "index": torch.arange(100, 112)}
    terms = method.loss(model, batch, emb, {"routing": routing})
    assert terms["cls"].item() == 0.0 and len(method._bank) == 1
    method.on_epoch_end(EpochEnd(model, 0, torch.device("cpu"), seed=0))
    km = mods["centroids"]
    assert km.ready and km.assignments.shape == (112,) and (km.assignments[:100] == IGNORE).all()
    assert method._bank == [] and (km.assignments[100:] >= 0).all()
    model.eval()  # validation: the bank stays empty
    batch2 = {"label": batch["label"], "index": torch.tensor([100, 101, 5, 500] + list(range(104, 112)))}
    terms = method.loss(model, batch2, emb, {"routing": routing})
    with torch.no_grad():
        z = F.normalize(mods["cluster_head"](routing), dim=1)
        s = z @ km.centroids.t()
        t = km.targets(batch2["index"])
        keep = t != IGNORE
        want = 0.5 * F.cross_entropy(s[keep] / 0.1, t[keep])
    assert t[2] == IGNORE and t[3] == IGNORE and keep.sum() == 10
    assert terms["cls"].item() == pytest.approx(want.item(), rel=1e-6) and method._bank == []
    assert not any(p.requires_grad for p in km.parameters()) and len(list(km.buffers())) == 2


def test_kmeans_classifier_state_loads_into_a_fresh_one():
    km = KMeansClassifier(3, 4)
    km.set(torch.randn(3, 4), torch.tensor([2, IGNORE, 0, 1]))
    fresh = KMeansClassifier(3, 4)
    fresh.load_state_dict(km.state_dict())
    assert torch.equal(fresh.centroids, km.centroids) and fresh.assignments.tolist() == [2, IGNORE, 0, 1]
    assert fresh.targets(torch.tensor([0, 1, 3, 9])).tolist() == [2, IGNORE, 1, IGNORE]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from facetool.data.synthetic import prepare_synthetic

    path, _ = prepare_synthetic(tmp_path_factory.mktemp("km") / "s.h5", identities=4, per_identity=6, size=32, seed=0)
    return path


def _train(store, out, **kw):
    from facetool.trainers.condface import train_condface

    cfg = TrainConfig(out=out, epochs=3, batch_size=8, lr=0.05, verbose=False, **kw)
    return train_condface(store, cfg, variant="dc", clustering="kmeans", prototypes=3, head="identity", width=4,
                          input_size=32, embedding_size=8, pair_eval=False)


def test_interrupted_kmeans_run_resumes_to_identical_weights_and_cluster_state(tiny_store, tmp_path):
    """max_steps 3 stops inside epoch 2 (2 steps per epoch): the bank of that epoch's first step, the k-means
    state of epoch 1 and everything else come from last.pt, so the resumed run equals the uninterrupted one."""
    from facetool.models import load_model

    full = _train(tiny_store, tmp_path / "a")
    _train(tiny_store, tmp_path / "b", max_steps=3)
    st = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert st["method_state"][0]["bank_index"].shape == (8,) and st["heads"]["centroids.assignments"].numel()
    resumed = _train(tiny_store, tmp_path / "b", resume=True)
    a, b = load_model(tmp_path / "a" / "model.pt"), load_model(tmp_path / "b" / "model.pt")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    ha = torch.load(tmp_path / "a" / "heads.pt", weights_only=True)
    hb = torch.load(tmp_path / "b" / "heads.pt", weights_only=True)
    assert torch.equal(ha["centroids"]["centroids"], hb["centroids"]["centroids"])
    assert torch.equal(ha["centroids"]["assignments"], hb["centroids"]["assignments"])
    assert (ha["centroids"]["assignments"] >= 0).sum() == 16  # the train split's 16 rows, every one assigned
    assert resumed["train_cls"] == pytest.approx(full["train_cls"], abs=0) and full["train_cls"] > 0
    assert full["kmeans_clusters"] >= 2 and a.meta["clustering"] == "kmeans" and a.meta["prototypes"] == 3
    rows = [json.loads(r) for r in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train_cls"] == 0.0 and rows[1]["train_cls"] > 0  # epoch 1 trains L_fr alone


def test_cli_trains_kmeans_and_the_model_exports(tiny_store, tmp_path):
    r = run_facetool("train", "condface", "--store", tiny_store, "--out", tmp_path / "run", "--variant", "dgconv",
                     "--clustering", "kmeans", "--prototypes", "4", "--cluster-head", "mlp", "--width", "4",
                     "--input-size", "32", "--embedding-size", "8", "--epochs", "2", "--batch-size", "8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    heads = torch.load(tmp_path / "run" / "heads.pt", weights_only=True)
    assert heads["centroids"]["centroids"].shape == (4, 96)
    r = run_facetool("export", "--model", tmp_path / "run" / "model.pt", "--out", tmp_path / "m.onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_cli_batch_smaller_than_prototypes_under_sinkhorn_is_a_warning_not_a_refusal(tiny_store, tmp_path):
    r = run_facetool("train", "condface", "--store", tiny_store, "--out", tmp_path / "run", "--variant", "dc",
                     "--clustering", "sinkhorn", "--prototypes", "20", "--width", "4", "--input-size", "32",
                     "--embedding-size", "8", "--epochs", "1", "--max-steps", "2", "--batch-size", "8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("smaller than --prototypes 20") == 1 and (tmp_path / "run" / "model.pt").is_file()


def test_condface_recipes_dry_run_and_hold_the_four_rows():
    """Both CondFace recipes parse (--dry-run) and train BL, DC, AS4 (Sinkhorn) and CondFace (k-means) with one
    schedule; the thesis one uses the thesis's settings (batch 512, lr 0.1 /10 at 16,20,24,28 of 32, P 300)."""
    from pathlib import Path

    from facetool.recipe import load_recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    for name in ("condface_synthetic", "thesis_condface"):
        r = run_facetool("recipe", root / f"{name}.toml", "--dry-run")
        assert r.returncode == 0, r.stderr
        _, steps = load_recipe(root / f"{name}.toml")
        lines = [" ".join(s.argv) for s in steps]
        trains = [s for s in lines if s.startswith("train ")]
        assert any(s.startswith("train arcface") and "--loss cosface" in s for s in trains)
        assert any("--variant dc " in s for s in trains)
        assert any("--clustering sinkhorn" in s and "--variant dgconv" in s for s in trains)
        assert any("--clustering kmeans" in s and "--variant dgconv" in s for s in trains)
        if name == "thesis_condface":
            for s in trains[:4]:
                assert "--epochs 32 --batch-size 512 --lr 0.1 --schedule step --milestones 16,20,24,28" in s, s
            assert all("--prototypes 300" in s for s in trains if "--clustering" in s)
            assert any("--lambda 0.1" in s and "ms1mv3" in s for s in trains)
