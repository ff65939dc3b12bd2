"""facetool: a research bench for interpretable, efficient face recognition.

The package is a library first; ``facetool.cli`` is a thin Typer layer over it.

The main entry points are importable from here (``from facetool import create_model, FaceStore,
train``). They are resolved on first access (module ``__getattr__``), so ``import facetool`` -- and
``facetool --help`` -- do not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.1"

from facetool.errors import FacetoolError  # noqa: E402

#: public name -> module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    # models
    "FaceModel": "facetool.models.base",
    "create_model": "facetool.models.registry",
    "list_models": "facetool.models.registry",
    "register_model": "facetool.models.registry",
    "load_model": "facetool.models.checkpoint",
    "save_checkpoint": "facetool.models.checkpoint",
    # data
    "FaceStore": "facetool.store",
    "FaceDataset": "facetool.data.dataset",
    "make_loader": "facetool.data.dataset",
    "open_dataset": "facetool.data.sources",
    "prepare_synthetic": "facetool.data.synthetic",
    # training
    "train": "facetool.engine",
    "train_on_store": "facetool.trainers.classify",
    "TrainConfig": "facetool.engine",
    "Method": "facetool.engine",
    "ClassificationMethod": "facetool.trainers.classify",
    # evaluation
    "evaluate_classifier": "facetool.eval.classification",
    "compare_classifiers": "facetool.eval.classification",
    "evaluate_ijb": "facetool.eval.ijb",
    "verify_bin": "facetool.eval.verification",
    "verify_pairs": "facetool.eval.verification",
    "cluster_purity": "facetool.eval.clusters",
    "cluster_scores": "facetool.eval.clusters",
    "cohort_codes": "facetool.eval.clusters",
    # CondFace
    "sinkhorn": "facetool.trainers.condface",
    # FAN (landmarks)
    "heatmaps_to_landmarks": "facetool.models.fan",
    # cost, export, explanation
    "count_flops": "facetool.flops",
    "count_params": "facetool.flops",
    "executed_flops": "facetool.flops",
    "flops_summary": "facetool.flops",
    "export_onnx": "facetool.export",
    "invert": "facetool.explainers.invert",
    "InversionConfig": "facetool.explainers.invert",
}

__all__ = ["FacetoolError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'facetool' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
