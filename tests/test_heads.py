"""Margin heads: ArcFace / CosFace / combined margin against hand-computed logits."""

from __future__ import annotations

import math

import pytest
import torch

from facetool.errors import FacetoolError
from facetool.models.heads import MarginHead, SoftmaxHead, combined_margin, create_head

COS = torch.tensor([[0.8, 0.1, -0.2], [-0.95, 0.3, 0.0], [0.5, 0.5, 0.5]])
LABELS = torch.tensor([0, 0, -1])


def test_arcface_logits_by_hand():
    out = combined_margin(COS, LABELS, 1.0, 0.5, 0.0, s=64.0)
    # row 0: theta = acos(0.8) (sin = 0.6): cos(theta + 0.5) = 0.8 cos 0.5 - 0.6 sin 0.5
    t0 = 0.8 * math.cos(0.5) - 0.6 * math.sin(0.5)
    assert out[0, 0].item() == pytest.approx(64 * t0, abs=1e-4)  # = 64 * 0.414411
    assert t0 == pytest.approx(0.7020661 - 0.2876553, abs=1e-6)
    # row 1: theta = acos(-0.95) = 2.824 > pi - 0.5: fall back to cos - m sin m (stays monotone)
    t1 = -0.95 - 0.5 * math.sin(0.5)
    assert out[1, 0].item() == pytest.approx(64 * t1, abs=1e-4)  # = 64 * -1.189713
    # every non-target logit and the row without a target (label -1) are just s * cos
    mask = torch.ones_like(COS, dtype=torch.bool)
    mask[0, 0] = mask[1, 0] = False
    assert torch.allclose(out[mask], 64 * COS[mask])


def test_margin_penalises_the_target_for_every_angle():
    cos = torch.linspace(-0.999, 0.999, 401)[:, None]
    arc = combined_margin(cos, torch.zeros(401, dtype=torch.long), 1.0, 0.5, 0.0, s=1.0)[:, 0]
    assert torch.all(arc < cos[:, 0])  # the margin never helps the target
    assert torch.all(arc[1:] >= arc[:-1])  # and the logit still increases with cos (no bump past pi)
    easy = combined_margin(cos, torch.zeros(401, dtype=torch.long), 1.0, 0.5, 0.0, s=1.0, easy_margin=True)[:, 0]
    assert torch.equal(easy[cos[:, 0] <= 0], cos[cos[:, 0] <= 0, 0])


def test_cosface_and_combined_by_hand():
    cosface = combined_margin(COS, LABELS, 1.0, 0.0, 0.4, s=30.0)
    assert cosface[0, 0].item() == pytest.approx(30 * (0.8 - 0.4), abs=1e-4)
    assert cosface[1, 0].item() == pytest.approx(30 * (-0.95 - 0.4), abs=1e-4)
    both = combined_margin(COS, LABELS, 1.0, 0.3, 0.2, s=1.0)
    assert both[0, 0].item() == pytest.approx(0.8 * math.cos(0.3) - 0.6 * math.sin(0.3) - 0.2, abs=1e-6)


def test_head_normalises_and_is_safe_at_the_poles():
    head = MarginHead(4, 3, s=64.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 0, 1.0]]))
    emb = torch.tensor([[5.0, 0, 0, 0], [0, -1.0, 0, 0]], requires_grad=True)  # cos exactly +1 / -1
    cos = head.cosine(emb)
    assert torch.allclose(cos, torch.tensor([[1.0, 0, 0], [0, -1.0, 0]]))
    logits = head(emb, torch.tensor([0, 1]))
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()
    assert torch.allclose(head(emb), 64 * cos)  # without labels: plain scaled cosines


def test_head_stays_fp32_under_autocast():
    head = create_head("arcface", 8, 5)
    emb = torch.randn(4, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(emb, torch.tensor([0, 1, 2, 3]))
    assert out.dtype == torch.float32


def test_create_head_kinds():
    sm = create_head("softmax", 8, 5)
    assert isinstance(sm, SoftmaxHead)
    e = torch.randn(3, 8)
    assert torch.allclose(sm(e, torch.tensor([0, 1, 2])), sm.fc(e))
    cf = create_head("cosface", 8, 5)
    assert (cf.m1, cf.m2, cf.m3, cf.s) == (1.0, 0.0, 0.4, 64.0)
    af = create_head("arcface", 8, 5)
    assert (af.m1, af.m2, af.m3) == (1.0, 0.5, 0.0)
    with pytest.raises(FacetoolError, match="unknown loss"):
        create_head("sphereface", 8, 5)
