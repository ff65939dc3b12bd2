"""CondFace (thesis ch. 5): routing vectors that cluster by facial attributes.

For now this module holds the clustering piece of the method: :func:`sinkhorn`, SwAV's equipartitioned
soft assignment of a batch of routing scores to P prototypes (the "Sinkhorn" clustering of Eq. 5.5).
The training method (L = CosFace + lambda * L_cls) joins it here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from facetool.distributed import all_reduce
from facetool.errors import FacetoolError


@torch.no_grad()
def sinkhorn(scores: Any, epsilon: float = 0.05, iterations: int = 3, group: Any = None) -> Any:
    """Soft assignments (B, K) of B samples to K prototypes from their scores (B, K), rows summing to 1.

    SwAV's ``distributed_sinkhorn`` on this process's rows: Q = exp(scores / epsilon).T normalised to
    total 1, then ``iterations`` rounds of prototype (row) sums -> 1/K and sample (column) sums -> 1/B,
    and Q * B transposed. Under DDP the total and the prototype sums are all-reduced over ``group``
    (default: the whole job) and B counts every rank's samples, as in SwAV; in one process nothing is
    communicated. After finitely many iterations the per-prototype mass is only about B/K (the
    equipartition is soft); every row sums exactly to 1.

    Computed in float32 at least (float64 stays float64): exp(s / 0.05) overflows float16 for s > 0.55.
    One global maximum (all-reduced under DDP) is subtracted first, which changes nothing because every
    normalisation divides it out; a per-sample maximum would change Q. Scores are meant to be cosine
    similarities (SwAV L2-normalises features and prototypes, so |s| <= 1). A tensor in gives a tensor
    out (on its device), anything else a numpy array.
    """
    is_tensor = isinstance(scores, torch.Tensor)
    s = scores.detach() if is_tensor else torch.as_tensor(np.asarray(scores, dtype=np.float64))
    if s.ndim != 2 or s.shape[0] < 1 or s.shape[1] < 1:
        raise FacetoolError(f"sinkhorn needs a B x K score matrix with B, K >= 1, got shape {tuple(s.shape)}")
    if not (isinstance(epsilon, (int, float)) and 0 < epsilon < float("inf")):
        raise FacetoolError(f"sinkhorn epsilon must be a positive finite number, got {epsilon!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise FacetoolError(f"sinkhorn iterations must be an integer >= 1, got {iterations!r}")
    s = s.to(torch.float64 if s.dtype == torch.float64 else torch.float32)
    if not bool(torch.isfinite(s).all()):
        raise FacetoolError("sinkhorn scores must be finite (found NaN or infinity)")

    top = all_reduce(s.max().reshape(1).clone(), "max", group)  # ONE global scalar: exact under every normalisation
    q = torch.exp((s - top) / epsilon).t()  # K x B, as in SwAV
    b = torch.tensor(float(q.shape[1]), dtype=q.dtype, device=q.device)
    b = all_reduce(b, "sum", group)  # samples of every rank
    k = q.shape[0]
    q /= all_reduce(q.sum().reshape(1), "sum", group)
    for _ in range(iterations):
        q /= all_reduce(q.sum(dim=1, keepdim=True), "sum", group)  # each prototype's mass -> 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample's mass -> 1/B
        q /= b
    q *= b  # columns sum to 1: an assignment per sample
    out = q.t().contiguous()
    return out if is_tensor else out.numpy()


__all__ = ["sinkhorn"]
