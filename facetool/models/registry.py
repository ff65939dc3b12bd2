"""timm-style model registry: ``@register_model`` on a factory, ``create_model(name, **kw)``, and the
state_dict matchers that recognise bare checkpoints of other projects (``@register_state_dict_matcher``).

Each model belongs to a *family* (the group of names a command offers: ``resnet``, ``aig``, ``abn``,
``recognition``; by default the name of the module that registers it) and may have short *aliases*
(arcface_torch's ``r50`` for ``iresnet50``, ``mbf`` for ``mobilefacenet``). This is the one table of
both: :func:`resolve_model_name` turns what a user typed into a registered name (or an error listing
the family's names), :func:`list_models` lists a family, :func:`model_aliases` its aliases.

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
_FAMILY: dict[str, str] = {}  # registered name -> family
_ALIASES: dict[str, str] = {}  # alias -> registered name
#: functions ``state_dict -> (model_name, kwargs) | None`` recognising bare foreign state_dicts
STATE_DICT_MATCHERS: list[Callable[[dict], "tuple[str, dict] | None"]] = []
_loaded = False


def register_model(name: str | None = None, *, family: str | None = None, aliases: tuple[str, ...] = ()):
    """Decorator registering a model factory under ``name`` (default: the function's name), in ``family``
    (default: the last part of the factory's module name), reachable also as each of ``aliases``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        key = name or fn.__name__
        if key in _REGISTRY and _REGISTRY[key] is not fn:
            raise RuntimeError(f"model {key!r} registered twice")
        for a in aliases:
            if a in _REGISTRY or _ALIASES.get(a, key) != key:
                raise RuntimeError(f"alias {a!r} of {key!r} is already a model name or another model's alias")
        _REGISTRY[key] = fn
        _FAMILY[key] = family or fn.__module__.rpartition(".")[2]
        _ALIASES.update({a: key for a in aliases})
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


def _families(family: str | tuple[str, ...] | None) -> tuple[str, ...] | None:
    return (family,) if isinstance(family, str) else family


def list_models(pattern: str = "", family: str | tuple[str, ...] | None = None) -> list[str]:
    """Registered names containing ``pattern``, of ``family`` (one name or several) when given, sorted
    by family (in the order asked) and then by name with depths in numeric order (resnet18 < resnet101)."""
    _load_all()
    fams = _families(family)
    names = [k for k in _REGISTRY if pattern in k and (fams is None or _FAMILY[k] in fams)]

    return sorted(names, key=lambda k: (fams.index(_FAMILY[k]) if fams else 0, _natural(k)))


def _natural(name: str) -> list[tuple]:
    """Sort key putting depths in numeric order (r18 < r100)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def model_aliases(family: str | tuple[str, ...] | None = None) -> dict[str, str]:
    """``{alias: registered name}`` of the models of ``family`` (all models when None)."""
    _load_all()
    fams = _families(family)
    return {a: n for a, n in sorted(_ALIASES.items(), key=lambda an: (_natural(an[1]), _natural(an[0])))
            if fams is None or _FAMILY[n] in fams}


def model_family(name: str) -> str:
    """The family of a registered name or alias (an unknown name raises FacetoolError)."""
    _load_all()
    key = _ALIASES.get(name, name)
    if key not in _FAMILY:
        raise FacetoolError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _FAMILY[key]


def resolve_model_name(name: str, *, family: str | tuple[str, ...] | None = None, option: str = "--arch",
                       prefix: str = "") -> str:
    """The registered name a user means by ``name`` (case-insensitive; an alias resolved), checked to be
    in ``family``. ``prefix`` is for families whose names wrap a backbone (``aig_``, ``abn_``): the user
    names the backbone (``resnet50``, ``r50``; the prefixed name works too) and the names the error lists
    are the backbones. An unknown name is a FacetoolError naming ``option`` and what is allowed."""
    _load_all()
    fams = _families(family)
    typed = name.strip().lower().removeprefix(prefix) if prefix else name.strip().lower()
    key = prefix + _ALIASES.get(typed, typed)
    if key in _REGISTRY and (fams is None or _FAMILY[key] in fams):
        return key
    names = [n.removeprefix(prefix) for n in list_models(family=family) if n.startswith(prefix)]
    aliases = [f"{a} = {n}" for a, n in model_aliases().items() if prefix + n in _REGISTRY
               and (fams is None or _FAMILY[prefix + n] in fams)]
    raise FacetoolError(f"unknown {option} {name!r}; use one of {', '.join(names)}"
                        + (f" (aliases: {', '.join(aliases)})" if aliases else ""))


def create_model(name: str, **kwargs: Any):
    """Build a registered model (or an alias's model); ``model.config`` records the registered ``name``
    and the kwargs (JSON-able)."""
    _load_all()
    name = _ALIASES.get(name, name)
    if name not in _REGISTRY:
        raise FacetoolError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    model = _REGISTRY[name](**kwargs)
    model.config = {"name": name, **kwargs}
    return model


def match_state_dict(sd: dict, name: str | None = None) -> tuple[str, dict] | None:
    """``(model_name, kwargs)`` of the first matcher recognising ``sd`` (every architecture module is
    imported first); with ``name``, only a match for that model counts (its kwargs: width, sizes ...)."""
    _load_all()
    name = _ALIASES.get(name, name) if name is not None else None
    for matcher in STATE_DICT_MATCHERS:
        found = matcher(sd)
        if found and (name is None or found[0] == name):
            return found[0], dict(found[1])
    return None
