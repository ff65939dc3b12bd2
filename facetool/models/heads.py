"""Classification heads for training recognition embeddings: softmax, CosFace, ArcFace.

ArcFace and CosFace are the combined margin of insightface: the target logit becomes
``s * (cos(m1*theta + m2) - m3)``, every other logit ``s * cos(theta)``; ArcFace is
``(m1, m2, m3) = (1, 0.5, 0)``, CosFace ``(1, 0, 0.4)``. Numerics:

* cosines are computed in fp32 even under autocast and clamped to [-1+eps, 1-eps] before ``acos``
  (the gradient of acos is infinite at +-1);
* where ``m1*theta + m2 > pi`` the margin would *raise* the logit (cos is not monotone past pi), so
  the target logit falls back to ``cos(theta) - m3 - m2*sin(m2)`` (insightface's linear branch),
  or with ``easy_margin`` the margin is only applied where ``cos(theta) > 0``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from facetool.errors import FacetoolError

MARGINS = {"arcface": (1.0, 0.5, 0.0), "cosface": (1.0, 0.0, 0.4)}
EPS = 1e-7


def combined_margin(
    cos: torch.Tensor,
    labels: torch.Tensor,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
    s: float = 64.0,
    easy_margin: bool = False,
) -> torch.Tensor:
    """Margin logits from plain cosines ``cos`` (B, C) and targets ``labels`` (B,); labels < 0
    (no target in this shard) leave the row unchanged. Returns ``s * logits`` in fp32."""
    cos = cos.float().clamp(-1 + EPS, 1 - EPS)
    rows = torch.nonzero(labels >= 0, as_tuple=True)[0]
    if rows.numel() == 0:
        return cos * s
    target = cos[rows, labels[rows]]
    if m1 == 1.0 and m2 == 0.0:
        new = target - m3
    else:
        theta = torch.acos(target)
        new = torch.cos(m1 * theta + m2) - m3
        if easy_margin:
            new = torch.where(target > 0, new, target)
        else:
            new = torch.where(m1 * theta + m2 <= math.pi, new, target - m3 - m2 * math.sin(m2))
    out = cos.clone()
    out[rows, labels[rows]] = new.to(out.dtype)
    return out * s


class MarginHead(nn.Module):
    """Normalised-weight head: ``cosine(emb)`` the plain cosines, ``forward(emb, labels)`` the
    scaled margin logits (plain scaled cosines when ``labels`` is None)."""

    def __init__(self, embedding_size: int, num_classes: int, margins: tuple[float, float, float] = (1.0, 0.5, 0.0),
                 s: float = 64.0, easy_margin: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)
        self.m1, self.m2, self.m3 = (float(m) for m in margins)
        self.s = float(s)
        self.easy_margin = easy_margin

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        with torch.autocast(emb.device.type, enabled=False):
            return F.linear(F.normalize(emb.float()), F.normalize(self.weight.float()))

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosine(emb)
        if labels is None:
            return cos * self.s
        return combined_margin(cos, labels, self.m1, self.m2, self.m3, self.s, self.easy_margin)

    def extra_repr(self) -> str:
        return f"classes={self.weight.shape[0]}, m=({self.m1}, {self.m2}, {self.m3}), s={self.s}"


class SoftmaxHead(nn.Module):
    """Plain linear classifier on the embedding (the softmax baseline); ``cosine`` returns its logits."""

    def __init__(self, embedding_size: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(embedding_size, num_classes)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        with torch.autocast(emb.device.type, enabled=False):
            return self.fc(emb.float())

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.cosine(emb)


def create_head(loss: str, embedding_size: int, num_classes: int, s: float = 64.0,
                margins: tuple[float, float, float] | None = None) -> nn.Module:
    """``loss`` in softmax | arcface | cosface | combined (needs ``margins``)."""
    if loss == "softmax":
        return SoftmaxHead(embedding_size, num_classes)
    if loss in MARGINS or (loss == "combined" and margins is not None):
        return MarginHead(embedding_size, num_classes, margins or MARGINS[loss], s)
    raise FacetoolError(f"unknown loss {loss!r}; choose softmax, arcface, cosface (or combined with margins)")
