"""The LRP rules (zennit's composites) and the attribution itself, with the canonizers of the model's
family (:mod:`facetool.explainers.lrp.registry`) attached only inside :func:`lrp_context`. The rules run
in one forward and one backward (:mod:`facetool.explainers.lrp.onepass`); the zennit composites stay as
the reference (``engine="zennit"``)."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from facetool.errors import FacetoolError
from facetool.explainers.lrp.registry import canonization_of, canonizers_for
from facetool.hooks import eval_mode

LRP_METHODS = ("lrp", "lrp-gamma", "lrp-ab", "lrp-epsilon")


def input_bounds(x: Tensor) -> tuple[Tensor, Tensor]:
    """Lowest/highest normalised pixel values, shaped like ``x`` (facetool: (v - 127.5) / 127.5)."""
    from facetool.data.transforms import MEAN, STD

    return torch.full_like(x, (0.0 - MEAN) / STD), torch.full_like(x, (255.0 - MEAN) / STD)


def make_composite(method: str, model: nn.Module, x: Tensor, bias_free: bool = False, epsilon: float = 1e-6):
    """The zennit composite of ``method`` with facetool's canonizers for ``model``."""
    from zennit import composites, rules
    from zennit.types import Convolution

    if method not in LRP_METHODS:
        raise FacetoolError(f"unknown LRP method {method!r}; use one of {', '.join(LRP_METHODS)}")
    zp = ["bias"] if bias_free else None
    canon = canonizers_for(model)
    if method == "lrp":
        return composites.EpsilonPlusFlat(epsilon=epsilon, zero_params=zp, canonizers=canon)
    if method == "lrp-gamma":
        low, high = input_bounds(x)
        return composites.EpsilonGammaBox(low=low, high=high, epsilon=epsilon, zero_params=zp, canonizers=canon)
    if method == "lrp-ab":
        return composites.EpsilonAlpha2Beta1(epsilon=epsilon, zero_params=zp, canonizers=canon)
    layer_map = composites.layer_map_base() + [
        ((Convolution, nn.Linear), rules.Epsilon(epsilon=epsilon, zero_params=zp)),
    ]
    return composites.LayerMapComposite(layer_map=layer_map, canonizers=canon)


ENGINES = ("onepass", "zennit")


@contextlib.contextmanager
def lrp_context(model: nn.Module, method: str, x: Tensor, bias_free: bool = False,
                epsilon: float = 1e-6, engine: str = "onepass") -> Iterator[nn.Module]:
    """Canonizers and rules attached to ``model`` inside the block (eval mode), removed after.

    ``engine="onepass"`` (default): the rules as temporary layer forwards whose products are the rules'
    redistributions (:mod:`facetool.explainers.lrp.onepass`: one forward, one ordinary backward);
    ``"zennit"``: zennit's composite with its per-layer backward hooks (the reference)."""
    if engine == "zennit":
        if not canonization_of(model).zennit:
            raise FacetoolError(f"zennit's hooks cannot explain a {canonization_of(model).label} model (its kernels are set "
                                "per forward); use the one-pass engine")
        composite = make_composite(method, model, x, bias_free, epsilon)
        with eval_mode(model):
            composite.register(model)
            try:
                yield model
            finally:
                composite.remove()
        return
    if engine != "onepass":
        raise FacetoolError(f"unknown LRP engine {engine!r}; use one of {', '.join(ENGINES)}")
    from facetool.explainers.lrp.onepass import layer_maps, rules_attached

    if method not in LRP_METHODS:
        raise FacetoolError(f"unknown LRP method {method!r}; use one of {', '.join(LRP_METHODS)}")
    first_map, layer_map = layer_maps(method, input_bounds(x) if method == "lrp-gamma" else None, bias_free, epsilon)
    canon = canonizers_for(model)
    with eval_mode(model):
        handles: list = []
        try:
            for canonizer in canon:
                handles += canonizer.apply(model)
            with rules_attached(model, first_map, layer_map):
                yield model
        finally:
            for handle in handles:  # in the order applied, as zennit's Composite.remove
                handle.remove()


def lrp(model: nn.Module, x: Tensor, attr_output: Callable[[Tensor], Tensor], method: str = "lrp",
        bias_free: bool = False, epsilon: float = 1e-6, engine: str = "onepass") -> tuple[Tensor, Tensor]:
    """Relevance of each input value: ``(relevance (B, C, H, W), model output)``.

    ``attr_output(out)`` gives the relevance at the model output (e.g. the one-hot class logit, or the
    embedding's terms of the cosine to a reference); the input relevance sums to its sum (exactly with
    ``bias_free`` up to the stabilisers). One forward and one backward (``engine="onepass"``); zennit's
    hooks with ``engine="zennit"`` give the same maps."""
    x = x.detach().clone().requires_grad_(True)
    with lrp_context(model, method, x, bias_free, epsilon, engine):
        out = model(x)
        rel, = torch.autograd.grad(out, x, grad_outputs=attr_output(out.detach()).to(out.dtype))
    return rel.detach().contiguous(), out.detach()
