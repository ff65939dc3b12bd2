"""The canonizer registry: one entry per model class, found along the model's MRO (a subclass uses
its parent's canonizers unless it registers its own).

Every module of this package is imported before the first look-up, so the family files register
themselves: a new architecture is one new file here with one ``@register_canonizer(ModelClass)``
(or a registration in the user's own code), and no edit elsewhere.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from facetool.errors import FacetoolError
from facetool.explainers.lrp.parts import LEAVES


@dataclass(frozen=True)
class Canonization:
    """How LRP brings models of class ``cls`` (and its subclasses) into canonical form: ``canonizers(model)``
    gives the zennit canonizers (applied in that order); ``containers`` are the module types the model may
    contain besides :data:`LEAVES` (the class itself and ``nn.Sequential`` always); ``zennit``: whether zennit's
    hooks can run the canonized model too (``engine="zennit"``; not where a layer's kernel is set per forward)."""

    cls: type
    name: str
    label: str
    canonizers: Callable[[nn.Module], list]
    containers: tuple[type, ...]
    zennit: bool = True


#: model class -> its :class:`Canonization`, in registration order
CANONIZERS: dict[type, Canonization] = {}
_discovered: list[bool] = []


def _discover() -> None:
    """Import every module of this package once (the family files register on import)."""
    if _discovered:
        return
    _discovered.append(True)
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__package__}.{info.name}")


def register_canonizer(cls: type, *, name: str | None = None, label: str | None = None,
                       containers: tuple[type, ...] = (), zennit: bool = True) -> Callable:
    """Decorator: ``fn(model) -> [zennit canonizers]`` canonizes models of class ``cls`` and its
    subclasses. ``name`` is what :func:`check_canonizable` returns (default: the class name in lower
    case), ``label`` how error messages name the family, ``containers`` the sub-module types the
    canonizers handle, ``zennit=False`` where only the one-pass engine runs them. One registration per class."""
    _discover()  # the built-in families first, so a duplicate is seen whatever the import order

    def deco(fn: Callable[[nn.Module], list]) -> Callable[[nn.Module], list]:
        if cls in CANONIZERS:
            raise ValueError(f"{cls.__qualname__} already has an LRP canonizer ({CANONIZERS[cls].canonizers.__module__})")
        CANONIZERS[cls] = Canonization(cls, name or cls.__name__.lower(), label or cls.__name__, fn,
                                       (cls, *containers, nn.Sequential), zennit)
        return fn

    return deco


def _family_list() -> str:
    labels = [c.label for c in CANONIZERS.values()]
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def canonization_of(model: nn.Module) -> Canonization:
    """The registration for ``model``'s class or its nearest registered base class; none is a
    FacetoolError naming the type."""
    _discover()
    for cls in type(model).__mro__:
        if cls in CANONIZERS:
            return CANONIZERS[cls]
    raise FacetoolError(f"LRP cannot canonize a {type(model).__name__} model (facetool canonizes {_family_list()}); "
                        "use --method gradcam, gradcam++ or scorecam for it")


def check_canonizable(model: nn.Module) -> str:
    """The architecture key of ``model``; a model (or a sub-module type) the canonizers do not know is
    a FacetoolError naming it."""
    c = canonization_of(model)
    for name, m in model.named_modules():
        if type(m) in LEAVES or isinstance(m, c.containers):
            continue
        raise FacetoolError(
            f"LRP cannot canonize module {name or '<root>'} of type {type(m).__name__} in {type(model).__name__} "
            f"(known: {', '.join(sorted({t.__name__ for t in LEAVES + c.containers}))}); use --method gradcam"
        )
    return c.name


def canonizers_for(model: nn.Module) -> list:
    """zennit canonizers for ``model`` (after :func:`check_canonizable`)."""
    check_canonizable(model)
    return canonization_of(model).canonizers(model)
