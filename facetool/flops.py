"""FLOPs and parameters, counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per
multiply-add, only the ops that actually ran). Convolutions and matrix products are counted;
element-wise ops (BN, ReLU, pooling, additions) are not, as usual.

For conditional models (ConvNet-AIG/IIG gates, or any model whose blocks decide per sample) the cost
of an image depends on its decisions::

    executed(b) = (dense - sum_l block_l) + sum_l gates[b, l] * block_l

where ``block_l`` is the FLOPs of block l's conditional part (a gated block's residual branch); the
base (stem, shortcuts, the decision layers themselves, head) always runs. Which blocks are
conditional, what they skip and how to force their decisions comes from the model interface
(:func:`facetool.models.base.conditional_blocks`, :func:`~facetool.models.base.forced_decisions`),
so every conditional model plugs into the same counter.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from facetool.models.base import conditional_blocks, forced_decisions


def _input_size(model: nn.Module, input_size: int | None) -> int:
    size = input_size or getattr(model, "input_size", None) or getattr(model, "config", {}).get("input_size")
    if not size:
        raise ValueError("input_size is needed (the model does not record one)")
    return int(size)


def _count(fn, *args) -> int:
    with FlopCounterMode(display=False) as fc:
        fn(*args)
    return int(fc.get_total_flops())


def _probe(model: nn.Module, size: int, batch: int) -> Tensor:
    p = next(model.parameters(), None)
    return torch.zeros(batch, 3, size, size, device=p.device if p is not None else "cpu")


@torch.no_grad()
def count_flops(model: nn.Module, input_size: int | None = None, batch: int = 1) -> int:
    """Dense FLOPs per image (every conditional block forced to run), in eval mode."""
    size = _input_size(model, input_size)
    was = model.training
    model.eval()
    try:
        with forced_decisions(model, 1.0):
            total = _count(model, _probe(model, size, batch))
    finally:
        model.train(was)
    return total // batch


@torch.no_grad()
def gated_block_flops(model: nn.Module, input_size: int | None = None) -> Tensor:
    """(L,) FLOPs per image of each conditional block's conditional part (a gated block's residual
    branch), in the order of the model's decision columns; empty for models that always run everything."""
    blocks = conditional_blocks(model)
    if not blocks:
        return torch.zeros(0, dtype=torch.float64)
    size = _input_size(model, input_size)
    inputs: dict[int, Tensor] = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])) for i, b in enumerate(blocks)]
    was = model.training
    model.eval()
    try:
        with forced_decisions(model, 1.0):
            model(_probe(model, size, 1))
        return torch.tensor([_count(b.conditional_part, inputs[i]) for i, b in enumerate(blocks)], dtype=torch.float64)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)


def executed_flops(model: nn.Module, gates: Tensor, input_size: int | None = None) -> Tensor:
    """(B,) FLOPs each image actually needed given its (B, L) decisions (or probabilities)."""
    block = gated_block_flops(model, input_size)
    dense = float(count_flops(model, input_size))
    g = gates.detach().to(torch.float64).cpu()
    if g.dim() != 2 or g.shape[1] != block.numel():
        raise ValueError(f"gates must be (B, {block.numel()}), got {tuple(g.shape)}")
    return (dense - block.sum()) + g @ block


def decision_rates(gates: Tensor, targets: Sequence[float] | None = None) -> dict[str, float]:
    """Execution statistics of a batch's (B, L) conditional-block decisions (columns in
    ``conditional_blocks()`` order): the mean rate over all blocks (``exec_rate``), over the blocks
    with a target below 1 (``exec_rate_free``, given per-block ``targets``) and per block (``rate_00``
    ...). Averaged over an epoch they are what :func:`executed_gflops` reads back."""
    per = gates.detach().float().mean(0)
    out = {"exec_rate": float(per.mean())}
    if targets is not None:
        free = [i for i, t in enumerate(targets) if t < 1.0]
        if free:
            out["exec_rate_free"] = float(per[free].mean())
    out.update({f"rate_{i:02d}": float(v) for i, v in enumerate(per.tolist())})
    return out


def executed_gflops(model: nn.Module, metrics: Mapping[str, float], input_size: int | None = None,
                    prefixes: Sequence[str] = ("val_", "train_")) -> float | None:
    """GFLOPs per image executed at the mean per-block decision rates ``<prefix>rate_NN`` of ``metrics``
    (:func:`decision_rates`, one per conditional block; the first prefix that has them all); None
    for a model without conditional blocks or metrics without its rates."""
    n = len(conditional_blocks(model))
    for prefix in prefixes:
        rates = [metrics.get(f"{prefix}rate_{i:02d}") for i in range(n)]
        if n and None not in rates:
            return float(executed_flops(model, torch.tensor([rates]), input_size)[0]) / 1e9
    return None


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def part_flops(model: nn.Module, part: str, input_size: int | None = None) -> int:
    """FLOPs per image of the sub-module ``part`` (e.g. FAN-Face's frozen ``fan``), counted on the input it
    receives in a dense forward of ``model``."""
    module = model.get_submodule(part)
    size = _input_size(model, input_size)
    seen: list = []
    hook = module.register_forward_pre_hook(lambda m, a: seen.append(a))
    was = model.training
    model.eval()
    try:
        with forced_decisions(model, 1.0):
            model(_probe(model, size, 1))
    finally:
        hook.remove()
        model.train(was)
    return sum(_count(module, *a) for a in seen)


def flops_summary(model: nn.Module, input_size: int | None = None) -> dict[str, float]:
    """Dense GFLOPs, conditional ("gated") share and parameters (M) of a model, for tables. A model with
    ``frozen_parts`` (FAN-Face's FAN) also gets ``<part>_gflops`` / ``<part>_params_m`` for each: the totals
    include them, so "without the part" is the difference."""
    dense = count_flops(model, input_size)
    block = gated_block_flops(model, input_size)
    out = {"gflops": dense / 1e9, "gated_gflops": float(block.sum()) / 1e9, "params_m": count_params(model) / 1e6,
           "gated_blocks": int(block.numel())}
    for part in getattr(model, "frozen_parts", ()):
        out[f"{part}_gflops"] = part_flops(model, part, input_size) / 1e9
        out[f"{part}_params_m"] = count_params(model.get_submodule(part)) / 1e6
    return out
