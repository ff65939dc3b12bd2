"""The one interface every facetool model has, and everything that explains models relies on.

* ``forward_features(x, internals=None)`` -> the last feature map (or feature vector);
* ``forward_head(features)`` -> logits (classifiers) or the embedding (recognition backbones);
* ``forward(x)`` -> ``forward_head(forward_features(x))``; ``forward(x, return_internals=True)``
  returns ``(output, internals)``;
* ``output_kind`` -> what ``forward`` returns: ``"classification"`` (class logits) or ``"embedding"``
  (a face embedding). It is not the *task* a classifier predicts (``train --task``: identity, one
  attribute, all attributes), which is ``model.config["task"]`` read by :func:`facetool.tasks.task_of`.

``internals`` is a plain dict the model fills with its named internal quantities, always under the
same names and shapes across models (see :data:`INTERNALS`). Plain ``forward(x)`` returns a tensor,
so the same model works with zennit, captum, ONNX export and DDP.

Conditional computation (ConvNet-AIG/IIG gates, and any later model that skips work per sample) is
described by the model too: its :class:`ConditionalBlock` s, in the order of the columns of
``internals["gates"]``, say what they skip and let a caller force their decisions
(:meth:`FaceModel.conditional_blocks`, :meth:`FaceModel.forced_decisions`). Executed-FLOP counting
(:mod:`facetool.flops`) and dense explanations use only this interface, never a method module.
The interface as a whole: CONTRACTS.md "Models".
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch
from torch import nn

#: Names and meaning of the internals a model may report.
INTERNALS = {
    "gates": "(B, L) hard 0/1 decisions of the L conditional blocks, in conditional_blocks() order "
             "(straight-through in training)",
    "gate_probs": "(B, L) probability of executing each gated block",
    "routing": "(B, D) routing vectors of the dynamic layers, concatenated in forward order (CondFace: each "
               "group's slice of n experts sums to 1)",
    "attention": "(B, A, h, w) attention maps in [0, 1]; A = 1 single-task, A = number of attributes multi-task",
    "attention_logits": "(B, C) logits of an attention branch",
    "block_flops": "(L,) FLOPs per image of each gated block when executed",
    # FAN (models/fan.py): per stack i, a list of 256-channel maps of hourglass i+1
    "h2l": "per stack: the hourglass's high-to-low half [b1_4, b2_4, b2_3, b2_2, b2_1] at S/4 .. S/64 px (FAN)",
    "l2h": "per stack: the hourglass's low-to-high half [b3_1, b3_2, b3_3, b3_4, output] at S/64 .. S/4 px (FAN)",
    # FAN-Face (models/fanface.py)
    "fan_heatmaps": "(B, P, h, w) the frozen FAN's hourglass-2 heatmaps of the P points FAN-Face uses (51 of iBUG 68)",
    "heatmap_pred": "(B, P, h, w) the multi-task baseline's heatmaps predicted after the last stage (FAN-Face)",
}


#: the values of ``model.output_kind``: class logits, or a face embedding
CLASSIFICATION, EMBEDDING = "classification", "embedding"
#: a landmark model (FAN): ``forward`` returns the list of every stack's heatmaps, not one tensor
HEATMAPS = "heatmaps"
OUTPUT_KINDS = (CLASSIFICATION, EMBEDDING, HEATMAPS)


_TASK_DEPRECATED = ("model.task is deprecated after facetool 0.2.1 (easy to confuse with `train --task`); "
                    "use model.output_kind")


def _get_task(self: Any) -> str:
    warnings.warn(_TASK_DEPRECATED, DeprecationWarning, stacklevel=2)
    return self.output_kind


def _set_task(self: Any, value: str) -> None:
    warnings.warn(_TASK_DEPRECATED, DeprecationWarning, stacklevel=2)
    self.output_kind = value


#: the 0.2.1 name of ``output_kind``, kept for users' scripts and models: reading or setting it warns
#: (DeprecationWarning) and goes to ``output_kind``. facetool itself never uses it (tests/test_contracts.py).
TASK_ALIAS = property(_get_task, _set_task, doc="Deprecated alias of ``output_kind`` (the 0.2.1 name); warns.")


class ConditionalBlock(nn.Module):
    """A block that decides per sample whether its conditional part runs (decision 1) or not (0).

    Executed FLOPs of an image are ``dense - sum_l cost_l + sum_l decision[b, l] * cost_l`` with
    ``cost_l`` the FLOPs of block l's :meth:`conditional_part` on the block's input; everything else
    (stem, shortcuts, the decision layers themselves, head) always runs. A subclass implements:

    * :meth:`conditional_part` -- the computation that runs only where the decision is 1, applied to
      the block's input (for a gated residual block: the residual branch);
    * :meth:`force_decision` -- from now on every sample gets ``value`` (1 = dense, 0 = skipped;
      None = the block decides again); returns the previous setting so it can be restored;
    * :attr:`is_conditional` -- False for an instance built without a decision (a plain block).

    A block whose cost does not depend on its decisions (e.g. a dynamic convolution that mixes K
    kernels into one) is not conditional in this sense; one that runs only selected experts is one
    conditional block per expert.
    """

    @property
    def is_conditional(self) -> bool:
        return True

    def conditional_part(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def force_decision(self, value: float | None) -> float | None:
        raise NotImplementedError


def conditional_blocks(model: nn.Module) -> list[ConditionalBlock]:
    """The conditional blocks of any module: :meth:`FaceModel.conditional_blocks` where the model
    defines it, else every :class:`ConditionalBlock` sub-module in registration (forward) order."""
    own = getattr(model, "conditional_blocks", None)
    if callable(own):
        return list(own())
    return [m for m in model.modules() if isinstance(m, ConditionalBlock) and m.is_conditional]


def forced_decisions(model: nn.Module, value: float | None = 1.0) -> contextlib.AbstractContextManager:
    """Context manager: within it every conditional block of ``model`` decides ``value`` for every
    sample (1 = the dense network, 0 = every conditional part skipped); afterwards each block's
    previous setting is back. Uses :meth:`FaceModel.forced_decisions` where the model defines it."""
    own = getattr(model, "forced_decisions", None)
    return own(value) if callable(own) else _forced_blocks(model, value)


@contextlib.contextmanager
def _forced_blocks(model: nn.Module, value: float | None) -> Iterator[nn.Module]:
    blocks = conditional_blocks(model)
    old = [b.force_decision(value) for b in blocks]
    try:
        yield model
    finally:
        for b, o in zip(blocks, old):
            b.force_decision(o)


class FaceModel(nn.Module):
    """Base class. Subclasses set ``self.config`` (JSON-able kwargs; ``create_model`` fills it)."""

    #: what ``forward`` returns: ``"classification"`` (class logits) or ``"embedding"`` (see the module doc)
    output_kind: str = CLASSIFICATION
    task = TASK_ALIAS
    #: names of the internals this model reports (subset of INTERNALS)
    internal_names: tuple[str, ...] = ()

    #: named stages (attribute names of sub-modules) that explainers may hook, in forward order
    #: (``dissect units --layers``, Grad-CAM, relevance); subclasses set it
    layer_names: tuple[str, ...] = ()
    #: the entry of ``layer_names`` whose output is the last spatial feature map (Grad-CAM's layer)
    cam_layer: str = ""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        legacy = cls.__dict__.get("task")
        if isinstance(legacy, str):  # a 0.2.1 model class declaring ``task = "embedding"``
            warnings.warn(f"{cls.__name__}.task: {_TASK_DEPRECATED}", DeprecationWarning, stacklevel=2)
            if "output_kind" not in cls.__dict__:
                cls.output_kind = legacy
            cls.task = TASK_ALIAS

    def __init__(self) -> None:
        super().__init__()
        self.config: dict[str, Any] = {}

    def layers(self) -> dict[str, nn.Module]:
        """``{name: module}`` of the named stages, in forward order."""
        return {n: self.get_submodule(n) for n in self.layer_names}

    def get_layer(self, name: str) -> nn.Module:
        """The named stage ``name``; an unknown name is a user error listing the names it has."""
        from facetool.errors import FacetoolError

        if name not in self.layer_names:
            raise FacetoolError(f"model {self.name} has no layer {name!r}; it has: {', '.join(self.layer_names) or 'none'}")
        return self.get_submodule(name)

    def conditional_blocks(self) -> list[ConditionalBlock]:
        """The blocks with per-sample decisions, in the order of the columns of ``internals["gates"]``
        (default: every :class:`ConditionalBlock` sub-module, in registration order). Empty for a
        model that always runs everything."""
        return [m for m in self.modules() if isinstance(m, ConditionalBlock) and m.is_conditional]

    def forced_decisions(self, value: float | None = 1.0) -> contextlib.AbstractContextManager:
        """Context manager: every conditional block decides ``value`` (1 = dense) for every sample;
        previous settings are restored afterwards. Override for decisions that are not per block."""
        return _forced_blocks(self, value)

    def forward_features(self, x: torch.Tensor, internals: dict | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, return_internals: bool = False):
        internals: dict | None = {} if return_internals else None
        out = self.forward_head(self.forward_features(x, internals))
        return (out, internals) if return_internals else out

    @property
    def name(self) -> str:
        return str(self.config.get("name", type(self).__name__))
