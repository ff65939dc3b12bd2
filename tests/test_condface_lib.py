"""CondFace's library surface: SwAV's Sinkhorn, cluster purity/AMI and the thesis's cohort code, with the
known answers of REFERENCE.md (CondFace, Acceptance)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

import facetool
from facetool.errors import FacetoolError
from facetool.eval.clusters import (NUM_COHORTS, cluster_purity, cluster_scores, cohort_codes, cohort_digits,
                                    cohort_parts)
from facetool.trainers.condface import sinkhorn

SCORES = [[.9, .1], [.8, .2], [.7, .3], [.6, .4]]
ANSWER = [[.997527, .002473], [.880797, .119203], [.119203, .880797], [.002473, .997527]]  # sigmoid(+-6), (+-2)


def swav_sinkhorn(out: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """SwAV's ``distributed_sinkhorn`` as written (one process, no max subtraction), in float64."""
    q = torch.exp(out.double() / eps).t()
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def test_sinkhorn_known_answer_rows_and_columns():
    q = sinkhorn(np.array(SCORES))
    assert isinstance(q, np.ndarray) and q.dtype == np.float64
    np.testing.assert_allclose(q, ANSWER, atol=1e-6)
    np.testing.assert_allclose(q.sum(1), 1, atol=1e-12)
    np.testing.assert_allclose(q.sum(0), [2, 2], atol=1e-9)
    t = sinkhorn(torch.tensor(SCORES))  # float32 tensor in, float32 tensor out
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), ANSWER, atol=1e-6)
    h = sinkhorn(torch.tensor(SCORES, dtype=torch.float16))  # half scores are computed in float32
    assert h.dtype == torch.float32 and torch.isfinite(h).all()


def test_sinkhorn_equal_scores_give_one_over_k_and_a_global_shift_changes_nothing():
    np.testing.assert_allclose(sinkhorn(np.full((5, 3), 0.4)), 1 / 3, atol=1e-12)
    rng = np.random.default_rng(0)
    s = rng.uniform(-1, 1, (8, 5))
    q = sinkhorn(s)
    assert np.abs(sinkhorn(s + 0.73) - q).max() <= 1e-12
    # a per-sample shift does change Q: so a per-sample max subtraction would be wrong
    shifted = s.copy()
    shifted[0] += 0.5
    assert np.abs(sinkhorn(shifted) - q).max() > 1e-3


def test_sinkhorn_equals_swav_and_does_not_overflow():
    rng = np.random.default_rng(1)
    s = torch.from_numpy(rng.uniform(-1, 1, (16, 6)))
    for iters in (1, 3, 5):
        torch.testing.assert_close(sinkhorn(s, 0.05, iters), swav_sinkhorn(s, 0.05, iters), rtol=0, atol=1e-12)
    torch.testing.assert_close(sinkhorn(s.float()).double(), swav_sinkhorn(s), rtol=0, atol=1e-5)
    big = s.float() + 9.0  # exp(s / 0.05) overflows float32 here without the max subtraction
    assert not torch.isfinite(torch.exp(big / 0.05)).all()
    torch.testing.assert_close(sinkhorn(big).double(), swav_sinkhorn(s), rtol=0, atol=1e-5)


@pytest.mark.parametrize("scores,kw,msg", [
    ([1.0, 2.0], {}, "B x K"), (np.zeros((0, 3)), {}, "B x K"), ([[np.nan, 1.0]], {}, "finite"),
    ([[1.0, 2.0]], {"epsilon": 0.0}, "epsilon"), ([[1.0, 2.0]], {"epsilon": float("inf")}, "epsilon"),
    ([[1.0, 2.0]], {"iterations": 0}, "iterations"), ([[1.0, 2.0]], {"iterations": 1.5}, "iterations"),
])
def test_sinkhorn_refuses_bad_input_in_one_line(scores, kw, msg):
    with pytest.raises(FacetoolError, match=msg):
        sinkhorn(scores, **kw)


def _worker(rank: int, world: int, root: str, scores: np.ndarray) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    try:
        part = np.array_split(scores, world)[rank]
        np.save(f"{root}/q{rank}.npy", sinkhorn(torch.from_numpy(part)).numpy())
    finally:
        dist.destroy_process_group()


def test_sinkhorn_on_two_gloo_processes_equals_one_process_on_the_whole_batch(tmp_path):
    """Under DDP the total, the prototype sums and the max are all-reduced and B counts every rank."""
    s = np.random.default_rng(2).uniform(-1, 1, (10, 4))
    s[7] += 0.4  # the largest scores on rank 1 only: the max must be one global scalar
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp_path), s), nprocs=2, join=True)
    q = np.concatenate([np.load(tmp_path / f"q{r}.npy") for r in range(2)])
    np.testing.assert_allclose(q, sinkhorn(s), rtol=0, atol=1e-12)


T = [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("t,p,purity,ami,nmi", [
    (T, [2, 2, 0, 0, 1, 1], 1.0, 1.0, 1.0),  # a permutation of the labels
    (T, [0] * 6, 1 / 3, 0.0, 0.0),  # one cluster
    (T, [0, 1, 2, 3, 4, 5], 1.0, 0.0, 0.760188),  # singletons: pure, but no information beyond chance
    ([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2], 0.833333, 0.298792, None),
    ([0, 0, 1, 1], [0, 1, 0, 1], 0.5, -0.5, 0.0),
])
def test_cluster_scores_known_answers(t, p, purity, ami, nmi):
    got = cluster_scores(t, p)
    assert set(got) == {"purity", "ami", "nmi"}
    assert got["purity"] == pytest.approx(purity, abs=1e-6) == cluster_purity(t, p)
    assert got["ami"] == pytest.approx(ami, abs=1e-6)
    if nmi is not None:
        assert got["nmi"] == pytest.approx(nmi, abs=1e-6)


def test_ami_is_the_arithmetic_average_not_max():
    from sklearn.metrics import adjusted_mutual_info_score

    t, p = [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]
    assert adjusted_mutual_info_score(t, p, average_method="max") == pytest.approx(0.225042, abs=1e-6)
    assert cluster_scores(t, p)["ami"] == pytest.approx(0.298792, abs=1e-6)


def test_unknown_true_labels_are_left_out_and_bad_labels_refused():
    t, p = [0, 0, -1, 1, 1, -1], [0, 0, 0, 1, 1, 1]
    assert cluster_scores(t, p) == cluster_scores([0, 0, 1, 1], [0, 0, 1, 1])
    with pytest.raises(FacetoolError, match="one length"):
        cluster_purity([0, 1], [0])
    with pytest.raises(FacetoolError, match="unknown"):
        cluster_purity([-1, -1], [0, 1])
    with pytest.raises(FacetoolError, match="integers"):
        cluster_purity([0.5, 1], [0, 1])


FAIRFACE_AGE = ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70"]
FAIRFACE_RACE = ["White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern"]


def test_cohort_code_with_fairface_vocabularies():
    n = 9
    parts = cohort_parts(age=np.arange(n), gender=np.arange(n) % 2, race=np.arange(n) % 7,
                         yaw=[-31, -30, 0, 30, 31, np.nan, 0, 0, 0], pitch=[-45, 45, 0, 0, 0, 0, 0, np.nan, 0],
                         vocab={"age": FAIRFACE_AGE, "gender": ["Male", "Female"], "race": FAIRFACE_RACE})
    assert parts["age"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert parts["gender"].tolist() == [1, 0, 1, 0, 1, 0, 1, 0, 1]  # FairFace's vocabulary is Male, Female
    assert parts["race"].tolist() == [4, 0, 3, 1, 1, 2, 4, 4, 0]  # White & Middle Eastern 4; E & SE Asian 1
    assert parts["yaw"].tolist() == [0, 2, 2, 2, 1, -1, 2, 2, 2]  # < -30: 0, > 30: 1, else 2
    assert parts["pitch"].tolist() == [0, 1, 2, 2, 2, 2, 2, -1, 2]
    codes = cohort_codes(age=np.arange(n), gender=np.arange(n) % 2, race=np.arange(n) % 7,
                         yaw=[-31, -30, 0, 30, 31, np.nan, 0, 0, 0], pitch=[-45, 45, 0, 0, 0, 0, 0, np.nan, 0],
                         vocab={"age": FAIRFACE_AGE, "gender": ["Male", "Female"], "race": FAIRFACE_RACE})
    # ((((age * 2 + gender) * 5 + race) * 3 + pitch) * 3 + yaw
    assert codes.tolist() == [(((0 * 2 + 1) * 5 + 4) * 3 + 0) * 3 + 0, (((0 * 2 + 0) * 5 + 0) * 3 + 1) * 3 + 2,
                              (((0 * 2 + 1) * 5 + 3) * 3 + 2) * 3 + 2, (((1 * 2 + 0) * 5 + 1) * 3 + 2) * 3 + 2,
                              (((1 * 2 + 1) * 5 + 1) * 3 + 2) * 3 + 1, -1, (((2 * 2 + 1) * 5 + 4) * 3 + 2) * 3 + 2,
                              -1, (((2 * 2 + 1) * 5 + 0) * 3 + 2) * 3 + 2]
    assert cohort_digits(int(codes[0])) == "01400" and cohort_digits(-1) == "-" and NUM_COHORTS == 270
    # strings work as well as codes; unknown codes and values give -1; all 270 cohorts are reachable
    s = cohort_codes(age=["20-29", "unknown"], gender=["Female", "Male"], race=["Indian", "Black"],
                     yaw=[0, 0], pitch=[0, 0])
    assert s.tolist() == [(((1 * 2 + 0) * 5 + 2) * 3 + 2) * 3 + 2, -1]
    grid = np.stack(np.meshgrid(*[np.arange(k) for k in (9, 2, 7, 3, 3)], indexing="ij")).reshape(5, -1)
    deg = np.array([-40.0, 40.0, 0.0])
    every = cohort_codes(age=grid[0], gender=grid[1], race=grid[2], pitch=deg[grid[3]], yaw=deg[grid[4]],
                         vocab={"age": FAIRFACE_AGE, "gender": ["Male", "Female"], "race": FAIRFACE_RACE})
    assert set(every.tolist()) == set(range(270))
    assert cohort_codes(age=[-1], gender=[0], race=[0], yaw=[0], pitch=[0],
                        vocab={"age": FAIRFACE_AGE, "gender": ["Male", "Female"], "race": FAIRFACE_RACE})[0] == -1


def test_cohort_code_refuses_what_it_cannot_place():
    with pytest.raises(FacetoolError, match="cannot place race value 'Martian'"):
        cohort_codes(age=["20-29"], gender=["male"], race=["Martian"], yaw=[0], pitch=[0])
    with pytest.raises(FacetoolError, match="vocabulary"):
        cohort_codes(age=[1], gender=["male"], race=["White"], yaw=[0], pitch=[0])
    with pytest.raises(FacetoolError, match="missing"):
        cohort_codes(age=["20-29"], gender=["male"], yaw=[0], pitch=[0])
    with pytest.raises(FacetoolError, match="one length"):
        cohort_codes(age=["20-29"], gender=["male"], race=["White"], yaw=[0, 1], pitch=[0])


def test_cohort_code_of_a_synthetic_store(tmp_path):
    from facetool.data.synthetic import prepare_synthetic
    from facetool.store import FaceStore

    path, _ = prepare_synthetic(tmp_path / "s.h5", identities=6, per_identity=3, size=32, seed=0)
    codes = cohort_codes(path)
    with FaceStore(path) as s:
        age, age_v = s.attribute("age")
        gender, _ = s.attribute("gender")
        group, group_v = s.attribute("group")
        yaw, pitch = s.meta("pose")[:, 0], s.meta("pose")[:, 1]
        assert cohort_codes(s).tolist() == codes.tolist()  # an open store works too
    assert age_v == ["0-20", "20-40", "40-60", "60+"] and group_v == ["A", "B", "C"]
    want = (((np.array([0, 1, 1, 2])[age] * 2 + gender) * 5 + group) * 3 + np.where(pitch < -30, 0, np.where(
        pitch > 30, 1, 2))) * 3 + np.where(yaw < -30, 0, np.where(yaw > 30, 1, 2))
    assert codes.dtype == np.int64 and codes.tolist() == want.tolist() and (codes >= 0).all()
    assert len(set(codes.tolist())) > 3


def test_cohort_code_of_a_store_without_pose_is_one_line(tmp_path):
    from facetool.data.synthetic import prepare_synthetic
    from facetool.store import open_for_update

    path, _ = prepare_synthetic(tmp_path / "s.h5", identities=2, per_identity=2, size=32, seed=0)
    with open_for_update(path, in_place=True) as s:
        del s.f["meta/pose"]
    with pytest.raises(FacetoolError, match="no per-image pose"):
        cohort_codes(path)


def test_top_level_names_resolve_and_import_facetool_stays_light():
    assert facetool.sinkhorn is sinkhorn and facetool.cluster_purity is cluster_purity
    assert facetool.cluster_scores is cluster_scores and facetool.cohort_codes is cohort_codes
    assert {"sinkhorn", "cluster_purity", "cluster_scores", "cohort_codes"} <= set(facetool.__all__)
    code = "import sys, facetool; assert 'torch' not in sys.modules and 'sklearn' not in sys.modules; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
