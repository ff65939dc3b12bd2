"""The explainer dispatch: one call, :func:`explain`, gives (B, H, W) maps for every ``--method``
(LRP rules through :mod:`facetool.explainers.lrp`, the Grad-CAM family on the model's ``cam_layer``,
the model's own ``attention`` internal, ``random``)."""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from facetool.errors import FacetoolError
from facetool.explainers.placement import upsample_maps
from facetool.explainers.relevance.targets import Explained

LRP_METHODS = ("lrp", "lrp-gamma", "lrp-ab")


CAM_METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "scorecam": "ScoreCAM"}


METHODS = LRP_METHODS + tuple(CAM_METHODS) + ("random", "attention")


def _cam_layer(model: nn.Module) -> nn.Module:
    name = getattr(model, "cam_layer", "")
    if not name or not hasattr(model, "get_layer"):
        raise FacetoolError(f"{type(model).__name__} names no cam_layer; Grad-CAM needs a facetool model")
    return model.get_layer(name)


#: below this many cells a side, a CAM map cannot localise anything (a 64-px ResNet's layer4 is 2x2)
MIN_CAM_CELLS = 4


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are (cpu for a model without any)."""
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


def cam_resolution(model: nn.Module, size: int) -> tuple[int, int]:
    """(h, w) of the model's ``cam_layer`` output for a ``size`` x ``size`` input (one forward pass)."""
    from facetool.explainers.lrp import eval_mode

    layer = _cam_layer(model)
    seen: dict[str, tuple[int, int]] = {}

    def hook(_m, _i, o):
        o = o[0] if isinstance(o, (tuple, list)) else o
        seen["hw"] = (int(o.shape[-2]), int(o.shape[-1]))

    h = layer.register_forward_hook(hook)
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=model_device(model)))
    finally:
        h.remove()
    return seen["hw"]


def cam_notes(model: nn.Module, method: str, size: int, label: str = "") -> list[str]:
    """A note when a Grad-CAM family ``method`` would work on a ``cam_layer`` map smaller than
    :data:`MIN_CAM_CELLS` a side (its maps then say next to nothing); empty otherwise."""
    if method not in CAM_METHODS:
        return []
    h, w = cam_resolution(model, size)
    if min(h, w) >= MIN_CAM_CELLS:
        return []
    need = size * MIN_CAM_CELLS // max(1, min(h, w))
    return [f"{method} maps of {label or getattr(model, 'name', 'this model')} come from a {h}x{w} map (cam_layer "
            f"{getattr(model, 'cam_layer', '?')} at {size} px input): too coarse to localise anything; train with "
            f"--input-size {need} or more, or use --method lrp"]


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """pytorch-grad-cam's ScoreCAM draws a tqdm bar per image on stderr: its ``tqdm`` module is swapped
    for one whose bars are disabled while a map is computed, then put back."""
    import importlib
    import types

    import tqdm as _tqdm

    quiet = types.SimpleNamespace(tqdm=functools.partial(_tqdm.tqdm, disable=True))
    swapped = []
    for name in ("pytorch_grad_cam.score_cam", "pytorch_grad_cam.ablation_cam"):
        try:
            mod = importlib.import_module(name)
        except ImportError:  # pragma: no cover - another pytorch-grad-cam layout
            continue
        if getattr(mod, "tqdm", None) is _tqdm:
            mod.tqdm = quiet
            swapped.append(mod)
    try:
        yield
    finally:
        for mod in swapped:
            mod.tqdm = _tqdm


def explain(model: nn.Module, x: Tensor, method: str, what: Explained, *, seed: int = 0,
            bias_free: bool = False) -> np.ndarray:
    """Maps (B, H, W) float32 for a batch: signed relevance summed over colour channels (LRP), CAM
    maps in [0, 1] (Grad-CAM family), attention in [0, 1], or uniform noise (random). ``x`` moves to
    the model's device; the maps come back on the CPU."""
    from facetool.explainers.lrp import eval_mode, lrp

    if method not in METHODS:
        raise FacetoolError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
    B, _, H, W = x.shape
    if method == "random":
        g = torch.Generator().manual_seed(int(seed))
        return torch.rand(B, H, W, generator=g).numpy().astype(np.float32)
    x = x.to(model_device(model))
    if method in LRP_METHODS:
        rel, _ = lrp(model, x, what.lrp_output, method, bias_free=bias_free)
        return rel.sum(1).detach().cpu().numpy().astype(np.float32)
    if method == "attention":
        if "attention" not in getattr(model, "internal_names", ()):
            raise FacetoolError(f"--method attention needs a model with an attention map (ABN); "
                                f"{getattr(model, 'name', type(model).__name__)} has none")
        with eval_mode(model), torch.no_grad():
            _, internals = model(x, return_internals=True)
        att = internals["attention"].float().cpu()
        if att.shape[1] > 1:  # one map per attribute head: the explained attribute's, else their mean
            att = att[:, what.head:what.head + 1] if what.head is not None else att.mean(1, keepdim=True)
        up = upsample_maps(att, (H, W), stride=getattr(model, "attention_stride", None))
        return up[:, 0].numpy().astype(np.float32)
    import pytorch_grad_cam

    layer = _cam_layer(model)
    cls = _at_layer_resolution(getattr(pytorch_grad_cam, CAM_METHODS[method]))
    with eval_mode(model), _quiet_progress_bars():
        with cls(model=model, target_layers=[layer]) as cam:
            if method == "scorecam":
                cam.batch_size = 32
            maps = cam(input_tensor=x, targets=what.cam_targets())  # (B, h, w) at the layer's resolution
    maps = torch.from_numpy(np.nan_to_num(np.asarray(maps, np.float32)))[:, None]
    return upsample_maps(maps, (H, W))[:, 0].numpy()  # cells on their receptive-field centres


def _at_layer_resolution(cam_class: type) -> type:
    """``cam_class`` returning its maps at the target layer's resolution: pytorch-grad-cam would resize
    them to the input with cv2.resize (cell j at pixel s*(j + 0.5) - 0.5, half a cell off); facetool
    places them itself (:func:`facetool.explainers.placement.upsample_maps`)."""

    class AtLayerResolution(cam_class):
        def get_target_width_height(self, input_tensor):
            a = self.activations_and_grads.activations[-1]
            return int(a.shape[-1]), int(a.shape[-2])

    AtLayerResolution.__name__ = cam_class.__name__
    return AtLayerResolution


def normalise(maps: np.ndarray) -> np.ndarray:
    """Each map divided by its largest absolute value (for display and averaging)."""
    m = np.asarray(maps, np.float32)
    s = np.abs(m).reshape(len(m), -1).max(1).clip(1e-12)
    return m / s[:, None, None]
