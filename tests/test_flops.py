"""FLOP counting: hand-computed toy nets (AIG and a generic conditional block), known ResNet-50 cost,
and real savings of skipped blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from facetool.flops import count_flops, count_params, executed_flops, flops_summary, gated_block_flops
from facetool.trainers.aig import gated_blocks
from facetool.models import FaceModel, create_model
from facetool.models.base import ConditionalBlock, conditional_blocks, forced_decisions
from facetool.models.resnet import BasicBlock


class Toy(FaceModel):
    """conv 3->4 (3x3, pad 1) on 8x8, two gated BasicBlocks 4->4, linear 4->2."""

    def __init__(self) -> None:
        super().__init__()
        self.input_size = 8
        self.stem = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.blocks = nn.Sequential(BasicBlock(4, 4, 1, gate_hidden=2), BasicBlock(4, 4, 1, gate_hidden=2))
        self.fc = nn.Linear(4, 2)

    def forward_features(self, x, internals=None):
        return self.blocks(self.stem(x))

    def forward_head(self, f):
        return self.fc(f.mean((2, 3)))


# MACs by hand: stem 4*8*8 outputs x 3*3*3 = 6912; each block branch 2 convs x 4*8*8 x 4*3*3 = 18432;
# each gate: 1x1 conv 4->2 (8) + 1x1 conv 2->2 (4) on the pooled 1x1 map = 12; linear 4*2 = 8.
STEM, BLOCK, GATE, FC = 2 * 6912, 2 * 18432, 2 * 12, 2 * 8
DENSE = STEM + 2 * (BLOCK + GATE) + FC


def test_toy_net_flops_by_hand():
    m = Toy()
    assert count_flops(m) == DENSE
    assert count_flops(m, 8, batch=3) == DENSE
    assert gated_block_flops(m).tolist() == [BLOCK, BLOCK]
    g = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.5, 0.5]])
    assert executed_flops(m, g).tolist() == [DENSE - BLOCK, DENSE - 2 * BLOCK, DENSE, DENSE - BLOCK]
    assert count_params(m) == 3 * 4 * 9 + 2 * (2 * 4 * 4 * 9 + 2 * 4 * 2 + (4 * 2 + 2) + 2 * 2 + (2 * 2 + 2)) + 10
    with pytest.raises(ValueError):
        executed_flops(m, torch.ones(2, 3))


def test_resnet50_matches_published_cost():
    m = create_model("resnet50", num_classes=1000, input_size=224)
    # ResNet-50 at 224 px: 4.09 G multiply-adds, 25.56 M parameters
    assert count_flops(m) == pytest.approx(8.18e9, rel=2e-3)
    assert count_params(m) == 25_557_032
    s = flops_summary(create_model("aig_resnet101", num_classes=10, input_size=128, width=16))
    assert s["gated_blocks"] == 33 and 0 < s["gated_gflops"] < s["gflops"]


@torch.no_grad()
def test_skipped_blocks_really_cost_nothing():
    torch.manual_seed(0)
    m = create_model("aig_resnet18", num_classes=5, input_size=32, width=8).eval()
    for b in gated_blocks(m):
        nn.init.normal_(b.gate.fc2.weight, 0.0, 3.0)
        b.gate.fc2.bias.data.zero_()
    x = torch.randn(10, 3, 32, 32)
    with FlopCounterMode(display=False) as fc:
        _, internals = m(x, return_internals=True)
    g = internals["gates"]
    assert 0 < g.mean() < 1
    measured = fc.get_total_flops()
    assert measured == pytest.approx(float(executed_flops(m, g).sum()), rel=1e-9)
    assert measured < 10 * count_flops(m)


class Skippable(ConditionalBlock):
    """A non-AIG conditional block: ``x + conv1x1(x)`` only for the samples whose mean is positive."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1, bias=False)
        self.force: float | None = None
        self.last: torch.Tensor | None = None

    def conditional_part(self, x):
        return self.conv(x)

    def force_decision(self, value):
        old, self.force = self.force, value
        return old

    def forward(self, x):
        z = (x.mean((1, 2, 3)) > 0).float() if self.force is None else torch.full((len(x),), float(self.force))
        self.last = z
        idx = z.nonzero().flatten()
        return x.index_add(0, idx, self.conditional_part(x.index_select(0, idx)))  # runs only where z = 1


class Switchy(FaceModel):
    """conv 3->4 (3x3, pad 1) on 8x8 -> two Skippable(4) -> linear 4->2; reports ``gates``."""

    internal_names = ("gates",)

    def __init__(self) -> None:
        super().__init__()
        self.input_size = 8
        self.stem = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.a, self.b = Skippable(4), Skippable(4)
        self.fc = nn.Linear(4, 2)

    def forward_features(self, x, internals=None):
        x = self.b(self.a(self.stem(x)))
        if internals is not None:
            internals["gates"] = torch.stack([self.a.last, self.b.last], 1)
        return x

    def forward_head(self, f):
        return self.fc(f.mean((2, 3)))


# MACs by hand: stem 4*8*8 x 27 = 6912; each Skippable 4*8*8 x 4 = 1024; linear 8
S_STEM, S_BLOCK, S_FC = 2 * 6912, 2 * 1024, 2 * 8


@torch.no_grad()
def test_any_conditional_block_plugs_into_the_counter():
    """The counter asks the model interface (ConditionalBlock), nothing AIG-specific."""
    torch.manual_seed(0)
    m = Switchy()
    assert conditional_blocks(m) == [m.a, m.b] and m.conditional_blocks() == [m.a, m.b]
    assert count_flops(m) == S_STEM + 2 * S_BLOCK + S_FC
    assert gated_block_flops(m).tolist() == [S_BLOCK, S_BLOCK]
    assert m.a.force is None and m.b.force is None  # forcing for the count was undone
    with forced_decisions(m, 0.0):
        assert m.a.force == 0.0
        with FlopCounterMode(display=False) as fc:
            m(torch.randn(1, 3, 8, 8))
        assert fc.get_total_flops() == S_STEM + S_FC
    assert m.a.force is None
    x = torch.randn(16, 3, 8, 8)
    with FlopCounterMode(display=False) as fc:
        _, internals = m(x, return_internals=True)
    g = internals["gates"]
    assert 0 < g.mean() < 1  # mixed decisions
    assert fc.get_total_flops() == pytest.approx(float(executed_flops(m, g).sum()), rel=1e-12)
    assert flops_summary(m)["gated_blocks"] == 2


def test_conditional_blocks_order_comes_from_the_model():
    class Reordered(Switchy):
        def conditional_blocks(self):  # decisions reported in another order than registration
            return [self.b, self.a]

    m = Reordered()
    m.b.conv = nn.Conv2d(4, 4, 3, 1, 1, bias=False)  # b now costs 9x a
    assert gated_block_flops(m).tolist() == [9 * S_BLOCK, S_BLOCK]
    assert conditional_blocks(create_model("resnet18", num_classes=2, input_size=32, width=8)) == []
    aig = create_model("aig_resnet18", num_classes=2, input_size=32, width=8)
    assert conditional_blocks(aig) == aig.conditional_blocks() == gated_blocks(aig) and len(gated_blocks(aig)) == 8


@torch.no_grad()
def test_executed_gflops_of_any_conditional_model_from_its_decision_rates():
    """Executed GFLOPs come from the decisions of the model's conditional blocks (columns of
    internals["gates"]), through the method's default summary: no AIG code involved."""
    from facetool.engine import Method
    from facetool.flops import decision_rates, executed_gflops

    torch.manual_seed(0)
    m = Switchy()
    _, internals = m(torch.randn(16, 3, 8, 8), return_internals=True)
    rates = decision_rates(internals["gates"], targets=[1.0, 0.5])
    ra, rb = internals["gates"].float().mean(0).tolist()
    assert rates == {"exec_rate": pytest.approx((ra + rb) / 2), "exec_rate_free": rb, "rate_00": ra, "rate_01": rb}
    final = {f"val_{k}": v for k, v in rates.items()}
    expect = (S_STEM + S_FC + (ra + rb) * S_BLOCK) / 1e9
    assert executed_gflops(m, final) == pytest.approx(expect, rel=1e-6)
    summary = Method().summary(m, final)
    assert summary["exec_gflops"] == pytest.approx(expect, rel=1e-6) and summary["gated_blocks"] == 2
    assert summary["gflops"] == (S_STEM + 2 * S_BLOCK + S_FC) / 1e9
    assert "exec_gflops" not in Method().summary(m, {"val_rate_00": 1.0})  # a rate missing: no estimate
