"""ROC / TAR@FAR (insightface's closest-FPR rule) and open-set identification metrics, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from facetool.errors import FacetoolError
from facetool.eval import roc as R

# 4 genuine, 10 impostor scores. Sorted: .9G .85I .8G .7G .6I .5I .4G .3I .2I .1I .05I 0I -.1I -.2I
GEN = [0.9, 0.8, 0.7, 0.4]
IMP = [0.85, 0.6, 0.5, 0.3, 0.2, 0.1, 0.05, 0.0, -0.1, -0.2]


def _hand_set():
    return np.r_[np.ones(4), np.zeros(10)].astype(bool), np.r_[GEN, IMP]


def test_roc_points_match_hand_computed_corners():
    # (fps, tps) per threshold: (0,1) (1,1) (1,2) (1,3) (2,3) (3,3) (3,4) (4,4) ... (10,4); sklearn drops the
    # collinear ones (thresholds .8, .6, .3 ... -.1) and prepends (0, 0)
    y, s = _hand_set()
    fpr, tpr, _ = R.roc(y, s)
    np.testing.assert_allclose(fpr, [0, 0, 0.1, 0.1, 0.3, 0.3, 1.0])
    np.testing.assert_allclose(tpr, [0, 0.25, 0.25, 0.75, 0.75, 1.0, 1.0])


def test_tar_at_far_closest_and_interpolated():
    y, s = _hand_set()
    fpr, tpr, _ = R.roc(y, s)
    t = R.tar_at_far(fpr, tpr, fars=(0.01, 0.1, 0.25, 0.6))
    assert set(t) == {"1e-02", "1e-01", "2.5e-01", "6e-01"}
    assert t["1e-02"] == {"closest": 0.25, "fpr": 0.0, "interp": pytest.approx(0.25)}  # tie at FPR 0: higher TPR
    assert t["1e-01"]["closest"] == 0.75  # FPR 0.1 appears with TPR .25 and .75: the higher
    assert t["2.5e-01"]["closest"] == 1.0 and t["2.5e-01"]["fpr"] == pytest.approx(0.3)  # corner (.3, 1)
    assert t["2.5e-01"]["interp"] == pytest.approx(0.75)  # on the segment (.1,.75)-(.3,.75)
    assert t["6e-01"]["closest"] == 1.0 and t["6e-01"]["interp"] == pytest.approx(1.0)


def test_verification_tars_head_path_equals_full_sklearn_roc():
    rng = np.random.default_rng(1)
    fars = (1e-4, 1e-3, 1e-2, 1e-1)
    for ties in (False, True):
        n = 200_000
        y = np.zeros(n, bool)
        y[rng.choice(n, 3000, replace=False)] = True
        s = rng.standard_normal(n)
        if ties:
            s = np.round(s * 20) / 20  # heavy ties: whole tie groups must stay together
        s[y] += 1.5
        assert R.roc_head(y, s, 0.125) is not None  # the fast path is the one tested
        fast, fpr_h, _ = R.verification_tars(y, s, fars, head_min=0)
        assert fpr_h[-1] < 0.2  # the head path ran
        fpr, tpr, _ = R.roc(y, s)
        assert fast == R.tar_at_far(fpr, tpr, fars)


def test_roc_needs_both_classes():
    with pytest.raises(FacetoolError, match="both genuine and impostor"):
        R.verification_tars(np.ones(5, bool), np.arange(5.0))


def _id_set():
    gallery = np.array([10, 20, 30])
    probes = np.array([10, 20, 40, 50, 30])  # 40 and 50 are not enrolled (non-mated searches)
    scores = np.array([
        [0.9, 0.3, 0.1],  # 10: rank 1, score .9
        [0.5, 0.4, 0.2],  # 20: rank 2
        [0.6, 0.1, 0.0],  # non-mated, top .6
        [0.2, 0.3, 0.35],  # non-mated, top .35
        [0.1, 0.2, 0.3],  # 30: rank 1, score .3
    ])
    return scores, gallery, probes


def test_cmc_by_hand():
    scores, g, p = _id_set()
    assert R.cmc(scores, g, p, ranks=(1, 2, 5)) == {"rank1": pytest.approx(2 / 3), "rank2": 1.0, "rank5": 1.0}


def test_tpir_at_fpir_by_hand():
    scores, g, p = _id_set()
    t = R.tpir_at_fpir(scores, g, p, fpirs=(0.1, 0.5, 1.0))
    # FPIR .1: no false alarm allowed -> threshold .6 -> only probe 10 (.9) -> 1/3
    # FPIR .5: one of two non-mated may alarm -> threshold .35 -> probe 10 only (30 scores .3) -> 1/3
    # FPIR 1: no threshold -> every rank-1 hit counts (10, 30) -> 2/3
    assert t == {"0.1": pytest.approx(1 / 3), "0.5": pytest.approx(1 / 3), "1": pytest.approx(2 / 3)}


def test_subject_scores_take_the_best_template():
    scores = np.array([[0.2, 0.7, 0.5]])
    s, subj = R.subject_scores(scores, np.array([7, 3, 7]))
    assert subj.tolist() == [3, 7] and s.tolist() == [[0.7, 0.5]]
    assert R.cmc(scores, np.array([7, 3, 7]), np.array([7]))["rank1"] == 0.0  # 3 scores higher
