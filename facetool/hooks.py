"""Attaching to a model without modifying it: forward taps and set-and-restore of attributes.

Explainers, distillation and dissection read a model through removable forward hooks (:func:`taps`)
and change its modes only inside a block (:func:`set_attrs`, :func:`temporarily`, :func:`eval_mode`,
:func:`frozen`). On exit, normal or by an exception, the hooks are gone and every attribute has its
previous value again, so the model is as it was (the house rule: what reads a model attaches to it as
a context manager and never modifies it).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Sequence

from torch import nn

from facetool.errors import FacetoolError

_MISSING = object()


def _restorable_by_setattr(obj: Any, name: str) -> bool:
    """True when ``setattr(obj, name, old)`` puts back exactly what was there: the value lives on the
    instance (its ``__dict__``, or a module's parameters/buffers/sub-modules) or behind a data
    descriptor (a property, a tensor's ``requires_grad``). False for a value only inherited from the
    class: then restoring means deleting the instance attribute again."""
    if name in getattr(obj, "__dict__", {}):
        return True
    if isinstance(obj, nn.Module) and (name in obj._parameters or name in obj._buffers or name in obj._modules):
        return True
    return hasattr(getattr(type(obj), name, None), "__set__") or not hasattr(obj, "__dict__")


@contextlib.contextmanager
def set_attrs(objects: Iterable[Any], **attrs: Any) -> Iterator[list[Any]]:
    """Within the block every object of ``objects`` has the attributes ``attrs``; on exit (also on an
    error, also one raised while setting them) each one set is restored, last first, so an object
    listed twice and nested uses get their original values back. Yields the objects as a list."""
    objs = list(objects)
    saved: list[tuple[Any, str, Any]] = []
    try:
        for obj in objs:
            for name, value in attrs.items():
                old = getattr(obj, name, _MISSING)
                if old is not _MISSING and not _restorable_by_setattr(obj, name):
                    old = _MISSING  # inherited from the class: delete the instance value afterwards
                setattr(obj, name, value)
                saved.append((obj, name, old))
        yield objs
    finally:
        for obj, name, old in reversed(saved):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


@contextlib.contextmanager
def temporarily(obj: Any, **attrs: Any) -> Iterator[Any]:
    """:func:`set_attrs` for one object; yields the object."""
    with set_attrs([obj], **attrs):
        yield obj


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every module is in eval mode (``model.eval()``); each module's previous
    ``training`` flag is restored afterwards (not the root's flag copied to all)."""
    with set_attrs(model.modules(), training=False):
        model.eval()  # a module overriding train() still gets its call
        yield model


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block no parameter of ``model`` requires a gradient; each one's previous
    ``requires_grad`` is restored afterwards."""
    with set_attrs(model.parameters(), requires_grad=False):
        yield model


def _named_module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_layer(name)`` for a model that names its stages (a FacetoolError listing them for an
    unknown name), else the sub-module at the dotted path ``name``."""
    if hasattr(model, "get_layer"):
        return model.get_layer(name)
    try:
        return model.get_submodule(name)
    except AttributeError:
        valid = [n for n, _ in model.named_modules() if n]
        shown = ", ".join(valid[:12]) + (f", ... ({len(valid)} in all)" if len(valid) > 12 else "")
        raise FacetoolError(f"{type(model).__name__} has no module {name!r}; it has: {shown or 'none'}") from None


@contextlib.contextmanager
def taps(model: nn.Module, names: Sequence[str], *, detach: bool = False,
         first: bool = False) -> Iterator[dict[str, Any]]:
    """Record the output of each named module (a stage of ``model.get_layer`` where the model has
    it, else a dotted sub-module path) on every forward while the block runs: yields ``{name:
    output}``, refreshed by each forward. ``first``: a tuple/list output is recorded as its first
    element; ``detach``: outputs are detached. Every name is resolved before any hook is attached (an
    unknown one is a FacetoolError naming it and valid ones); the hooks are removed on exit, also on
    an error, leaving the model as it was."""
    found: dict[str, Any] = {}
    modules = {n: _named_module(model, n) for n in dict.fromkeys(names)}
    handles = []
    try:
        for n, mod in modules.items():

            def hook(_m, _inp, out, n=n):
                if first and isinstance(out, (tuple, list)):
                    out = out[0]
                found[n] = out.detach() if detach else out

            handles.append(mod.register_forward_hook(hook))
        yield found
    finally:
        for h in handles:
            h.remove()
