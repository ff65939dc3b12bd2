"""FAN-Face training (thesis ch. 3): train arcface's recipe (:func:`facetool.trainers.arcface.train_arcface`,
the margin head of :class:`ArcFaceMethod`) on a :class:`facetool.models.fanface.FanFace` whose frozen FAN comes
from a file (``train fan``'s checkpoint, or a public-layout FAN state_dict / TorchScript archive).

:class:`FanFaceMethod` adds the multi-task baseline's term, ``0.1 · mean (heatmap_pred − FAN heatmaps)²``, and
reports the integration layers' γ in the checkpoint meta.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import nn

from facetool.engine import TrainConfig
from facetool.errors import FacetoolError
from facetool.models.fanface import HOURGLASS, MULTITASK_WEIGHT
from facetool.trainers.arcface import ArcFaceMethod, resolve_network, train_arcface


class FanFaceMethod(ArcFaceMethod):
    """ArcFace (or CosFace / softmax) on FAN-Face; with the multi-task head, + 0.1 · L2 to the FAN's heatmaps."""

    name = "fanface"

    def __init__(self, *args: Any, multitask: bool = False, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.multitask = multitask
        self._model: nn.Module | None = None

    def loss(self, model, batch, out, internals):
        terms = super().loss(model, batch, out, internals)
        self._model = model
        if self.multitask:
            terms["heatmap_l2"] = MULTITASK_WEIGHT * F.mse_loss(internals["heatmap_pred"].float(),
                                                                internals["fan_heatmaps"].float())
        return terms

    def meta(self) -> dict:
        out = {**super().meta(), "multitask_weight": MULTITASK_WEIGHT if self.multitask else 0.0}
        gammas = getattr(self._model, "gammas", None)
        if callable(gammas):
            out["gammas"] = gammas()
        return out


def load_fan(path: str | Path, arch: str | None = None) -> nn.Module:
    """The FAN in ``path`` (a ``train fan`` checkpoint, a public 2DFAN state_dict or TorchScript archive), cut to
    its first two hourglasses when it has more (hourglass 2's outputs do not depend on the later stacks, so
    they are the same; the thesis took its 2-stack FAN from the 4-stack one). Anything else: one line."""
    from facetool.models import create_model, load_model
    from facetool.models.fan import FAN, adapt_public_state_dict, fan_name

    try:
        fan = load_model(path, name=arch)
    except FacetoolError as e:
        if "cannot tell the architecture" not in str(e):
            raise
        raise FacetoolError(f"--fan {path} is not a FAN file: neither a facetool checkpoint nor a state_dict in the "
                            "public FAN layout (conv1, m0.b1_4..., l0)") from None
    if not isinstance(fan, FAN):
        raise FacetoolError(f"--fan {path} is not a FAN (it holds {getattr(fan, 'name', type(fan).__name__)}); "
                            "give a file written by `facetool train fan` or a public 2DFAN state_dict")
    if fan.num_stacks < HOURGLASS:
        raise FacetoolError(f"--fan {path} has {fan.num_stacks} hourglass(es); FAN-Face reads hourglass {HOURGLASS}: "
                            "train one with `facetool train fan --stacks 2`")
    if fan.num_stacks > HOURGLASS:
        kw = {k: v for k, v in fan.config.items() if k not in ("name", "task")}
        cut = create_model(fan_name(HOURGLASS), **kw)
        cut.load_state_dict(adapt_public_state_dict(fan.state_dict(), HOURGLASS))
        cut.meta = getattr(fan, "meta", {})
        fan = cut
    return fan.eval()


def train_fanface(store: str | Path, cfg: TrainConfig, *, fan: str | Path, network: str = "r34",
                  input_heatmaps: str = "none", integration: str = "bl", taps: str = "h2l-2", mode: str = "1-1",
                  multitask: bool = False, width: int = 64, **kw: Any) -> dict[str, float]:
    """Train FAN-Face on ``store`` (see :func:`facetool.trainers.arcface.train_arcface` for ``kw``: loss,
    embedding and input size, scale, margins, validation packs). ``fan``: the FAN file (frozen, copied into the
    checkpoint, which then holds both networks)."""
    from facetool.models.fanface import INPUT_HEATMAPS, INTEGRATIONS, MODES, TAPS, _choice

    for value, allowed, option in ((input_heatmaps, INPUT_HEATMAPS, "--input-heatmaps"),
                                   (integration, INTEGRATIONS, "--integration"), (taps, TAPS, "--taps"),
                                   (mode, MODES, "--mode")):
        _choice(value, allowed, option)
    frn = resolve_network(network)
    if not frn.startswith("iresnet"):
        raise FacetoolError(f"FAN-Face's recogniser is an IR-ResNet (r18 .. r200), not {network!r}")
    fan_model = load_fan(fan)
    fan_cfg = dict(fan_model.config)  # a FAN has no task: its config is its constructor keywords

    def load_weights(model: nn.Module) -> None:
        model.fan.load_state_dict(fan_model.state_dict())

    model_kwargs = {"fan": fan_cfg, "network": frn, "width": width, "input_heatmaps": input_heatmaps,
                    "integration": integration, "taps": taps, "mode": mode, "multitask": multitask}
    cfg.extra = {**cfg.extra, "fan": str(fan), "recogniser": frn}

    def method(model, **mkw):
        return FanFaceMethod(multitask=multitask, **mkw)

    return train_arcface(store, cfg, network="fanface", family="fanface", model_kwargs=model_kwargs,
                         method_factory=method, prepare_model=load_weights, **kw)
