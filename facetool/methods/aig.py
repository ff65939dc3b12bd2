"""ConvNet-AIG: adaptive inference graphs (Veit & Belongie, ECCV 2018), for residual face models.

Each residual block gets a :class:`Gate` on its input (global average pool -> 1x1 conv in->16 -> BN
-> ReLU -> 1x1 conv 16->2 logits ``[closed, open]``; second conv bias ``[0.1, 2]`` so ~87 % open at
start, weights N(0, 0.001)). The block computes ``relu(shortcut(x) + z * F(x))``.

* training: straight-through Gumbel-softmax (temperature 1): the forward value of ``z`` is the hard
  0/1 sample, its gradient the soft one;
* evaluation: a deterministic decision ``z = 1 iff logit_open > logit_closed`` without Gumbel noise
  (the reference code keeps adding noise at test time, its issue #5), and the residual branch really
  runs only on the samples whose gate is open (``index_select`` / ``index_add``), so the outputs
  equal those of masking while closed blocks cost nothing.

Target loss (our choice, documented): ``L_target = sum_l (zbar_l - t_l)^2`` over *all* gated blocks
``l = 1..L`` with ``zbar_l`` the batch mean of the hard gates (straight-through gradient) and
per-block targets from :func:`target_schedule`; blocks pinned at ``t = 1`` are included (they are
pushed to always run, which is what pinning means). The reference code instead skips ``t = 1`` blocks
and divides by L; ``weight`` (``--target-weight``) rescales the term.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from facetool.engine import ClassificationMethod
from facetool.errors import FacetoolError


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


class GatedResidual(nn.Module):
    """Base of residual blocks: ``relu(shortcut(x) + z * residual(x))``; ``gate`` None = plain block.

    Subclasses define ``residual(x)`` and ``shortcut(x)``. After a forward, ``last_gate`` and
    ``last_prob`` hold the block's (B,) decisions (read and cleared by the model). ``skip``
    (default True) lets inference run the branch only where the gate is open; False multiplies
    by the gate instead (same outputs, dense compute; see :func:`set_skipping`)."""

    gate: Gate | None
    skip: bool = True

    def residual(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def shortcut(self, x: Tensor) -> Tensor:
        raise NotImplementedError

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
    blocks = gated_blocks(model)
    was = [b.skip for b in blocks]
    for b in blocks:
        b.skip = skip
    try:
        yield model
    finally:
        for b, w in zip(blocks, was):
            b.skip = w


@contextlib.contextmanager
def forced_gates(model: nn.Module, value: float = 1.0) -> Iterator[nn.Module]:
    """Within the block every gate outputs ``value`` (1 = dense network, 0 = all blocks skipped)."""
    gates = [b.gate for b in gated_blocks(model)]
    old = [g.force for g in gates]
    for g in gates:
        g.force = value
    try:
        yield model
    finally:
        for g, o in zip(gates, old):
            g.force = o


def scaled_pins(num_blocks: int, first: int = 7, last: int = 3, ref_blocks: int = 33) -> tuple[int, int]:
    """Pinned-block counts for a net with ``num_blocks`` gated blocks: ResNet-101 (33 blocks) pins
    the first 7 and last 3; shallower nets pin ``round(7 L / 33)`` and ``round(3 L / 33)``, i.e.
    ResNet-50/34 (16 blocks): first 3, last 1; ResNet-18 (8 blocks): first 2, last 1."""
    return int(round(first * num_blocks / ref_blocks)), int(round(last * num_blocks / ref_blocks))


def target_schedule(num_blocks: int, t: float, first: int | None = None, last: int | None = None) -> list[float]:
    """Per-block execution-rate targets: the middle blocks at ``t``, the first ``first`` and last
    ``last`` pinned to 1.0 (defaults: :func:`scaled_pins`)."""
    if not 0.0 <= t <= 1.0:
        raise FacetoolError(f"--target must be in [0, 1], got {t}")
    f0, l0 = scaled_pins(num_blocks)
    first = f0 if first is None else first
    last = l0 if last is None else last
    if first < 0 or last < 0 or first + last >= num_blocks:
        raise FacetoolError(f"cannot pin {first}+{last} of {num_blocks} gated blocks; leave at least one free")
    return [1.0] * first + [float(t)] * (num_blocks - first - last) + [1.0] * last


def parse_target_schedule(text: str, num_blocks: int) -> list[float]:
    """``"1,1,0.4,..."`` -> list of L floats in [0, 1]."""
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise FacetoolError(f"--target-schedule must be comma-separated numbers, got {text!r}") from None
    if len(vals) != num_blocks:
        raise FacetoolError(f"--target-schedule has {len(vals)} values but the model has {num_blocks} gated blocks")
    bad = [v for v in vals if not 0.0 <= v <= 1.0]
    if bad:
        raise FacetoolError(f"--target-schedule values must be in [0, 1], got {bad[0]}")
    return vals


def target_loss(gates: Tensor, targets: Sequence[float] | Tensor) -> Tensor:
    """``sum_l (mean_b gates[b, l] - t_l)^2`` for gates (B, L) and targets (L,)."""
    t = torch.as_tensor(targets, dtype=torch.float32, device=gates.device)
    if t.shape != gates.shape[1:]:
        raise FacetoolError(f"{t.numel()} targets for {gates.shape[1]} gated blocks")
    return ((gates.float().mean(0) - t) ** 2).sum()


class AIGMethod(ClassificationMethod):
    """Cross-entropy + ``weight * L_target``; metrics top-1/5 and execution rates per block."""

    name = "aig"

    def __init__(self, targets: Sequence[float], weight: float = 1.0) -> None:
        self.targets = [float(t) for t in targets]
        self.weight = float(weight)

    def loss(self, model, batch, out, internals):
        terms = super().loss(model, batch, out, internals)
        terms["target"] = self.weight * target_loss(internals["gates"], self.targets)
        return terms

    def metrics(self, batch, out, internals):
        return {**super().metrics(batch, out, internals), **execution_rates(internals["gates"], self.targets)}

    def meta(self) -> dict:
        return {**super().meta(), "aig": {"targets": self.targets, "weight": self.weight}}


def execution_rates(gates: Tensor, targets: Sequence[float] | None = None) -> dict[str, float]:
    """Mean execution rate over all gated blocks (``exec_rate``), over the blocks with a target
    below 1 (``exec_rate_free``) and per block (``rate_00`` ...)."""
    per = gates.detach().float().mean(0)
    out = {"exec_rate": float(per.mean())}
    if targets is not None:
        free = [i for i, t in enumerate(targets) if t < 1.0]
        if free:
            out["exec_rate_free"] = float(per[free].mean())
    out.update({f"rate_{i:02d}": float(v) for i, v in enumerate(per.tolist())})
    return out
