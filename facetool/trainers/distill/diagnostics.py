"""The diagnostics table of a distillation run (thesis Tables 4.3, 4.5, 4.6): top-1/5, CE, KL(teacher ||
student), feature distance (L_FM, the loss's own definition), NMI of k-means clusters, linear-probe transfer."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from facetool.hooks import taps
from facetool.trainers.distill.method import DistillMethod
from facetool.trainers.distill.teacher import Teacher
from facetool.trainers.srrl import fm_loss


# -- diagnostics -----------------------------------------------------------------------------------
@torch.no_grad()
def extract(teacher: Teacher | None, student: nn.Module, method: DistillMethod, ds: Dataset, batch_size: int,
            device: torch.device) -> dict[str, np.ndarray]:
    """Per image: labels, student logits and own feature, the connected student feature (SRRL),
    teacher logits and feature (eval mode, no flips)."""
    from facetool.data.dataset import make_loader

    student.eval().to(device)
    for m in method.modules().values():
        m.eval().to(device)
    cols: dict[str, list] = {}
    layer = [method.s_fmap] if method.s_fmap else []
    for batch in make_loader(ds, batch_size):
        x = batch["image"].to(device)
        with taps(student, layer) as found:
            out = student(x)
        row = {"label": batch["label"], "s_logits": method.student_logits(out).float()}
        method._s = found
        row["s_h"] = method.student_feature(out).float()
        if teacher is not None:
            t = teacher.run(x)
            row["t_h"] = t["h"].float()
            if t["logits"] is not None:
                row["t_logits"] = t["logits"].float()
            if method.connector is not None:
                row["s_h_connected"] = teacher.head_from_map(method.connector(found[method.s_fmap]))[0].float()
        for k, v in row.items():
            cols.setdefault(k, []).append(v.cpu())
    method._s = {}
    return {k: torch.cat(v).numpy() for k, v in cols.items()}


def nmi(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """Normalised mutual information between k-means clusters (k = number of identities) of the
    L2-normalised features and the identity labels."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    k = len(np.unique(labels))
    if k < 2 or len(labels) <= k:
        return float("nan")
    f = features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-12)
    pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(f)
    return float(normalized_mutual_info_score(labels, pred))


def linear_probe(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray, test_y: np.ndarray) -> float:
    """Top-1 (%) of a logistic-regression classifier on frozen, standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(train_f, train_y)
    return 100.0 * float((clf.predict(test_f) == test_y).mean())


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p, q = torch.from_numpy(p_logits), torch.from_numpy(q_logits)
    return float(F.kl_div(F.log_softmax(q, 1), F.log_softmax(p, 1), reduction="batchmean", log_target=True))


def _top(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, logits.shape[1])
    return 100.0 * float((np.argsort(-logits, 1)[:, :k] == labels[:, None]).any(1).mean())


def diagnostics(teacher: Teacher | None, student: nn.Module, method: DistillMethod, test_ds: Dataset,
                batch_size: int, device: torch.device, transfer: tuple[Dataset, Dataset] | None = None) -> dict:
    """The thesis' distillation diagnostics on the test split, for the student and the teacher:
    top-1/5, KL(teacher || student) at T = 1, CE(student, labels), the feature distance ``feat_dist`` (L_FM
    as the loss defines it, :func:`facetool.trainers.srrl.fm_loss`: the mean over images and feature
    dimensions of (h_T - h_S)^2, i.e. ||h_T - h_S||^2 / D averaged over images; the SRRL student's
    connected feature, otherwise its own feature where the dimensions agree), NMI of k-means clusters,
    and the linear-probe top-1 on a transfer store."""
    d = extract(teacher, student, method, test_ds, batch_size, device)
    y = d["label"]
    s: dict[str, Any] = {"top1": _top(d["s_logits"], y, 1), "top5": _top(d["s_logits"], y, 5),
                         "ce": float(F.cross_entropy(torch.from_numpy(d["s_logits"]), torch.from_numpy(y))),
                         "nmi": nmi(d["s_h"], y)}
    t: dict[str, Any] = {}
    if teacher is not None:
        t["nmi"] = nmi(d["t_h"], y)
        if "t_logits" in d:
            t.update({"top1": _top(d["t_logits"], y, 1), "top5": _top(d["t_logits"], y, 5),
                      "ce": float(F.cross_entropy(torch.from_numpy(d["t_logits"]), torch.from_numpy(y)))})
            if d["t_logits"].shape == d["s_logits"].shape:
                s["kl_teacher_student"] = _kl(d["t_logits"], d["s_logits"])
        h = d.get("s_h_connected", d["s_h"])
        if h.shape == d["t_h"].shape:
            s["feat_dist"] = float(fm_loss(torch.from_numpy(h), torch.from_numpy(d["t_h"])))  # one definition
            s["feat_dist_of"] = "connected" if "s_h_connected" in d else "own"
    if transfer is not None:
        tr, te = (extract(teacher, student, method, ds, batch_size, device) for ds in transfer)
        s["transfer_top1"] = linear_probe(tr["s_h"], tr["label"], te["s_h"], te["label"])
        if teacher is not None:
            t["transfer_top1"] = linear_probe(tr["t_h"], tr["label"], te["t_h"], te["label"])
    return {"student": s, "teacher": t}
