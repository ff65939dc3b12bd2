"""Dense facial landmark conventions (iBUG 68, WFLW 98), their flip permutations, and readers for the
public annotation formats (300W ``.pts``, WFLW list lines).

Coordinates are 0-based pixel coordinates (x, y) of the image they belong to: pixel column ``c`` has its
centre at x = c. A horizontal flip of a W-wide image moves column c to ``W - 1 - c``, so a point's x
becomes ``W - 1 - x`` and left/right points swap indices through :attr:`Convention.flip_permutation`
(the iBUG / WFLW mirror tables, built here from each convention's point definitions).

Public API: ``CONVENTIONS[name]`` (``num_points``, ``groups``, ``flip_permutation``, ``inter_ocular``),
:func:`flip_landmarks`, :func:`read_pts`, :func:`parse_wflw_line`, :data:`WFLW98_TO_IBUG68`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facetool.errors import FacetoolError


@dataclass(frozen=True)
class Convention:
    """A landmark convention: its point count, named index groups, flip permutation and the two points
    (outer eye corners) whose distance normalises the inter-ocular NME."""

    name: str
    num_points: int
    groups: dict[str, tuple[int, ...]]  # jaw, brows, nose, eyes, lips (WFLW also pupils)
    parts: dict[str, tuple[int, ...]]  # finer: right_/left_ brow and eye (the subject's side), nose_bridge, ...
    flip_permutation: tuple[int, ...]  # flipped[i] = mirror(points[flip_permutation[i]])
    inter_ocular: tuple[int, int]
    pairs: tuple[tuple[int, int], ...] = field(repr=False, default=())  # left/right mirror pairs

    def group_of(self, index: int) -> str:
        """The name of the group that holds point ``index``."""
        for name, idx in self.groups.items():
            if index in idx:
                return name
        raise KeyError(index)


def _permutation(n: int, pairs: list[tuple[int, int]]) -> tuple[int, ...]:
    """The involution that swaps every pair and fixes every other point."""
    perm = list(range(n))
    for a, b in pairs:
        if perm[a] != a or perm[b] != b:
            raise ValueError(f"point in two mirror pairs: {a}, {b}")
        perm[a], perm[b] = b, a
    return tuple(perm)


def _mirror_run(first: list[int], second: list[int]) -> list[tuple[int, int]]:
    """Pairs of two runs that mirror each other point by point."""
    assert len(first) == len(second)
    return list(zip(first, second))


def _contour(start: int, n: int) -> list[tuple[int, int]]:
    """Pairs of an open contour of ``n`` points traced left to right across the face (jaw, brow line,
    lower nose): point k mirrors point n - 1 - k; the middle one (odd n) mirrors itself."""
    return [(start + k, start + n - 1 - k) for k in range(n // 2)]


def _coarse(parts: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """jaw, brows, nose, eyes, lips (, pupils) from the fine parts."""
    out: dict[str, tuple[int, ...]] = {}
    names = {"jaw": "jaw", "right_brow": "brows", "left_brow": "brows", "nose_bridge": "nose",
             "nose_lower": "nose", "right_eye": "eyes", "left_eye": "eyes", "outer_lips": "lips",
             "inner_lips": "lips", "pupils": "pupils"}
    for part, idx in parts.items():
        out[names[part]] = out.get(names[part], ()) + idx
    return out


def _ibug68() -> Convention:
    r = range
    parts = {
        "jaw": tuple(r(0, 17)), "right_brow": tuple(r(17, 22)), "left_brow": tuple(r(22, 27)),
        "nose_bridge": tuple(r(27, 31)), "nose_lower": tuple(r(31, 36)),
        "right_eye": tuple(r(36, 42)), "left_eye": tuple(r(42, 48)),
        "outer_lips": tuple(r(48, 60)), "inner_lips": tuple(r(60, 68)),
    }
    pairs = _contour(0, 17)                    # jaw 0..16, 8 = chin
    pairs += _contour(17, 10)                  # brows: 17..21 left-to-right, 22..26 continue to the right
    pairs += _contour(31, 5)                   # nostrils 31..35, 33 = tip
    # eyes clockwise from the outer corner of the image-left eye (36) and the inner corner of the other
    # (42): 36 outer, 37-38 top, 39 inner, 40-41 bottom; the mirror of a clockwise ring is counter-clockwise
    pairs += _mirror_run([36, 37, 38, 39, 40, 41], [45, 44, 43, 42, 47, 46])
    # outer lips clockwise from the left corner 48 (50-52 top, 54 right corner, 57 bottom middle)
    pairs += _mirror_run([48, 49, 50, 55, 56], [54, 53, 52, 59, 58])
    # inner lips clockwise from 60 (62 top middle, 64 right corner, 66 bottom middle)
    pairs += _mirror_run([60, 61, 65], [64, 63, 67])
    return Convention("ibug68", 68, _coarse(parts), parts, _permutation(68, pairs), (36, 45), tuple(pairs))


def _wflw98() -> Convention:
    r = range
    parts = {
        "jaw": tuple(r(0, 33)), "right_brow": tuple(r(33, 42)), "left_brow": tuple(r(42, 51)),
        "nose_bridge": tuple(r(51, 55)), "nose_lower": tuple(r(55, 60)),
        "right_eye": tuple(r(60, 68)), "left_eye": tuple(r(68, 76)),
        "outer_lips": tuple(r(76, 88)), "inner_lips": tuple(r(88, 96)), "pupils": (96, 97),
    }
    pairs = _contour(0, 33)                    # jaw 0..32, 16 = chin
    # brows: upper edge left-to-right 33..37 / 42..46, lower edge right-to-left 38..41 / 47..50
    pairs += _mirror_run([33, 34, 35, 36, 37, 38, 39, 40, 41], [46, 45, 44, 43, 42, 50, 49, 48, 47])
    pairs += _contour(55, 5)                   # nostrils 55..59, 57 = tip
    # eyes clockwise, 8 points from the left corner (60 / 68): 60 corner, 62 top, 64 corner, 66 bottom
    pairs += _mirror_run([60, 61, 62, 63, 64, 65, 66, 67], [72, 71, 70, 69, 68, 75, 74, 73])
    pairs += _mirror_run([76, 77, 78, 83, 84], [82, 81, 80, 87, 86])   # outer lips as iBUG 48..59
    pairs += _mirror_run([88, 89, 93], [92, 91, 95])                   # inner lips as iBUG 60..67
    pairs += [(96, 97)]
    return Convention("wflw98", 98, _coarse(parts), parts, _permutation(98, pairs), (60, 72), tuple(pairs))


CONVENTIONS: dict[str, Convention] = {c.name: c for c in (_ibug68(), _wflw98())}

#: WFLW 98 index of each iBUG 68 point (the usual reduction: every second jaw point, the upper brow
#: edges, the whole nose, the 6 iBUG eye points among the 8, all 20 lip points).
WFLW98_TO_IBUG68: tuple[int, ...] = tuple(
    list(range(0, 33, 2)) + [33, 34, 35, 36, 37, 42, 43, 44, 45, 46] + list(range(51, 60))
    + [60, 61, 63, 64, 65, 67, 68, 69, 71, 72, 73, 75] + list(range(76, 96)))


def convention(name: str) -> Convention:
    """The convention called ``name``; an unknown name is a one-line error listing the known ones."""
    try:
        return CONVENTIONS[name]
    except KeyError:
        raise FacetoolError(f"unknown landmark convention {name!r}; known: {', '.join(CONVENTIONS)}") from None


def flip_landmarks(points: np.ndarray, width: int, convention: str | Convention = "ibug68") -> np.ndarray:
    """Landmarks of the horizontally flipped image: x -> width - 1 - x, left/right indices swapped.

    ``points`` is (..., L, 2); a visibility array (..., L) is flipped with ``array[..., perm]``."""
    conv = convention if isinstance(convention, Convention) else globals()["convention"](convention)
    pts = np.asarray(points)
    if pts.shape[-2:] != (conv.num_points, 2):
        raise FacetoolError(f"landmarks of shape {pts.shape} do not fit {conv.name} ({conv.num_points}, 2)")
    out = pts[..., list(conv.flip_permutation), :].copy()
    out[..., 0] = (width - 1) - out[..., 0]
    return out


def to_ibug68(points: np.ndarray) -> np.ndarray:
    """WFLW 98 points (..., 98, 2) reduced to iBUG 68 (..., 68, 2) by :data:`WFLW98_TO_IBUG68`."""
    return np.asarray(points)[..., list(WFLW98_TO_IBUG68), :]


def read_pts(path: str | Path, num_points: int | None = None) -> np.ndarray:
    """A 300W / iBUG ``.pts`` file as (n_points, 2) float32 0-based coordinates (the file is 1-based:
    1 is subtracted, as menpo does). Errors name the file and line."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise FacetoolError(f"cannot read landmarks file {p}: {e.strerror or e}") from None
    rows = [(i + 1, ln.strip()) for i, ln in enumerate(lines) if ln.strip()]
    declared = None
    k = 0
    while k < len(rows) and rows[k][1] != "{":
        no, text = rows[k]
        key, sep, value = text.partition(":")
        if not sep:
            raise FacetoolError(f"{p}:{no}: expected 'version: 1', 'n_points: N' or '{{', got {text[:40]!r}")
        if key.strip() == "n_points":
            try:
                declared = int(value)
            except ValueError:
                raise FacetoolError(f"{p}:{no}: n_points is not an integer: {value.strip()[:20]!r}") from None
        k += 1
    if k == len(rows):
        raise FacetoolError(f"{p}: not a .pts file (no '{{' line)")
    pts = []
    for no, text in rows[k + 1:]:
        if text == "}":
            break
        parts = text.split()
        try:
            if len(parts) != 2:
                raise ValueError
            pts.append((float(parts[0]), float(parts[1])))
        except ValueError:
            raise FacetoolError(f"{p}:{no}: expected two numbers 'x y', got {text[:40]!r}") from None
    else:
        raise FacetoolError(f"{p}: the point list is not closed with '}}'")
    if declared is not None and declared != len(pts):
        raise FacetoolError(f"{p}: n_points says {declared} but the file lists {len(pts)} points")
    if num_points is not None and len(pts) != num_points:
        raise FacetoolError(f"{p}: {len(pts)} points, expected {num_points}")
    arr = np.asarray(pts, dtype=np.float32).reshape(-1, 2) - 1.0
    if not np.isfinite(arr).all():
        raise FacetoolError(f"{p}: non-finite coordinates")
    return arr


WFLW_FLAGS = ("pose", "expression", "illumination", "make-up", "occlusion", "blur")


@dataclass
class WflwRecord:
    """One WFLW annotation line."""

    points: np.ndarray  # (98, 2) float32, 0-based image coordinates
    box: np.ndarray  # (4,) float32 x_min y_min x_max y_max
    flags: dict[str, int]  # the 6 attribute flags
    path: str  # image path relative to the WFLW images folder


def parse_wflw_line(line: str, where: str = "WFLW line") -> WflwRecord:
    """Parse a ``list_98pt_rect_attr_*.txt`` line: 196 coordinates, the box, 6 flags, the image path
    (207 fields). ``where`` (e.g. ``file:line``) starts the one-line error."""
    fields = line.split()
    if len(fields) != 196 + 4 + 6 + 1:
        raise FacetoolError(f"{where}: expected 207 fields (196 coordinates, 4 box, 6 flags, path), got {len(fields)}")
    try:
        nums = np.asarray([float(v) for v in fields[:200]], dtype=np.float32)
        flags = [int(v) for v in fields[200:206]]
    except ValueError:
        raise FacetoolError(f"{where}: coordinates, box and flags must be numbers") from None
    if not np.isfinite(nums).all():
        raise FacetoolError(f"{where}: non-finite coordinates")
    return WflwRecord(nums[:196].reshape(98, 2), nums[196:200], dict(zip(WFLW_FLAGS, flags)), fields[206])
