"""FLOP counting: hand-computed toy net, known ResNet-50 cost, and real savings of skipped blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from facetool.flops import count_flops, count_params, executed_flops, flops_summary, gated_block_flops
from facetool.methods.aig import gated_blocks
from facetool.models import FaceModel, create_model
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
