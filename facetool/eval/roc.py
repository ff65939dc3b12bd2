"""ROC, TAR@FAR and open-set identification metrics (CMC, TPIR@FPIR).

TAR@FAR follows insightface's IJB scripts exactly: the ROC is sklearn's ``roc_curve`` (default
``drop_intermediate=True``) and for each FAR the TPR at the ROC point whose FPR is *closest* to the FAR
is reported (ties: the highest TPR, as insightface's ``argmin`` over the flipped curve picks). The
linearly interpolated TPR at exactly that FAR is reported beside it.
"""

from __future__ import annotations

import numpy as np

from facetool.errors import FacetoolError

#: the FARs insightface's IJB tables report
FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
#: the FPIRs of the IJB-C 1:N table
FPIRS = (0.01, 0.1)


def roc(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` of sklearn's ``roc_curve`` (higher score = more similar)."""
    from sklearn.metrics import roc_curve

    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        raise FacetoolError("a ROC needs both genuine and impostor pairs; the pair list has only one kind")
    fpr, tpr, thr = roc_curve(labels, np.asarray(scores))
    return fpr, tpr, thr


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, fars=FARS) -> dict[str, dict[str, float]]:
    """``{"1e-04": {"closest": TPR at the closest FPR, "fpr": that FPR, "interp": interpolated TPR}}``."""
    fpr_r, tpr_r = fpr[::-1], tpr[::-1]
    out: dict[str, dict[str, float]] = {}
    for far in fars:
        i = int(np.argmin(np.abs(fpr_r - far)))
        out[far_key(far)] = {
            "closest": float(tpr_r[i]),
            "fpr": float(fpr_r[i]),
            "interp": float(np.interp(far, fpr, tpr)),
        }
    return out


def roc_head(labels: np.ndarray, scores: np.ndarray, max_fpr: float) -> tuple[np.ndarray, np.ndarray, int] | None:
    """The points of sklearn's ``roc_curve`` up to FPR ``~max_fpr``, computed by sorting only the scores
    at or above the threshold of that FPR (one O(n) partition instead of a full sort).

    Returns ``(fpr, tpr, n_exact)``: the first ``n_exact`` points are exactly sklearn's; the last point
    is a true ROC point whose drop/keep status needs the unseen rest (it is used for interpolation only).
    None when the head would cover (almost) everything.
    """
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    k = int(np.ceil(max_fpr * n_neg))
    if n_pos == 0 or k >= n_neg // 2:
        return None
    neg = s[~y]
    t = np.partition(neg, n_neg - k - 1)[n_neg - k - 1]  # the (k+1)-th largest impostor score
    sub = s >= t  # whole tie groups: every score equal to t is in
    ss, yy = s[sub], y[sub]
    order = np.argsort(ss, kind="stable")[::-1]
    ss, yy = ss[order], yy[order]
    idx = np.r_[np.nonzero(np.diff(ss))[0], len(ss) - 1]
    tps = np.cumsum(yy)[idx]
    fps = 1 + idx - tps
    if len(fps) < 3:
        return None
    keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
    keep_exact = keep[:-1]  # the last point's status depends on the next, unseen one
    pts = np.r_[np.nonzero(keep_exact)[0], len(fps) - 1]
    fpr = np.r_[0.0, fps[pts] / n_neg]
    tpr = np.r_[0.0, tps[pts] / n_pos]
    return fpr, tpr, len(fpr) - 1


def verification_tars(labels: np.ndarray, scores: np.ndarray, fars=FARS,
                      head_min: int = 1_000_000) -> tuple[dict, np.ndarray, np.ndarray]:
    """TAR@FAR of :func:`tar_at_far` on sklearn's ROC of (labels, scores). From ``head_min`` scores on,
    only the head of the ROC is computed (no sort of millions of impostor scores) when it decides
    every FAR exactly; the returned curve then ends a little beyond the largest FAR.
    Returns (tars, fpr, tpr)."""
    y = np.asarray(labels).astype(bool)
    if y.all() or not y.any():
        raise FacetoolError("a ROC needs both genuine and impostor pairs; the pair list has only one kind")
    head = roc_head(y, scores, min(1.0, 1.25 * max(fars))) if len(y) >= head_min else None
    if head is not None:
        fpr, tpr, n_exact = head
        last = fpr[-1]
        exact = all(np.min(np.abs(fpr[:n_exact] - f)) < last - f for f in fars)
        if exact:
            tars = tar_at_far(fpr[:n_exact], tpr[:n_exact], fars)
            for f in fars:  # interpolation may use the last (true) point of the head
                tars[far_key(f)]["interp"] = float(np.interp(f, fpr, tpr))
            return tars, fpr, tpr
    fpr, tpr, _ = roc(y, scores)
    return tar_at_far(fpr, tpr, fars), fpr, tpr


def far_key(far: float) -> str:
    """``1e-04``, ``2.5e-01``: the key of a FAR in result dicts."""
    return np.format_float_scientific(far, trim="-", exp_digits=2)


def cmc(scores: np.ndarray, gallery_subjects: np.ndarray, probe_subjects: np.ndarray,
        ranks=(1, 5, 10)) -> dict[str, float]:
    """Closed-set identification rate at each rank over the mated probes (those whose subject is in the
    gallery). ``scores`` is (probes, gallery templates); a subject's score is its best template's."""
    subj_scores, subjects = subject_scores(scores, gallery_subjects)
    true_col, mated = _true_columns(subjects, probe_subjects)
    if not mated.any():
        return {f"rank{r}": float("nan") for r in ranks}
    s = subj_scores[mated]
    true = s[np.arange(len(s)), true_col[mated]]
    rank = 1 + (s > true[:, None]).sum(1)  # ties count in the probe's favour
    return {f"rank{r}": float(np.mean(rank <= r)) for r in ranks}


def tpir_at_fpir(scores: np.ndarray, gallery_subjects: np.ndarray, probe_subjects: np.ndarray,
                 fpirs=FPIRS) -> dict[str, float]:
    """Open-set TPIR at FPIR (NIST): the threshold lets at most ``floor(FPIR * n)`` of the n non-mated
    searches raise an alarm (top score strictly above it); TPIR = share of mated searches whose rank-1
    subject is correct with a score strictly above the threshold. NaN without non-mated searches."""
    subj_scores, subjects = subject_scores(scores, gallery_subjects)
    true_col, mated = _true_columns(subjects, probe_subjects)
    top = subj_scores.max(1)
    nonmated_top = np.sort(top[~mated])[::-1]
    s = subj_scores[mated]
    true = s[np.arange(len(s)), true_col[mated]]
    hit = true >= s.max(1)  # correct at rank 1
    out = {}
    for fpir in fpirs:
        k = int(np.floor(fpir * len(nonmated_top) + 1e-9))
        if len(nonmated_top) == 0 or not mated.any():
            out[f"{fpir:g}"] = float("nan")
            continue
        thr = nonmated_top[k] if k < len(nonmated_top) else -np.inf
        out[f"{fpir:g}"] = float(np.mean(hit & (true > thr)))
    return out


def subject_scores(scores: np.ndarray, gallery_subjects: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Collapse gallery templates to subjects (max score): (probes, subjects), sorted subject ids."""
    subjects, inv = np.unique(np.asarray(gallery_subjects), return_inverse=True)
    if len(subjects) == len(gallery_subjects):
        order = np.argsort(inv)
        return scores[:, order], subjects
    out = np.full((scores.shape[0], len(subjects)), -np.inf, dtype=scores.dtype)
    for j, c in enumerate(inv):
        np.maximum(out[:, c], scores[:, j], out=out[:, c])
    return out, subjects


def _true_columns(subjects: np.ndarray, probe_subjects: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probe_subjects = np.asarray(probe_subjects)
    pos = np.searchsorted(subjects, probe_subjects).clip(0, len(subjects) - 1)
    mated = subjects[pos] == probe_subjects
    return pos, mated
