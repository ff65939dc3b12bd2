"""timm-style model registry: ``@register_model`` on a factory, ``create_model(name, **kw)``.

Every module in ``facetool.models`` is imported on first use, so an architecture file only has to
decorate its factories to appear here.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

from facetool.errors import FacetoolError

_REGISTRY: dict[str, Callable[..., Any]] = {}
_loaded = False


def register_model(name: str | None = None):
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        key = name or fn.__name__
        if key in _REGISTRY and _REGISTRY[key] is not fn:
            raise RuntimeError(f"model {key!r} registered twice")
        _REGISTRY[key] = fn
        return fn

    return deco


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
