"""The ConvNet-AIG gated residual block (Veit & Belongie, ECCV 2018): a model component.

Each residual block gets a :class:`Gate` on its input (global average pool -> 1x1 conv in->16 -> BN
-> ReLU -> 1x1 conv 16->2 logits ``[closed, open]``; second conv bias ``[0.1, 2]`` so ~87 % open at
start, weights N(0, 0.001)). The block computes ``relu(shortcut(x) + z * F(x))``.

* training: straight-through Gumbel-softmax (temperature 1): the forward value of ``z`` is the hard
  0/1 sample, its gradient the soft one;
* evaluation: a deterministic decision ``z = 1 iff logit_open > logit_closed`` without Gumbel noise
  (the reference code keeps adding noise at test time, its issue #5), and the residual branch really
  runs only on the samples whose gate is open (``index_select`` / ``index_add``), so the outputs
  equal those of masking while closed blocks cost nothing.

:class:`GatedResidual` is a :class:`~facetool.models.base.ConditionalBlock`, so FLOP counting and
explainers see it through the model interface. The AIG *training method* (target schedule and loss,
:class:`~facetool.trainers.aig.AIGMethod`) lives in :mod:`facetool.trainers.aig`, which re-exports
these names.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from facetool.hooks import set_attrs
from facetool.models.base import ConditionalBlock, forced_decisions


class Gate(nn.Module):
    """Per-sample execute/skip decision for one residual block, computed on the block input."""

    def __init__(self, in_channels: int, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(in_channels, hidden, 1)
        self.bn = nn.BatchNorm2d(hidden)
        self.fc2 = nn.Conv2d(hidden, 2, 1)
        nn.init.normal_(self.fc2.weight, 0.0, 0.001)
        with torch.no_grad():
            self.fc2.bias.copy_(torch.tensor([0.1, 2.0]))
        self.tau = 1.0
        #: if set (0 or 1), every sample gets this decision (FLOP counting, dense attributions)
        self.force: float | None = None

    def logits(self, x: Tensor) -> Tensor:
        h = x.mean((2, 3), keepdim=True)
        return self.fc2(torch.relu(self.bn(self.fc1(h)))).flatten(1).float()  # (B, 2): [closed, open]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(z, p_open)``, both (B,): hard decisions (straight-through in training) and
        the probability of executing."""
        logits = self.logits(x)
        p_open = logits.softmax(1)[:, 1]
        if self.force is not None:
            return torch.full_like(p_open, float(self.force)), p_open
        if self.training:
            u = torch.rand_like(logits).clamp_(1e-10, 1.0 - 1e-7)
            soft = ((logits - torch.log(-torch.log(u))) / self.tau).softmax(1)[:, 1]
            hard = (soft > 0.5).float()
            return hard + (soft - soft.detach()), p_open  # exactly 0/1 forward, soft gradient
        return (logits[:, 1] > logits[:, 0]).float(), p_open


class GatedResidual(ConditionalBlock):
    """Base of residual blocks: ``relu(shortcut(x) + z * residual(x))``; ``gate`` None = plain block.

    Subclasses define ``residual(x)`` and ``shortcut(x)``. After a forward, ``last_gate`` and
    ``last_prob`` hold the block's (B,) decisions (read and cleared by the model). ``skip``
    (default True) lets inference run the branch only where the gate is open; False multiplies
    by the gate instead (same outputs, dense compute; see :func:`set_skipping`).

    As a :class:`~facetool.models.base.ConditionalBlock` its conditional part is the residual
    branch and forcing a decision sets ``gate.force``."""

    gate: Gate | None
    skip: bool = True

    def residual(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def shortcut(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def is_conditional(self) -> bool:
        return self.gate is not None

    def conditional_part(self, x: Tensor) -> Tensor:
        return self.residual(x)

    def force_decision(self, value: float | None) -> float | None:
        old, self.gate.force = self.gate.force, None if value is None else float(value)
        return old

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is None:
            return torch.relu(self.shortcut(x) + self.residual(x))
        z, p = self.gate(x)
        self.last_gate, self.last_prob = z, p
        s = self.shortcut(x)
        if self.training or not self.skip or self.gate.force is not None and self.gate.force not in (0.0, 1.0):
            return torch.relu(s + z.to(s.dtype).view(-1, 1, 1, 1) * self.residual(x))
        # inference: run the branch only on the samples whose gate is open
        idx = z.nonzero().flatten()
        if idx.numel() == x.shape[0]:
            return torch.relu(s + self.residual(x))
        if idx.numel() == 0:
            return torch.relu(s)
        r = self.residual(x.index_select(0, idx))
        return torch.relu(s.index_add(0, idx, r.to(s.dtype)))


def gated_blocks(model: nn.Module) -> list[GatedResidual]:
    """The gated blocks of a model in forward order (module registration order)."""
    return [m for m in model.modules() if isinstance(m, GatedResidual) and m.gate is not None]


@contextlib.contextmanager
def set_skipping(model: nn.Module, skip: bool) -> Iterator[nn.Module]:
    """Within the block, real compute skipping at inference is on or off (off: ``z * F(x)`` like in
    training); each block's previous setting is restored afterwards."""
    with set_attrs(gated_blocks(model), skip=skip):
        yield model


def forced_gates(model: nn.Module, value: float = 1.0) -> contextlib.AbstractContextManager:
    """Within the block every gate outputs ``value`` (1 = dense network, 0 = all blocks skipped);
    the model interface's :func:`~facetool.models.base.forced_decisions` (every conditional block)."""
    return forced_decisions(model, value)
