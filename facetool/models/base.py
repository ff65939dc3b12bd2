"""The one interface every facetool model has, and everything that explains models relies on.

* ``forward_features(x, internals=None)`` -> the last feature map (or feature vector);
* ``forward_head(features)`` -> logits (classifiers) or the embedding (recognition backbones);
* ``forward(x)`` -> ``forward_head(forward_features(x))``; ``forward(x, return_internals=True)``
  returns ``(output, internals)``.

``internals`` is a plain dict the model fills with its named internal quantities, always under the
same names and shapes across models (see :data:`INTERNALS`). Plain ``forward(x)`` returns a tensor,
so the same model works with zennit, captum, ONNX export and DDP.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: Names and meaning of the internals a model may report.
INTERNALS = {
    "gates": "(B, L) hard 0/1 execution decisions of the L gated blocks (straight-through in training)",
    "gate_probs": "(B, L) probability of executing each gated block",
    "routing": "list of (B, K) routing vectors, one per dynamic layer",
    "attention": "(B, A, h, w) attention maps in [0, 1]; A = 1 single-task, A = number of attributes multi-task",
    "attention_logits": "(B, C) logits of an attention branch",
    "block_flops": "(L,) FLOPs per image of each gated block when executed",
}


class FaceModel(nn.Module):
    """Base class. Subclasses set ``self.config`` (JSON-able kwargs; ``create_model`` fills it)."""

    task: str = "classification"  # or "embedding"
    #: names of the internals this model reports (subset of INTERNALS)
    internal_names: tuple[str, ...] = ()

    #: named stages (attribute names of sub-modules) that explainers may hook, in forward order
    #: (``dissect units --layers``, Grad-CAM, relevance); subclasses set it
    layer_names: tuple[str, ...] = ()
    #: the entry of ``layer_names`` whose output is the last spatial feature map (Grad-CAM's layer)
    cam_layer: str = ""

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
