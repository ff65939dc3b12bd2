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

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from facetool.errors import FacetoolError

MARGINS = {"arcface": (1.0, 0.5, 0.0), "cosface": (1.0, 0.0, 0.4)}
EPS = 1e-7


def _target_margin(target: torch.Tensor, m1: float, m2: float, m3: float, easy_margin: bool) -> torch.Tensor:
    """The margin on the (clamped) target cosines, one per row that has a target."""
    if m1 == 1.0 and m2 == 0.0:
        return target - m3
    theta = torch.acos(target)
    new = torch.cos(m1 * theta + m2) - m3
    if easy_margin:
        return torch.where(target > 0, new, target)
    return torch.where(m1 * theta + m2 <= math.pi, new, target - m3 - m2 * math.sin(m2))


@functools.cache
def _clamp_grad_at_bound() -> bool:
    """Whether torch's ``clamp`` passes the gradient of a value equal to a bound (torch 2.15 does not: it
    passes it strictly inside); asked once, on one element, so the fused margin matches the installed torch."""
    with torch.enable_grad():
        x = torch.tensor([0.5], requires_grad=True)
        (g,) = torch.autograd.grad(x.clamp(-0.5, 0.5).sum(), x)
    return bool(g[0] != 0)


def _clamp_blocked(cos: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Where ``out = cos.clamp(-1 + EPS, 1 - EPS)``'s backward gives no gradient (bools: 1 byte per logit):
    past a bound, NaN, and (torch 2.15) at a bound."""
    if _clamp_grad_at_bound():
        return out.ne(cos)  # what the clamp changed (NaN != NaN)
    lo, hi = torch.tensor([-1 + EPS, 1 - EPS], dtype=out.dtype).tolist()  # the bounds as clamp applied them
    return out.gt(lo).logical_and_(out.lt(hi)).logical_not_()


class _CombinedMargin(torch.autograd.Function):
    """:func:`combined_margin` as one logit-sized output and nothing logit-sized saved for backward (autograd's
    chain of ``clamp``, ``clone``, ``index_put`` and ``* s`` kept four (B, C) tensors alive, and the input
    cosines until the backward): the clamp's mask is kept only if something was clamped (1 byte per logit), and
    the backward recomputes the margin on the (B,) targets with autograd, so values and gradients are the
    same numbers, bit for bit, as that chain's."""

    @staticmethod
    def forward(ctx, cos, labels, m1, m2, m3, s, easy_margin):  # type: ignore[override]
        out = cos.float().clamp(-1 + EPS, 1 - EPS)  # the one (B, C) result (a copy, also of fp32 input)
        clipped = _clamp_blocked(cos, out)
        clipped = clipped if bool(clipped.any()) else None
        rows = torch.nonzero(labels >= 0, as_tuple=True)[0]
        cols = labels[rows]
        target = out[rows, cols]
        out.mul_(s)
        if rows.numel():
            out[rows, cols] = _target_margin(target, m1, m2, m3, easy_margin).to(out.dtype) * s
        ctx.save_for_backward(rows, cols, target, clipped)
        ctx.args, ctx.in_dtype = (m1, m2, m3, s, easy_margin), cos.dtype
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        rows, cols, target, clipped = ctx.saved_tensors
        m1, m2, m3, s, easy_margin = ctx.args
        g = grad.mul(s)
        if rows.numel():
            with torch.enable_grad():
                t = target.detach().requires_grad_()
                (gt,) = torch.autograd.grad(_target_margin(t, m1, m2, m3, easy_margin), t, g[rows, cols])
            g[rows, cols] = gt
        if clipped is not None:
            g.masked_fill_(clipped, 0.0)
        return g.to(ctx.in_dtype), None, None, None, None, None, None


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
    (no target in this shard) leave the row unchanged. Returns ``s * logits`` in fp32: one (B, C) tensor and,
    for the backward, only the targets (:class:`_CombinedMargin`; the input cosines can be freed)."""
    return _CombinedMargin.apply(cos, labels, float(m1), float(m2), float(m3), float(s), bool(easy_margin))


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
