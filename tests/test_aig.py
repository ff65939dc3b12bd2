"""ConvNet-AIG: gates, straight-through gradients, deterministic inference, real skipping, targets."""

from __future__ import annotations

import pytest
import torch

from facetool.errors import FacetoolError
from facetool.trainers.aig import (AIGMethod, Gate, forced_gates, gated_blocks, parse_target_schedule, set_skipping,
                                  target_loss, target_schedule)
from facetool.models import create_model


def _mixed_model(seed: int = 0):
    """A tiny AIG-ResNet-18 whose gates decide differently for different images."""
    torch.manual_seed(seed)
    m = create_model("aig_resnet18", num_classes=5, input_size=32, width=8)
    for b in gated_blocks(m):
        torch.nn.init.normal_(b.gate.fc2.weight, 0.0, 3.0)
        b.gate.fc2.bias.data.zero_()
    return m


def test_gate_init_matches_reference():
    g = Gate(32)
    assert g.fc2.bias.tolist() == pytest.approx([0.1, 2.0])
    assert g.fc2.weight.std() < 0.01
    g.eval()
    _, p = g(torch.randn(4, 32, 8, 8))
    assert torch.allclose(p, torch.full((4,), torch.tensor([0.1, 2.0]).softmax(0)[1].item()), atol=1e-3)


def test_training_gates_are_hard_and_pass_straight_through_gradients():
    m = _mixed_model()
    m.train()
    x = torch.randn(16, 3, 32, 32)
    out, internals = m(x, return_internals=True)
    g = internals["gates"]
    assert g.shape == (16, 8) and set(g.unique().tolist()) <= {0.0, 1.0}
    assert internals["gate_probs"].shape == (16, 8)
    (out.logsumexp(1).mean() + target_loss(g, [0.5] * 8)).backward()
    for b in gated_blocks(m):
        assert b.gate.fc2.weight.grad.abs().sum() > 0
        assert b.gate.fc1.weight.grad.abs().sum() > 0


def test_training_gates_are_stochastic_inference_gates_deterministic():
    m = _mixed_model()
    x = torch.randn(16, 3, 32, 32)
    m.train()
    torch.manual_seed(1)
    a = m(x, return_internals=True)[1]["gates"]
    b = m(x, return_internals=True)[1]["gates"]
    assert not torch.equal(a, b)  # Gumbel noise in training
    m.eval()
    with torch.no_grad():
        e1 = m(x, return_internals=True)[1]
        e2 = m(x, return_internals=True)[1]
    assert torch.equal(e1["gates"], e2["gates"])
    # open iff the open logit wins <=> p_open > 0.5
    assert torch.equal(e1["gates"], (e1["gate_probs"] > 0.5).float())
    assert 0 < e1["gates"].mean() < 1


@torch.no_grad()
def test_skipping_equals_masking_in_eval():
    m = _mixed_model().eval()
    x = torch.randn(12, 3, 32, 32)
    skipped, gi = m(x, return_internals=True)
    with set_skipping(m, False):
        masked, gm = m(x, return_internals=True)
    assert all(b.skip for b in gated_blocks(m))  # restored
    assert torch.equal(gi["gates"], gm["gates"])
    assert 0 < gi["gates"].mean() < 1
    assert torch.allclose(skipped, masked, atol=1e-5, rtol=1e-5)
    # closed everywhere = shortcut path only; forced open = the dense network
    with forced_gates(m, 0.0):
        g0 = m(x, return_internals=True)[1]["gates"]
    assert g0.sum() == 0


def test_target_loss_hand_computed():
    gates = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # batch means 1, 0.5, 0.5 against 1, 0.4, 0.8 -> 0 + 0.01 + 0.09
    assert target_loss(gates, [1.0, 0.4, 0.8]).item() == pytest.approx(0.10)
    with pytest.raises(FacetoolError):
        target_loss(gates, [0.5, 0.5])


def test_aig_method_terms():
    m = AIGMethod([1.0, 0.4], weight=2.0)
    gates = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    batch = {"label": torch.tensor([0, 0])}
    terms = m.loss(None, batch, logits, {"gates": gates})
    assert terms["target"].item() == pytest.approx(2.0 * 0.1**2)
    assert terms["ce"].item() == pytest.approx(torch.nn.functional.cross_entropy(logits, batch["label"]).item())
    met = m.metrics(batch, logits, {"gates": gates})
    assert met["top1"] == 0.5 and met["exec_rate"] == 0.75 and met["exec_rate_free"] == 0.5
    assert met["rate_00"] == 1.0 and met["rate_01"] == 0.5


def test_target_schedule_rules():
    s101 = target_schedule(33, 0.4)
    assert s101[:7] == [1.0] * 7 and s101[-3:] == [1.0] * 3 and s101[7:30] == [0.4] * 23
    s50 = target_schedule(16, 0.6)
    assert s50 == [1.0] * 3 + [0.6] * 12 + [1.0]
    assert target_schedule(8, 0.5) == [1.0] * 2 + [0.5] * 5 + [1.0]
    assert target_schedule(8, 0.5, first=0, last=0) == [0.5] * 8
    with pytest.raises(FacetoolError, match=r"\[0, 1\]"):
        target_schedule(16, 1.5)
    assert parse_target_schedule("1, 0.5,0.25", 3) == [1.0, 0.5, 0.25]
    with pytest.raises(FacetoolError, match="3 values but the model has 4"):
        parse_target_schedule("1,0.5,0.25", 4)
    with pytest.raises(FacetoolError, match=r"\[0, 1\]"):
        parse_target_schedule("1,1.5", 2)
    with pytest.raises(FacetoolError, match="comma-separated"):
        parse_target_schedule("1,x", 2)


def test_model_shapes_and_block_counts():
    for name, L in [("aig_resnet18", 8), ("aig_resnet34", 16), ("aig_resnet50", 16), ("aig_resnet101", 33)]:
        m = create_model(name, num_classes=3, input_size=32, width=4)
        assert m.num_gates == L
    plain = create_model("resnet50", num_classes=3, input_size=32, width=4)
    out, internals = plain(torch.randn(2, 3, 32, 32), return_internals=True)
    assert out.shape == (2, 3) and internals == {}
    emb = create_model("resnet18", num_classes=0, input_size=32, width=4)
    assert emb(torch.randn(2, 3, 32, 32)).shape == (2, 32)
