"""Model registry, the shared model interface and checkpoints."""

from facetool.models.base import INTERNALS, FaceModel
from facetool.models.checkpoint import load_model, load_state_dict_checked, read_checkpoint, save_checkpoint
from facetool.models.registry import (
    create_model,
    list_models,
    match_state_dict,
    register_model,
    register_state_dict_matcher,
)

__all__ = [
    "INTERNALS",
    "FaceModel",
    "create_model",
    "list_models",
    "register_model",
    "register_state_dict_matcher",
    "match_state_dict",
    "load_model",
    "load_state_dict_checked",
    "read_checkpoint",
    "save_checkpoint",
]
