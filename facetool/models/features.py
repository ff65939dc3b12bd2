"""Which output of a model a command uses, and at which input size the model wants its faces.

Embedding commands (IJB, LFW-family verification, ONNX export, inversion targets and judges) need a
face *embedding*. An embedding model (IR-ResNet, MobileFaceNet, ONNX recognition models) gives one
directly; a *classifier* (ResNet / ConvNet-AIG / ConvNet-IIG with a class head) gives class logits,
which are not an embedding: scoring them as one gives wrong results without a word. So
:func:`select_features` refuses a classifier unless the caller asks for

* ``"penultimate"``: the pooled last feature map (:class:`PooledFeatures`, the input of the class
  head), or
* ``"logits"``: the class logits themselves (only where they make sense, e.g. exporting a classifier).

:func:`input_size_of` is the square input size a model was built for (``None`` when it does not say);
evaluation resizes the aligned 112-px crops to it.
"""

from __future__ import annotations

from typing import Any

import torch

from facetool.errors import FacetoolError
from facetool.models.base import CLASSIFICATION, EMBEDDING, HEATMAPS, FaceModel

#: the choices of ``--features``
FEATURES = ("embedding", "penultimate", "logits")
#: what the embedding protocols (IJB, LFW-family) accept
EMBEDDING_FEATURES = ("embedding", "penultimate")


def is_classifier(model: Any) -> bool:
    """Whether ``model`` outputs class logits (a class head), not an embedding."""
    return getattr(model, "output_kind", EMBEDDING) == CLASSIFICATION


def is_landmark_model(model: Any) -> bool:
    """Whether ``model`` outputs landmark heatmaps (a FAN): neither an embedding nor class logits."""
    return getattr(model, "output_kind", None) == HEATMAPS


def landmark_refusal(model: Any, option: str = "--model") -> FacetoolError:
    """The one message for "this is a landmark model (FAN), not a face-recognition model or classifier"."""
    name = getattr(model, "name", None) or getattr(model, "config", {}).get("name") or type(model).__name__
    return FacetoolError(f"{option}: {name} is a landmark model (FAN): its outputs are landmark heatmaps, not a face "
                         "embedding or class logits; this command takes a face-recognition model (train arcface, an "
                         "arcface_torch backbone, an ONNX recognition model) or a classifier (with --features "
                         "penultimate); a FAN is for eval landmarks and train fanface --fan")


def model_label(model: Any) -> str:
    """``name`` (+ the number of classes of a classifier) for messages."""
    name = getattr(model, "name", None) or getattr(model, "config", {}).get("name") or type(model).__name__
    classes = getattr(model, "config", {}).get("num_classes")
    return f"{name} ({classes} classes)" if is_classifier(model) and classes else str(name)


def classifier_refusal(model: Any, option: str = "--features", logits: bool = False) -> FacetoolError:
    """The one message for "this is a classifier, not an embedding model"."""
    return FacetoolError(f"{model_label(model)} is a classifier: its outputs are class logits, not a face "
                         f"embedding; pass {option} penultimate to use its pooled penultimate feature instead"
                         + (f" (or {option} logits for the class logits themselves)" if logits else ""))


def input_size_of(model: Any) -> int | None:
    """The square input size the model was built for, or None when it does not say."""
    inner = getattr(model, "model", None) if isinstance(model, PooledFeatures) else model
    size = getattr(inner, "input_size", None)
    if size is None:
        size = getattr(inner, "config", {}).get("input_size")
    try:
        return int(size) if size else None
    except (TypeError, ValueError):
        return None


class PooledFeatures(FaceModel):
    """A model's pooled penultimate feature as its output: global average of ``forward_features``
    (the input of the class head of a ResNet / AIG / IIG classifier). Wraps, never modifies, the model;
    ``forward(x, return_internals=True)`` still reports the wrapped model's internals (gates ...)."""

    output_kind = EMBEDDING

    def __init__(self, model: FaceModel) -> None:
        super().__init__()
        self.model = model
        self.config = {**getattr(model, "config", {}), "features": "penultimate"}
        self.meta = getattr(model, "meta", {})
        self.internal_names = tuple(getattr(model, "internal_names", ()))
        self.layer_names = tuple(f"model.{n}" for n in getattr(model, "layer_names", ()))
        cam = getattr(model, "cam_layer", "")
        self.cam_layer = f"model.{cam}" if cam else ""
        self.training = model.training

    @property
    def input_size(self) -> int | None:
        return input_size_of(self.model)

    @property
    def name(self) -> str:
        return f"{self.model.name}:penultimate"

    def forward_features(self, x: torch.Tensor, internals: dict | None = None) -> torch.Tensor:
        return self.model.forward_features(x, internals)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return features.mean((2, 3)) if features.dim() == 4 else features.flatten(1)


def select_features(model: Any, features: str = "embedding", *, option: str = "--features",
                    allowed: tuple[str, ...] = FEATURES) -> Any:
    """The model whose output is the requested ``features`` of ``model``:

    * ``embedding``: the model itself; a classifier is refused (its logits are no embedding);
    * ``penultimate``: :class:`PooledFeatures` of a PyTorch model;
    * ``logits``: a classifier itself; refused for embedding models (they have no class head).
    """
    if features not in allowed:
        raise FacetoolError(f"{option} {features!r} is not one of: {', '.join(allowed)}")
    if is_landmark_model(model):  # no choice of features makes heatmaps a face embedding
        raise landmark_refusal(model)
    if features == "embedding":
        if is_classifier(model):
            raise classifier_refusal(model, option, logits="logits" in allowed)
        return model
    if features == "logits":
        if not is_classifier(model):
            raise FacetoolError(f"{model_label(model)} has no class head; {option} logits applies to classifiers "
                                f"(use {option} embedding)")
        return model
    if not isinstance(model, FaceModel):
        raise FacetoolError(f"{option} penultimate needs a facetool or PyTorch model; {model_label(model)} exposes "
                            f"only its output")
    return model if isinstance(model, PooledFeatures) else PooledFeatures(model)


def require_embedder(model: Any, option: str = "--features") -> None:
    """Refuse a classifier or a landmark model where an embedding is needed (the check every embedding protocol
    runs)."""
    if is_landmark_model(model):
        raise landmark_refusal(model)
    if is_classifier(model):
        raise classifier_refusal(model, option)
