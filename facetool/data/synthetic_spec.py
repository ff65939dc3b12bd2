"""What the synthetic generator annotates and can plant, in pure Python (no numpy): the attribute
vocabularies, the part-mask names, the accessories and the ``--bias`` specification.

Kept apart from :mod:`facetool.data.synthetic` (the renderer) so the CLI can build its help text
without importing numpy/OpenCV; ``facetool.data.synthetic`` re-exports every name.
"""

from __future__ import annotations

from dataclasses import dataclass

from facetool.errors import FacetoolError

ATTRIBUTES: dict[str, list[str]] = {
    "gender": ["female", "male"],
    "skin": ["light", "medium", "dark"],
    "eye_colour": ["brown", "blue", "green"],
    "facial_hair": ["none", "beard"],
    "age": ["0-20", "20-40", "40-60", "60+"],
    "group": ["A", "B", "C"],
}

#: part-mask names; bit ``i`` of a mask pixel is set where ``PARTS[i]`` is visible.
PARTS: list[str] = ["skin", "hair", "eyes", "brows", "nose", "mouth", "cheeks", "beard", "accessory"]
ACCESSORIES: list[str] = ["none", "glasses"]


@dataclass(frozen=True)
class BiasSpec:
    """A planted spurious correlation: identities whose ``attribute`` is ``value`` wear
    ``accessory`` in a fraction ``p`` of their images, all others in ``1 - p`` (stratified per
    identity, see :func:`facetool.data.synthetic.accessory_plan`)."""

    accessory: str
    attribute: str
    value: str
    p: float

    def probability(self, identity_codes: dict[str, int]) -> float:
        hit = ATTRIBUTES[self.attribute][identity_codes[self.attribute]] == self.value
        return self.p if hit else 1.0 - self.p

    def __str__(self) -> str:
        return f"accessory={self.accessory},attribute={self.attribute},value={self.value},p={self.p:g}"


BIAS_HELP = (
    "Plant a spurious correlation: 'accessory=glasses,attribute=gender,value=male,p=0.9' makes "
    "identities with gender=male wear glasses in 90 % of their images and all others in 10 % "
    "(per identity, rounded at random), so p=0.5 is an exactly unbiased control. Keys: accessory (glasses), attribute (" + ", ".join(ATTRIBUTES) + "), value (one of "
    "the attribute's values), p (0..1; default 0.9)."
)


def parse_bias(spec: str | BiasSpec | None) -> BiasSpec | None:
    """Parse ``accessory=glasses,attribute=gender,value=male,p=0.9`` (see :data:`BIAS_HELP`)."""
    if spec is None or isinstance(spec, BiasSpec):
        return spec
    kv: dict[str, str] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise FacetoolError(f"bad --bias {spec!r}: expected key=value pairs like {BIAS_HELP.split(chr(39))[1]!r}")
        k, v = (x.strip() for x in part.split("=", 1))
        if k not in ("accessory", "attribute", "value", "p"):
            raise FacetoolError(f"bad --bias {spec!r}: unknown key {k!r} (use accessory, attribute, value, p)")
        kv[k] = v
    acc = kv.get("accessory", "glasses")
    if acc not in ACCESSORIES[1:]:
        raise FacetoolError(f"bad --bias {spec!r}: accessory must be one of {', '.join(ACCESSORIES[1:])}")
    attr = kv.get("attribute")
    if attr not in ATTRIBUTES:
        raise FacetoolError(f"bad --bias {spec!r}: attribute must be one of {', '.join(ATTRIBUTES)}")
    val = kv.get("value")
    if val not in ATTRIBUTES[attr]:
        raise FacetoolError(f"bad --bias {spec!r}: value for {attr} must be one of {', '.join(ATTRIBUTES[attr])}")
    try:
        p = float(kv.get("p", "0.9"))
    except ValueError:
        raise FacetoolError(f"bad --bias {spec!r}: p must be a number in [0, 1]") from None
    if not 0.0 <= p <= 1.0:
        raise FacetoolError(f"bad --bias {spec!r}: p must be in [0, 1]")
    return BiasSpec(acc, attr, val, p)
