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


def _chain_margin(cos, labels, m1=1.0, m2=0.5, m3=0.0, s=64.0, easy_margin=False):
    """combined_margin as it was written before it became one autograd Function (clamp, clone, index_put, * s):
    the reference its values and gradients must equal bit for bit."""
    cos = cos.float().clamp(-1 + 1e-7, 1 - 1e-7)
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


@pytest.mark.parametrize("margins, easy", [((1.0, 0.5, 0.0), False), ((1.0, 0.5, 0.0), True),
                                           ((1.0, 0.0, 0.4), False), ((0.9, 0.4, 0.15), False),
                                           ((1.2, 0.3, 0.1), True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fused_margin_equals_the_autograd_chain_bit_for_bit(margins, easy, dtype):
    """Random cosines over the whole range and past it (clamped entries, exact +-1, the threshold branch
    theta + m2 > pi, easy margin's cos <= 0), rows without a target (-1) and a batch with none."""
    g = torch.Generator().manual_seed(0)
    cos = torch.rand(64, 37, generator=g, dtype=torch.float64).mul(2.2).sub(1.1).to(dtype)
    cos[0, :3] = torch.tensor([1.0, -1.0, 1 - 1e-7], dtype=torch.float64).to(dtype)
    labels = torch.randint(0, 37, (64,), generator=g)
    labels[0] = 0
    labels[1] = 1
    cos[1, 1] = -0.999  # a target at theta near pi
    labels[5::7] = -1
    upstream = torch.randn(64, 37, generator=g)
    for lab in (labels, torch.full_like(labels, -1)):
        a, b = cos.clone().requires_grad_(), cos.clone().requires_grad_()
        fused = combined_margin(a, lab, *margins, s=30.0, easy_margin=easy)
        ref = _chain_margin(b, lab, *margins, s=30.0, easy_margin=easy)
        assert fused.dtype == ref.dtype == torch.float32 and torch.equal(fused, ref)
        (fused * upstream).sum().backward()
        (ref * upstream).sum().backward()
        assert a.grad.dtype == dtype and torch.equal(a.grad, b.grad)
        assert (a.grad == 0).any() and (a.grad != 0).sum() > 0.85 * a.numel()  # 9% clamped: no gradient


def test_fused_margin_keeps_no_logit_sized_tensor_for_backward():
    """The chain kept the input cosines alive for clamp's backward (and four (B, C) tensors at its peak); the
    fused margin saves only the targets (plus a 1-byte mask where something was clamped)."""
    import weakref

    cos = (torch.rand(256, 1000) * 1.8 - 0.9).requires_grad_()
    labels = torch.randint(0, 1000, (256,))
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    x = cos * 1.0  # an intermediate, like F.linear's output
    ref = weakref.ref(x)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = combined_margin(x, labels)
    del x
    assert ref() is None  # the cosines are freed once the logits exist
    assert sum(saved) < 0.01 * 256 * 1000 * 4, saved
    logits.sum().backward()
    assert torch.isfinite(cos.grad).all()
