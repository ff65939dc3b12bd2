"""The explainer dispatch: one call, :func:`explain`, gives (B, H, W) maps for every ``--method``
(LRP rules through :mod:`facetool.explainers.lrp`, the Grad-CAM family on the model's ``cam_layer``,
the model's own ``attention`` internal, ``random``)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from facetool.errors import FacetoolError
from facetool.explainers.relevance.targets import Explained

LRP_METHODS = ("lrp", "lrp-gamma", "lrp-ab")


CAM_METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "scorecam": "ScoreCAM"}


METHODS = LRP_METHODS + tuple(CAM_METHODS) + ("random", "attention")


def _cam_layer(model: nn.Module) -> nn.Module:
    name = getattr(model, "cam_layer", "")
    if not name or not hasattr(model, "get_layer"):
        raise FacetoolError(f"{type(model).__name__} names no cam_layer; Grad-CAM needs a facetool model")
    return model.get_layer(name)


def explain(model: nn.Module, x: Tensor, method: str, what: Explained, *, seed: int = 0,
            bias_free: bool = False) -> np.ndarray:
    """Maps (B, H, W) float32 for a batch: signed relevance summed over colour channels (LRP), CAM
    maps in [0, 1] (Grad-CAM family), attention in [0, 1], or uniform noise (random)."""
    from facetool.explainers.lrp import eval_mode, lrp

    if method not in METHODS:
        raise FacetoolError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
    B, _, H, W = x.shape
    if method == "random":
        g = torch.Generator().manual_seed(int(seed))
        return torch.rand(B, H, W, generator=g).numpy().astype(np.float32)
    if method in LRP_METHODS:
        rel, _ = lrp(model, x, what.lrp_output, method, bias_free=bias_free)
        return rel.sum(1).numpy().astype(np.float32)
    if method == "attention":
        if "attention" not in getattr(model, "internal_names", ()):
            raise FacetoolError(f"--method attention needs a model with an attention map (ABN); "
                                f"{getattr(model, 'name', type(model).__name__)} has none")
        with eval_mode(model), torch.no_grad():
            _, internals = model(x, return_internals=True)
        att = internals["attention"].float()
        if att.shape[1] > 1:  # one map per attribute head: the explained attribute's, else their mean
            att = att[:, what.head:what.head + 1] if what.head is not None else att.mean(1, keepdim=True)
        from facetool.explainers.attention import upsample_maps  # cells on their receptive-field centres

        up = upsample_maps(att, (H, W), stride=getattr(model, "attention_stride", None))
        return up[:, 0].numpy().astype(np.float32)
    import pytorch_grad_cam

    layer = _cam_layer(model)
    cls = getattr(pytorch_grad_cam, CAM_METHODS[method])
    with eval_mode(model):
        with cls(model=model, target_layers=[layer]) as cam:
            if method == "scorecam":
                cam.batch_size = 32
            maps = cam(input_tensor=x, targets=what.cam_targets())
    return np.nan_to_num(np.asarray(maps, np.float32))


def normalise(maps: np.ndarray) -> np.ndarray:
    """Each map divided by its largest absolute value (for display and averaging)."""
    m = np.asarray(maps, np.float32)
    s = np.abs(m).reshape(len(m), -1).max(1).clip(1e-12)
    return m / s[:, None, None]
