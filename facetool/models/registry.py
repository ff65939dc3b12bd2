"""timm-style model registry: ``@register_model`` on a factory, ``create_model(name, **kw)``, and the
state_dict matchers that recognise bare checkpoints of other projects (``@register_state_dict_matcher``).

Every module in ``facetool.models`` is imported before any lookup (:func:`create_model`,
:func:`list_models`, :func:`match_state_dict`), so an architecture file only has to decorate its
factories and matchers to appear here, and what a lookup finds never depends on what the caller
happened to import first.
"""

from __future__ import annotations

import importlib
import re
import pkgutil
from typing import Any, Callable

from facetool.errors import FacetoolError

_REGISTRY: dict[str, Callable[..., Any]] = {}
#: functions ``state_dict -> (model_name, kwargs) | None`` recognising bare foreign state_dicts
STATE_DICT_MATCHERS: list[Callable[[dict], "tuple[str, dict] | None"]] = []
_loaded = False


def register_model(name: str | None = None):
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        key = name or fn.__name__
        if key in _REGISTRY and _REGISTRY[key] is not fn:
            raise RuntimeError(f"model {key!r} registered twice")
        _REGISTRY[key] = fn
        return fn

    return deco


def stage_block_counts(sd: dict) -> list[int]:
    """Blocks per stage ``layer1..layer4`` of a ResNet-layout state_dict (from ``layerN.M.conv1.weight``
    keys): what the state-dict matchers compare with each depth's layout."""
    counts = [0, 0, 0, 0]
    for k in sd:
        m = _STAGE_BLOCK.match(k)
        if m:
            counts[int(m.group(1)) - 1] = max(counts[int(m.group(1)) - 1], int(m.group(2)) + 1)
    return counts


_STAGE_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.conv1\.weight$")


def register_state_dict_matcher(fn: Callable[[dict], "tuple[str, dict] | None"]):
    """Decorator: ``fn(state_dict) -> (model_name, kwargs) | None`` recognises a bare state_dict
    (e.g. arcface_torch's ``backbone.pth``) and says which registered model and kwargs rebuild it."""
    if fn not in STATE_DICT_MATCHERS:
        STATE_DICT_MATCHERS.append(fn)
    return fn


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    import facetool.models as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        if not m.name.startswith("_"):
            importlib.import_module(f"facetool.models.{m.name}")
    _loaded = True


def list_models(pattern: str = "") -> list[str]:
    _load_all()
    return sorted(k for k in _REGISTRY if pattern in k)


def create_model(name: str, **kwargs: Any):
    """Build a registered model; ``model.config`` records ``name`` and the kwargs (JSON-able)."""
    _load_all()
    if name not in _REGISTRY:
        raise FacetoolError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    model = _REGISTRY[name](**kwargs)
    model.config = {"name": name, **kwargs}
    return model


def match_state_dict(sd: dict, name: str | None = None) -> tuple[str, dict] | None:
    """``(model_name, kwargs)`` of the first matcher recognising ``sd`` (every architecture module is
    imported first); with ``name``, only a match for that model counts (its kwargs: width, sizes ...)."""
    _load_all()
    for matcher in STATE_DICT_MATCHERS:
        found = matcher(sd)
        if found and (name is None or found[0] == name):
            return found[0], dict(found[1])
    return None
