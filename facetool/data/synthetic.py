"""Synthetic faces with known identities, attributes, landmarks, part masks and pose.

Every identity has its own geometry (face width/height, jaw, eye spacing, nose, mouth, brows, hair)
and appearance; every annotated attribute (the ConvNet-IIG features: gender, skin, eye colour,
facial hair, age, group) has a visible correlate. Every image varies pose (yaw/pitch/roll: features
are points on a head ellipsoid, rotated and projected, so yaw moves them sideways and foreshortens),
expression, lighting, scale/translation, background and noise/blur. Landmarks and part masks come
from the same projected geometry, so they follow every transform exactly.

Randomness is derived from ``(seed, identity)`` and ``(seed, identity, index)``: the same seed gives
bit-identical images regardless of resume or worker count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from facetool.data.synthetic_spec import (  # noqa: F401  (re-exported: the vocabularies and --bias live there)
    ACCESSORIES,
    ATTRIBUTES,
    BIAS_HELP,
    PARTS,
    BiasSpec,
    parse_bias,
)
from facetool.errors import FacetoolError

GENERATOR_VERSION = 2  # 2: a planted accessory is stratified per identity (accessory_plan); bolder glasses

_LAB = {p: i + 1 for i, p in enumerate(PARTS)}  # label-map codes (0 = background / not a part)
_LUT = np.array([0] + [1 << i for i in range(len(PARTS))], np.uint16)
_SHIFT = 4  # sub-pixel bits for cv2 polygon drawing
_REF = 112.0  # geometry is defined in units of a 112 px crop
_FRAME = 2.5  # width of a glasses frame (units of a 112 px crop: bold frames, ~2 px at 96 px)

_SKIN_RGB = np.array([[236, 200, 174], [196, 146, 106], [118, 78, 54]], np.float32)
_GROUP_SHIFT = np.array([[10, 0, -8], [4, 8, -10], [-6, -2, 6]], np.float32)
_IRIS_RGB = np.array([[92, 54, 28], [70, 125, 190], [78, 135, 68]], np.float32)
_HAIR_RGB = np.array(
    [[24, 20, 18], [62, 42, 28], [110, 72, 44], [205, 170, 112], [156, 72, 38]], np.float32
)
_GREY = np.array([190, 190, 192], np.float32)


@dataclass
class IdentityParams:
    """Everything that makes one identity look like itself (units: px of a 112 px crop)."""

    attributes: dict[str, int]  # name -> code into ATTRIBUTES[name]
    face_w: float  # half width of the face
    face_h: float  # half height of the face
    jaw_n: float  # superellipse exponent of the lower face (2 = round, >2 = square jaw)
    chin_taper: float  # narrowing of the chin
    eye_dx: float  # half distance between the eyes
    eye_y: float
    eye_w: float
    eye_h: float
    iris_r: float
    nose_y: float  # nose tip height (below head centre)
    nose_w: float
    nose_depth: float
    mouth_y: float
    mouth_w: float  # half width
    lip_h: float
    brow_gap: float  # brow height above the eye
    brow_thick: float
    brow_slope: float
    brow_arch: float
    hairline: float  # y of the hairline (head coords)
    hair_style: int  # 0 short, 1 medium, 2 long
    hair_volume: float
    skin_rgb: list[float] = field(default_factory=list)
    hair_rgb: list[float] = field(default_factory=list)
    iris_rgb: list[float] = field(default_factory=list)
    lip_rgb: list[float] = field(default_factory=list)
    blush: float = 0.0
    age_factor: float = 0.0  # 0 young .. 1 old: wrinkles, grey hair, skin texture
    beard_density: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class View:
    """Per-image variation."""

    yaw: float
    pitch: float
    roll: float
    scale: float
    tx: float
    ty: float
    smile: float
    mouth_open: float
    brow_raise: float
    eye_open: float
    light_angle: float
    light_amp: float
    gain: float
    colour_cast: list[float]
    background: int
    noise: float
    blur: float
    lowres: float = 0.0  # > 0: downsample to this fraction of the size and back (low-quality capture)
    grey: bool = False  # greyscale capture
    hair_volume: float = 0.0  # per-image change of the hair volume (styling)
    accessory: int = 0  # index into ACCESSORIES

    @property
    def pose(self) -> np.ndarray:
        return np.array([self.yaw, self.pitch, self.roll], np.float32)

    @property
    def expression(self) -> np.ndarray:
        return np.array([self.smile, self.mouth_open, self.brow_raise, self.eye_open], np.float32)


# ------------------------------------------------------------------------------- sampling
def balanced_codes(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``n`` codes over ``k`` values, as balanced as possible, in random order."""
    return rng.permutation(np.resize(np.arange(k), n))


def identity_attributes(n: int, seed: int) -> dict[str, np.ndarray]:
    """Balanced, independent attribute codes for ``n`` identities (facial hair only for males)."""
    rng = np.random.default_rng([seed, 7])
    codes = {name: balanced_codes(rng, n, len(v)) for name, v in ATTRIBUTES.items() if name != "facial_hair"}
    fh = np.zeros(n, np.int64)
    males = np.flatnonzero(codes["gender"] == 1)
    fh[males] = balanced_codes(rng, len(males), 2)
    codes["facial_hair"] = fh
    return {name: codes[name] for name in ATTRIBUTES}


def sample_identity(rng: np.random.Generator, attributes: dict[str, int]) -> IdentityParams:
    """Draw an identity's geometry and appearance given its attribute codes."""
    a = attributes
    male, group, age = a["gender"] == 1, a["group"], a["age"]
    u = rng.uniform
    # group = face-shape family: A round, B long/narrow, C broad/square
    face_w = [37.0, 33.5, 39.0][group] + (1.5 if male else -1.0) + u(-2.0, 2.0)
    face_h = [50.0, 55.0, 50.0][group] + u(-2.5, 2.5)
    jaw_n = [2.1, 2.3, 2.9][group] + (0.5 if male else 0.0) + u(-0.2, 0.2)
    chin_taper = [0.18, 0.26, 0.08][group] + (-0.06 if male else 0.04) + u(-0.04, 0.04)
    age_factor = [0.0, 0.2, 0.55, 0.9][age] + u(-0.08, 0.08)
    skin = _SKIN_RGB[a["skin"]] + _GROUP_SHIFT[group] + rng.normal(0, 6, 3)
    skin = skin * (1.0 - 0.06 * age_factor)
    if a["skin"] == 0:
        hair_p = [0.2, 0.3, 0.22, 0.18, 0.1]
    elif a["skin"] == 1:
        hair_p = [0.45, 0.35, 0.15, 0.03, 0.02]
    else:
        hair_p = [0.75, 0.22, 0.03, 0.0, 0.0]
    hair = _HAIR_RGB[rng.choice(5, p=hair_p)] + rng.normal(0, 6, 3)
    grey = [0.0, u(0.0, 0.12), u(0.3, 0.6), u(0.7, 0.95)][age]
    hair = (1 - grey) * hair + grey * _GREY
    iris = _IRIS_RGB[a["eye_colour"]] + rng.normal(0, 8, 3)
    lip = skin * np.array([0.92, 0.62, 0.62]) + np.array([30.0, 0.0, 5.0]) + (np.array([25.0, -5, 5]) if not male else 0)
    style_p = [0.7, 0.25, 0.05] if male else [0.08, 0.32, 0.6]
    return IdentityParams(
        attributes={k: int(v) for k, v in a.items()},
        face_w=face_w,
        face_h=face_h,
        jaw_n=jaw_n,
        chin_taper=chin_taper,
        eye_dx=u(15.5, 19.5),
        eye_y=u(-11.0, -6.5),
        eye_w=u(5.2, 7.2) * (0.95 if group == 1 else 1.0),
        eye_h=u(2.6, 3.6) * (0.75 if group == 1 else 1.0),
        iris_r=u(2.3, 3.0),
        nose_y=u(9.0, 15.0),
        nose_w=u(5.0, 8.0) + (0.8 if male else 0.0),
        nose_depth=u(6.0, 11.0),
        mouth_y=u(28.0, 35.0),
        mouth_w=u(11.0, 16.5),
        lip_h=u(2.2, 4.0) * (0.8 if male else 1.1),
        brow_gap=u(6.0, 9.5),
        brow_thick=u(2.8, 4.0) if male else u(1.5, 2.4),
        brow_slope=u(-0.15, 0.2),
        brow_arch=u(0.5, 3.0),
        hairline=u(-40.0, -31.0) + (u(0, 6) * age_factor if male else 0.0),
        hair_style=int(rng.choice(3, p=style_p)),
        hair_volume=u(3.0, 9.0),
        skin_rgb=np.clip(skin, 0, 255).tolist(),
        hair_rgb=np.clip(hair, 0, 255).tolist(),
        iris_rgb=np.clip(iris, 0, 255).tolist(),
        lip_rgb=np.clip(lip, 0, 255).tolist(),
        blush=u(0.0, 0.12) + (0.06 if not male else 0.0),
        age_factor=float(np.clip(age_factor, 0, 1)),
        beard_density=u(0.6, 1.0) if a["facial_hair"] == 1 else 0.0,
    )


#: ``--pose``: (yaw sd, yaw limit, pitch sd, pitch limit) in degrees. "default" is the generator's own
#: range (|pitch| <= 25, so the cohort code's pitch bin is always 2 and |yaw| > 30 is rare); "wide" draws
#: the same normal deviates scaled up, so that about 45 % of the images have |yaw| > 30 and 30 % |pitch| > 30.
POSE_RANGES: dict[str, tuple[float, float, float, float]] = {"default": (16.0, 40.0, 9.0, 25.0),
                                                            "wide": (40.0, 75.0, 30.0, 55.0)}


def sample_view(rng: np.random.Generator, accessory: int = 0, pose: str = "default") -> View:
    """Draw one image's pose, expression, lighting, framing, background and degradations (``pose``: a key
    of :data:`POSE_RANGES`; every range consumes the same random numbers, so only yaw and pitch change)."""
    u = rng.uniform
    clip = lambda x, m: float(np.clip(x, -m, m))  # noqa: E731
    yaw_sd, yaw_max, pitch_sd, pitch_max = POSE_RANGES[pose]
    blink = u() < 0.1
    return View(
        yaw=clip(rng.normal(0, yaw_sd), yaw_max),
        pitch=clip(rng.normal(0, pitch_sd), pitch_max),
        roll=clip(rng.normal(0, 8), 22),
        scale=u(0.88, 1.1),
        tx=u(-5, 5),
        ty=u(-5, 4),
        smile=u(0, 1) if u() < 0.6 else 0.0,
        mouth_open=u(0.2, 1) if u() < 0.3 else 0.0,
        brow_raise=u(-0.4, 1.0),
        eye_open=u(0.08, 0.25) if blink else u(0.7, 1.0),
        light_angle=u(0, 2 * math.pi),
        light_amp=u(0.0, 0.45),
        gain=u(0.55, 1.35),
        colour_cast=rng.normal(1.0, 0.08, 3).tolist(),
        background=int(rng.integers(3)),
        noise=u(0, 12),
        blur=u(0.3, 1.6) if u() < 0.4 else 0.0,
        lowres=u(0.3, 0.6) if u() < 0.25 else 0.0,
        grey=bool(u() < 0.1),
        hair_volume=u(-2.0, 2.0),
        accessory=int(accessory),
    )


# ------------------------------------------------------------------------------- geometry
class _Projector:
    """Head coordinates (x right, y down, z towards the camera; origin = head centre) -> pixels."""

    def __init__(self, p: IdentityParams, v: View, size: int) -> None:
        self.a, self.b, self.c = p.face_w, p.face_h, 0.62 * p.face_w
        y, pt, r = (math.radians(t) for t in (v.yaw, v.pitch, v.roll))
        ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
        rx = np.array([[1, 0, 0], [0, math.cos(pt), -math.sin(pt)], [0, math.sin(pt), math.cos(pt)]])
        k = size / _REF
        s = v.scale * k
        rr = np.array([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]])
        # rows of the 3D rotation that land on image x/y, then the 2D similarity
        self.m = (s * rr @ (rx @ ry)[:2]).astype(np.float64)  # (2, 3)
        self.t = np.array([56.0 + v.tx, 60.0 + v.ty]) * k
        self.px = s  # pixels per unit

    def z(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        q = 1.0 - (x * (1.0 / self.a)) ** 2 - (y * (1.0 / (self.b * 1.05))) ** 2
        return self.c * np.sqrt(np.maximum(q, 0.0))

    def __call__(self, x: np.ndarray, y: np.ndarray, dz: float | np.ndarray = 0.0, surface: bool = True) -> np.ndarray:
        """Project points (x, y) on the head surface (``surface``; else on the z = 0 plane) lifted by ``dz``."""
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        z = self.z(x, y) + dz if surface else dz
        m, t = self.m, self.t
        out = np.empty((*np.broadcast_shapes(x.shape, y.shape), 2))
        out[..., 0] = m[0, 0] * x + m[0, 1] * y + m[0, 2] * z + t[0]
        out[..., 1] = m[1, 0] * x + m[1, 1] * y + m[1, 2] * z + t[1]
        return out


@lru_cache(maxsize=64)
def _circle(n: int, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(t0, t1, n, endpoint=t1 - t0 < 2 * math.pi - 1e-9)
    return np.cos(t), np.sin(t)


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 24, t0: float = 0.0, t1: float = 2 * math.pi):
    c, s = _circle(n, t0, t1)
    return cx + rx * c, cy + ry * s


def _outline(p: IdentityParams, n: int = 48, grow: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Face outline in head coords: elliptic forehead, superellipse jaw with a tapered chin."""
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    a, b = p.face_w + grow, p.face_h + grow
    lower = s > 0
    ex = np.where(lower, 2.0 / p.jaw_n, 1.0)
    x = a * np.sign(c) * np.abs(c) ** ex
    y = b * np.sign(s) * np.abs(s) ** ex
    x = np.where(lower, x * (1.0 - p.chin_taper * s**2), x)
    return x, y


def _int(pts: np.ndarray) -> np.ndarray:
    return np.round(pts * (1 << _SHIFT)).astype(np.int32).reshape(-1, 1, 2)


class _Canvas:
    def __init__(self, img: np.ndarray, lab: np.ndarray) -> None:
        self.img, self.lab = img, lab

    def fill(self, pts: np.ndarray | list[np.ndarray], colour, part: str | None = None) -> None:
        """Fill a polygon, or the area between nested contours (a list: an outer contour with holes)."""
        qs = [_int(c) for c in pts] if isinstance(pts, list) else [_int(pts)]
        cv2.fillPoly(self.img, qs, tuple(float(c) for c in colour), cv2.LINE_AA, _SHIFT)
        if part is not None:
            cv2.fillPoly(self.lab, qs, _LAB[part], cv2.LINE_8, _SHIFT)

    def line(self, pts: np.ndarray, colour, thick: float, part: str | None = None, closed: bool = False) -> None:
        q = _int(pts)
        th = max(1, int(round(thick)))
        cv2.polylines(self.img, [q], closed, tuple(float(c) for c in colour), th, cv2.LINE_AA, _SHIFT)
        if part is not None:
            cv2.polylines(self.lab, [q], closed, _LAB[part], th, cv2.LINE_8, _SHIFT)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return (x - size / 2) / size, (y - size / 2) / size


def _background(rng: np.random.Generator, kind: int, size: int) -> np.ndarray:
    c0, c1 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    if kind == 0:  # linear gradient between two colours
        gx, gy = _grid(size)
        ang = rng.uniform(0, 2 * math.pi)
        w = np.clip(0.5 + math.cos(ang) * gx + math.sin(ang) * gy, 0, 1)[..., None]
        return ((1 - w) * c0 + w * c1).astype(np.uint8)
    if kind == 1:  # random shapes
        img = np.empty((size, size, 3), np.uint8)
        img[:] = c0.astype(np.uint8)
        for _ in range(int(rng.integers(4, 10))):
            col = tuple(float(c) for c in rng.uniform(0, 255, 3))
            x, y = rng.uniform(0, size, 2)
            r = rng.uniform(0.05, 0.3) * size
            if rng.uniform() < 0.5:
                cv2.circle(img, (int(x), int(y)), int(r), col, -1, cv2.LINE_AA)
            else:
                cv2.rectangle(img, (int(x - r), int(y - r / 2)), (int(x + r), int(y + r / 2)), col, -1)
        return img
    low = rng.uniform(0, 255, (6, 6, 3)).astype(np.float32)  # smooth random texture
    low = 0.5 * low + 0.5 * c0
    return np.clip(cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------- drawing
def draw_face(p: IdentityParams, v: View, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one face. Returns (RGB uint8 image, landmarks (5,2) float32, part bitmask uint16).

    ``rng`` only drives pixel-level randomness (background shapes, texture, noise)."""
    P = _Projector(p, v, size)
    img = _background(rng, v.background, size)
    lab = np.zeros((size, size), np.uint8)
    cv = _Canvas(img, lab)
    skin = np.array(p.skin_rgb)
    hair = np.array(p.hair_rgb)
    vol = max(p.hair_volume + v.hair_volume, 1.0)

    # shoulders / clothes and neck (not parts)
    cloth = rng.uniform(20, 230, 3)
    cv.fill(P(*_ellipse(0, p.face_h + 48, p.face_w * 2.0, 30), dz=-p.face_w, surface=False), cloth)
    nx = np.array([-0.5, 0.5, 0.55, -0.55]) * p.face_w
    ny = np.array([0.4, 0.4, 1.6, 1.6]) * p.face_h
    cv.fill(P(nx, ny, dz=-0.3 * p.face_w, surface=False), skin * 0.72)

    # hair behind the head (medium / long styles)
    if p.hair_style > 0:
        bottom = [0.0, 15.0, 75.0][p.hair_style]
        hx, hy = _outline(p, 40, grow=vol)
        keep = hy < 0
        hx, hy = hx[keep], hy[keep]
        order = np.argsort(np.arctan2(hy, hx))
        hx, hy = hx[order], hy[order]
        w = p.face_w + vol
        bx = np.concatenate([[-w * 1.02, -w * 1.05], hx, [w * 1.05, w * 1.02]])
        by = np.concatenate([[bottom, 0.0], hy, [0.0, bottom]])
        cv.fill(P(bx, by, dz=-0.4 * p.face_w, surface=False), hair * 0.9, "hair")

    # ears (skin) when not covered by long hair
    if p.hair_style < 2:
        for sgn in (-1, 1):
            ex, ey = _ellipse(sgn * (p.face_w + 1.0), p.eye_y + 6.0, 3.5, 8.0, 16)
            cv.fill(P(ex, ey, dz=-0.15 * p.face_w, surface=False), skin * 0.88, "skin")

    # face
    fx, fy = _outline(p)
    cv.fill(P(fx, fy, surface=False), skin, "skin")

    # cheeks: blush ellipses (skin label; the cheek bit is added below)
    cheek_poly = []
    for sgn in (-1, 1):
        cx, cy = _ellipse(sgn * (p.eye_dx + 3.0), p.nose_y + 2.0, 8.0, 6.0, 20)
        q = P(cx, cy)
        cheek_poly.append(q)
        cv.fill(q, skin * (1 - p.blush) + np.array([220.0, 90, 90]) * p.blush)

    # age: wrinkles (forehead, crow's feet, nasolabial folds)
    if p.age_factor > 0.3:
        dark = skin * (0.9 - 0.15 * p.age_factor)
        th = 1.0 * size / _REF
        for k in range(1 + int(p.age_factor * 3)):
            wx = np.linspace(-16, 16, 9)
            wy = p.eye_y - p.brow_gap - 7 - 4 * k + 1.5 * np.cos(wx / 10)
            cv.line(P(wx, wy), dark, th)
        for sgn in (-1, 1):
            for d in (-2.5, 0.0, 2.5):
                x0 = sgn * (p.eye_dx + p.eye_w + 1.5)
                cv.line(P(np.array([x0, x0 + sgn * 4]), np.array([p.eye_y + d * 0.5, p.eye_y + d])), dark, th)
            fxs = sgn * np.linspace(p.nose_w + 1.0, p.mouth_w + 2.0, 6)
            fys = np.linspace(p.nose_y - 1.0, p.mouth_y + 2.0, 6)
            cv.line(P(fxs, fys), dark, th)

    # beard / moustache
    if p.beard_density > 0:
        bx, by = _outline(p, 64, grow=0.0)
        keep = by > p.nose_y + 3.0
        bx, by = bx[keep], by[keep]
        order = np.argsort(-bx)
        bx, by = bx[order], by[order]
        inner_x = np.linspace(-p.face_w * 0.95, p.face_w * 0.95, 11)
        inner_y = p.nose_y + 3.0 + 6.0 * (np.abs(inner_x) / p.face_w) ** 2
        colour = hair * p.beard_density + skin * (1 - p.beard_density)
        cv.fill(P(np.concatenate([bx, inner_x]), np.concatenate([by, inner_y])), colour, "beard")

    # nose: shaded ridge + tip + nostrils
    t = np.linspace(0, 1, 8)
    ridge_y = p.eye_y + 3 + t * (p.nose_y - p.eye_y - 3)
    half = 1.5 + t**2 * (p.nose_w - 1.5)
    dz = t * p.nose_depth
    nx = np.concatenate([-half, half[::-1]])
    ny = np.concatenate([ridge_y, ridge_y[::-1]])
    ndz = np.concatenate([dz, dz[::-1]])
    cv.fill(P(nx, ny, ndz), skin * 0.9, "nose")
    tip = P(*_ellipse(0, p.nose_y - 1.0, p.nose_w * 0.55, 2.6, 16), dz=p.nose_depth)
    cv.fill(tip, skin * 0.96, "nose")
    for sgn in (-1, 1):
        cv.fill(P(*_ellipse(sgn * p.nose_w * 0.45, p.nose_y + 0.6, 1.6, 1.0, 12), dz=p.nose_depth * 0.7), skin * 0.45, "nose")

    # eyes: sclera ellipse, iris + pupil (contained in the eye), lid line
    eye_h = max(p.eye_h * v.eye_open, 1.3)
    for sgn in (-1, 1):
        ex = sgn * p.eye_dx
        ox, oy = _ellipse(ex, p.eye_y, p.eye_w, eye_h, 24)
        cv.fill(P(ox, oy), np.array([240.0, 236, 230]) * (0.95 if v.eye_open > 0.5 else 0.7), "eyes")
        r = min(p.iris_r, eye_h, p.eye_w) * 0.95
        cv.fill(P(*_ellipse(ex, p.eye_y, r, r, 16)), p.iris_rgb)
        cv.fill(P(*_ellipse(ex, p.eye_y, r * 0.42, r * 0.42, 12)), (15, 12, 12))
        lid_x, lid_y = _ellipse(ex, p.eye_y, p.eye_w, eye_h, 13, math.pi, 2 * math.pi)
        cv.line(P(lid_x, lid_y - 0.3), skin * 0.35, 1.0 * size / _REF)

    # brows
    for sgn in (-1, 1):
        bx = sgn * (p.eye_dx + np.linspace(-p.eye_w * 1.1, p.eye_w * 1.25, 9))
        rel = (bx - sgn * p.eye_dx) / p.eye_w
        by = (p.eye_y - p.brow_gap - 2.5 * v.brow_raise - p.brow_arch * (1 - rel**2) * 0.5
              + p.brow_slope * rel * p.eye_w)
        cv.line(P(bx, by), hair * 0.8, p.brow_thick * P.px, "brows")

    # mouth: lips with smile-raised corners, dark opening
    mw, my = p.mouth_w * (1 + 0.12 * v.smile), p.mouth_y
    lift = 3.0 * v.smile
    open_h = 5.0 * v.mouth_open
    xs = np.linspace(-mw, mw, 13)
    rel = xs / mw
    corner = -lift * rel**4
    upper = my - p.lip_h * (1 - rel**2) * (1 - 0.25 * np.cos(rel * 6 * math.pi) * (np.abs(rel) < 0.3)) + corner
    lower = my + (p.lip_h * 1.2 + open_h) * (1 - rel**2) + corner
    cv.fill(P(np.concatenate([xs, xs[::-1]]), np.concatenate([upper, lower[::-1]]), 1.5), p.lip_rgb, "mouth")
    if v.mouth_open > 0:
        xi, ri, ci = xs[2:-2], rel[2:-2], corner[2:-2]
        top = my + ci - 0.2 * open_h * (1 - ri**2)
        bot = my + ci + open_h * (1 - ri**2)
        cv.fill(P(np.concatenate([xi, xi[::-1]]), np.concatenate([top, bot[::-1]]), 1.5), (60, 20, 25), "mouth")
    else:
        cv.line(P(xs, my + corner, 1.5), np.array(p.lip_rgb) * 0.55, 1.0 * size / _REF)

    # hair on top (fringe), drawn over the forehead
    hx, hy = _outline(p, 64, grow=vol * (0.5 if p.hair_style == 0 else 1.0))
    keep = hy < p.hairline + 6
    hx, hy = hx[keep], hy[keep]
    order = np.argsort(np.arctan2(hy, hx))
    hx, hy = hx[order], hy[order]
    lx = np.linspace(p.face_w, -p.face_w, 11)
    ly = p.hairline + 6 * (np.abs(lx) / p.face_w) ** 2 + 2.0 * np.cos(lx / 4.0 + p.hair_volume)
    cv.fill(P(np.concatenate([hx, lx]), np.concatenate([hy, ly]), surface=False), hair, "hair")

    # accessory: glasses frame (lenses leave the eyes visible). The frame is drawn as filled polygons
    # (rims = rings, arms and bridge = strips) so its width scales with the crop at sub-pixel accuracy.
    if ACCESSORIES[v.accessory] == "glasses":
        frame = (25, 25, 30)
        hw = 0.5 * _FRAME
        rx, ry = p.eye_w + 3.5, p.eye_h + 4.0  # rim radii (centre line of the frame)
        for sgn in (-1, 1):
            outer = P(*_ellipse(sgn * p.eye_dx, p.eye_y, rx + hw, ry + hw, 32), 2.0)
            inner = P(*_ellipse(sgn * p.eye_dx, p.eye_y, rx - hw, ry - hw, 32), 2.0)
            cv.fill([outer, inner], frame, "accessory")
            x0, x1 = sgn * (p.eye_dx + rx), sgn * p.face_w * 0.98
            cv.fill(P(np.array([x0, x1, x1, x0]), np.array([p.eye_y - hw, p.eye_y - 1.0 - hw, p.eye_y - 1.0 + hw, p.eye_y + hw]), 1.0),
                    frame, "accessory")
        bx = p.eye_dx - rx + hw
        by = p.eye_y - 1.5
        cv.fill(P(np.array([-bx, bx, bx, -bx]), np.array([by - hw, by - hw, by + hw, by + hw]), 3.0), frame, "accessory")

    mask = _LUT[lab]
    # the cheeks bit: cheek ellipses where skin is visible
    cheeks = np.zeros_like(lab)
    cv2.fillPoly(cheeks, [_int(q) for q in cheek_poly], 1, cv2.LINE_8, _SHIFT)
    mask |= np.where((cheeks > 0) & (lab == _LAB["skin"]), np.uint16(1 << PARTS.index("cheeks")), np.uint16(0))

    # photometric: directional light, gain, colour cast, age skin texture, noise, blur
    gx, gy = _grid(size)
    light = v.gain * (1.0 + v.light_amp * (math.cos(v.light_angle) * gx + math.sin(v.light_angle) * gy) * 2.0)
    out = img.astype(np.float32) * light[..., None] * np.asarray(v.colour_cast, np.float32)
    if p.age_factor > 0.2:
        tex = (12.0 * p.age_factor) * rng.standard_normal((size, size), np.float32)
        out += (tex * (lab == _LAB["skin"]))[..., None]
    if v.blur > 0:
        s = v.blur * size / _REF
        out = cv2.GaussianBlur(out, (0, 0), s)
    if v.lowres > 0:
        small = max(8, int(round(size * v.lowres)))
        out = cv2.resize(cv2.resize(out, (small, small), interpolation=cv2.INTER_AREA), (size, size),
                         interpolation=cv2.INTER_LINEAR)
    if v.grey:
        out = np.repeat(out @ np.array([0.299, 0.587, 0.114], np.float32), 3).reshape(size, size, 3)
    if v.noise > 0:
        out += v.noise * rng.standard_normal(out.shape, np.float32)
    image = np.clip(out + 0.5, 0, 255).astype(np.uint8)

    lm_y = np.array([p.eye_y, p.eye_y, p.nose_y, my + corner[0], my + corner[-1]])
    lm_x = np.array([-p.eye_dx, p.eye_dx, 0.0, -mw, mw])
    lm_dz = np.array([0.0, 0.0, p.nose_depth, 1.5, 1.5])
    landmarks = P(lm_x, lm_y, lm_dz).astype(np.float32)
    return image, landmarks, mask


def _outline_at(p: IdentityParams, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_outline`'s curve at parameters ``t`` (the same formula, any angles)."""
    c, s = np.cos(t), np.sin(t)
    lower = s > 0
    ex = np.where(lower, 2.0 / p.jaw_n, 1.0)
    x = p.face_w * np.sign(c) * np.abs(c) ** ex
    y = p.face_h * np.sign(s) * np.abs(s) ** ex
    return np.where(lower, x * (1.0 - p.chin_taper * s**2), x), y


#: The part-mask bits a point of each iBUG 68 group must touch (within a pixel) to count as visible.
_GROUP_PARTS = {"jaw": ("skin", "beard", "cheeks"), "brows": ("brows",), "nose": ("nose",), "eyes": ("eyes",),
                "lips": ("mouth",)}


def dense_landmarks(p: IdentityParams, v: View, size: int,
                    mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The iBUG 68 landmarks of a face :func:`draw_face` renders, from the same geometry and projection
    (so in the crop's pixel coordinates, exactly where the features are painted): jaw 0-16 on the drawn face
    outline from the image-left temple (eye height) over the chin; brows 17-26 on the drawn brow lines, outer
    to inner end; nose bridge 27-30 on the ridge to the tip (30 = the 5-point nose tip), nostrils 31-35; eyes
    36-47 on the drawn eye ellipses (corners and lids at 60 degree steps, clockwise from the left corner);
    lips 48-59 on the drawn lip outline (48 / 54 = the 5-point mouth corners), 60-67 the inner lip line (the
    mouth opening, or the closed lips' line). No randomness: the image does not change.

    ``visible`` (68,) is True where the point is inside the crop and, given the part mask ``mask`` of the
    same render, a pixel within one pixel of it shows the point's part (jaw: skin/beard; brows, nose, eyes,
    mouth), i.e. it is not covered by hair, glasses or the frame's edge. Returns (points (68, 2) float32,
    visible (68,) bool)."""
    P = _Projector(p, v, size)
    pts = np.zeros((68, 2))
    # jaw: the outline from eye height on the image-left side, over the chin, to eye height on the right
    alpha = math.asin(float(np.clip(-(p.eye_y + 2.0) / p.face_h, 0.0, 0.9)))
    t = np.linspace(math.pi + alpha, -alpha, 17)
    pts[0:17] = P(*_outline_at(p, t), surface=False)
    # brows: 5 of the 9 drawn vertices, outer to inner on the image-left brow, inner to outer on the right
    d = np.linspace(-p.eye_w * 1.1, p.eye_w * 1.25, 9)[::2]
    for sgn, sl, order in ((-1, slice(17, 22), slice(None, None, -1)), (1, slice(22, 27), slice(None))):
        bx = sgn * (p.eye_dx + d)
        rel = (bx - sgn * p.eye_dx) / p.eye_w
        by = (p.eye_y - p.brow_gap - 2.5 * v.brow_raise - p.brow_arch * (1 - rel**2) * 0.5
              + p.brow_slope * rel * p.eye_w)
        pts[sl] = P(bx, by)[order]
    # nose: ridge (as drawn: from eye_y + 3 at depth 0 to the tip), tip = the 5-point nose landmark
    tr = np.array([0.0, 1 / 3, 2 / 3])
    pts[27:30] = P(np.zeros(3), p.eye_y + 3 + tr * (p.nose_y - p.eye_y - 3), tr * p.nose_depth)
    pts[30] = P(np.array([0.0]), np.array([p.nose_y]), p.nose_depth)[0]
    nw = p.nose_w * 0.45
    pts[31:36] = P(np.array([-nw - 1.6, -nw, 0.0, nw, nw + 1.6]),
                   np.array([p.nose_y + 0.6, p.nose_y + 1.6, p.nose_y + 1.6, p.nose_y + 1.6, p.nose_y + 0.6]),
                   np.array([0.7, 0.7, 1.0, 0.7, 0.7]) * p.nose_depth)
    # eyes: the drawn ellipse at angles 180, 240, 300, 0, 60, 120 degrees (clockwise on screen from the left)
    eye_h = max(p.eye_h * v.eye_open, 1.3)
    ang = np.radians([180, 240, 300, 0, 60, 120])
    for sgn, k in ((-1, 36), (1, 42)):
        pts[k:k + 6] = P(sgn * p.eye_dx + p.eye_w * np.cos(ang), p.eye_y + eye_h * np.sin(ang))
    # lips, as drawn (same mouth width, smile lift, opening)
    mw, my = p.mouth_w * (1 + 0.12 * v.smile), p.mouth_y
    lift, open_h = 3.0 * v.smile, 5.0 * v.mouth_open
    xs = np.linspace(-mw, mw, 13)
    rel = xs / mw
    corner = -lift * rel**4
    upper = my - p.lip_h * (1 - rel**2) * (1 - 0.25 * np.cos(rel * 6 * math.pi) * (np.abs(rel) < 0.3)) + corner
    lower = my + (p.lip_h * 1.2 + open_h) * (1 - rel**2) + corner
    top = my + corner - 0.2 * open_h * (1 - rel**2)
    bot = my + corner + open_h * (1 - rel**2)
    mid = 0.5 * (top + bot)
    outer = [(0, upper), (2, upper), (4, upper), (6, upper), (8, upper), (10, upper), (12, upper),
             (10, lower), (8, lower), (6, lower), (4, lower), (2, lower)]
    inner = [(2, mid), (4, top), (6, top), (8, top), (10, mid), (8, bot), (6, bot), (4, bot)]
    for k, pairs in ((48, outer), (60, inner)):
        ix = np.array([i for i, _ in pairs])
        pts[k:k + len(pairs)] = P(xs[ix], np.array([curve[i] for i, curve in pairs]), 1.5)
    pts = pts.astype(np.float32)
    visible = (pts[:, 0] >= 0) & (pts[:, 0] <= size - 1) & (pts[:, 1] >= 0) & (pts[:, 1] <= size - 1)
    if mask is not None:
        from facetool.data.landmarks import CONVENTIONS

        for group, idx in CONVENTIONS["ibug68"].groups.items():
            bits = np.uint16(sum(1 << PARTS.index(q) for q in _GROUP_PARTS[group]))
            for i in idx:
                if visible[i]:
                    x, y = int(round(float(pts[i, 0]))), int(round(float(pts[i, 1])))
                    win = mask[max(0, y - 1):y + 2, max(0, x - 1):x + 2]
                    visible[i] = bool((win & bits).any())
    return pts, visible


def render_face(params: IdentityParams, rng: np.random.Generator, size: int = 112, accessory: int = 0):
    """Render one random view of an identity.

    Returns (image RGB uint8 (size,size,3), landmarks (5,2) float32 in crop coords in arcface order
    (image-left eye, image-right eye, nose tip, image-left mouth corner, image-right mouth corner),
    part mask uint16 (size,size) with bit i = PARTS[i], pose (yaw, pitch, roll) degrees float32).
    """
    view = sample_view(rng, accessory)
    image, landmarks, mask = draw_face(params, view, size, rng)
    return image, landmarks, mask, view.pose


# ------------------------------------------------------------------------------- store
def identity_name(i: int) -> str:
    return f"synth_{i:04d}"


def make_identities(identities: int, seed: int) -> list[IdentityParams]:
    """The identities of a synthetic data set (depends only on ``identities`` and ``seed``)."""
    codes = identity_attributes(identities, seed)
    return [
        sample_identity(np.random.default_rng([seed, 1, i]), {k: int(c[i]) for k, c in codes.items()})
        for i in range(identities)
    ]


def accessory_plan(people: list[IdentityParams], per_identity: int, spec: BiasSpec | None, seed: int) -> np.ndarray:
    """(identities, per_identity) accessory codes of a store planted with ``spec`` (zeros without one).

    Stratified per identity: identity i wears the accessory in exactly ``floor(q)`` or ``ceil(q)`` of its
    images, q = P_i * per_identity (P_i = ``spec.probability``; rounded up with probability frac(q)),
    on a seeded random choice of its images. So ``p = 0.5`` gives every identity half its images with
    the accessory: the accessory is independent of every identity-level attribute in the set itself,
    not only in expectation (per-image coin flips left chance correlations of ~0.1 with gender in
    stores of a few hundred images). Depends only on ``(seed, identity)``."""
    plan = np.zeros((len(people), per_identity), np.int64)
    if spec is None:
        return plan
    code = ACCESSORIES.index(spec.accessory)
    for i, p in enumerate(people):
        rng = np.random.default_rng([seed, 4, i])
        q = spec.probability(p.attributes) * per_identity
        n = min(per_identity, int(math.floor(q)) + int(rng.uniform() < q - math.floor(q)))
        plan[i, rng.permutation(per_identity)[:n]] = code
    return plan


def split_codes(identities: int, per_identity: int, test_fraction: float, seed: int) -> np.ndarray:
    """(identities, per_identity) uint8: 1 = test. Per identity a seeded ``test_fraction`` of its images."""
    n_test = int(round(test_fraction * per_identity))
    split = np.zeros((identities, per_identity), np.uint8)
    for i in range(identities):
        split[i, np.random.default_rng([seed, 3, i]).permutation(per_identity)[:n_test]] = 1
    return split


def _template(people: list[IdentityParams], size: int) -> np.ndarray:
    """Mean landmark positions of the frontal, neutral, centred views of all identities."""
    neutral = View(0, 0, 0, 1.0, 0, 0, 0, 0, 0, 1, 0, 0, 1, [1, 1, 1], 0, 0, 0)  # frontal, neutral
    lms = []
    for p in people:
        P = _Projector(p, neutral, size)
        lms.append(P(np.array([-p.eye_dx, p.eye_dx, 0, -p.mouth_w, p.mouth_w]),
                     np.array([p.eye_y, p.eye_y, p.nose_y, p.mouth_y, p.mouth_y]),
                     np.array([0, 0, p.nose_depth, 1.5, 1.5])))
    return np.mean(lms, 0).astype(np.float32)


#: Upper limits of ``prepare synthetic`` (rendering 10 M images takes hours per core; every identity's geometry is
#: planned in memory, about 4 kB each, before the first image is written).
MAX_IMAGES = 10_000_000
MAX_IDENTITIES = 1_000_000


def estimate_bytes(identities: int, per_identity: int, size: int, dense_points: int = 0) -> int:
    """Approximate size of a synthetic store: per image the RGB crop (size² · 3), the part mask (size² · 2, uint16)
    and about 128 bytes of labels, split, source, box, landmarks and pose, plus 9 bytes per dense landmark
    (``dense_points``: float32 x, y and a visibility flag); plus ~1 MB of fixed overhead."""
    return identities * per_identity * (size * size * 5 + 128 + 9 * dense_points) + (1 << 20)


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} PB"


def check_size(out: str | Path, identities: int, per_identity: int, size: int, resume: bool = False,
               dense_points: int = 0) -> int:
    """Refuse a store that cannot fit: more than :data:`MAX_IMAGES` images or :data:`MAX_IDENTITIES` identities,
    or an estimated size (:func:`estimate_bytes`) above the free space of the output's folder. Returns the
    estimate. Runs before anything is planned or written."""
    import os
    import shutil

    from facetool.io import partial_path

    n = identities * per_identity
    need = estimate_bytes(identities, per_identity, size, dense_points)
    what = (f"--identities {identities} x --per-identity {per_identity} = {n:,} images of {size}x{size} px "
            f"(about {_human(need)})")
    if identities > MAX_IDENTITIES:
        raise FacetoolError(f"{what}: more than {MAX_IDENTITIES:,} identities is beyond prepare synthetic's limit; "
                            "lower --identities")
    if n > MAX_IMAGES:
        raise FacetoolError(f"{what}: more than {MAX_IMAGES:,} images is beyond prepare synthetic's limit; lower "
                            "--identities or --per-identity")
    folder = Path(out).absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return need
    part = partial_path(out)
    have = part.stat().st_size if resume and part.is_file() else 0  # a resumed run has written some already
    if need - have > free:
        raise FacetoolError(f"{what} does not fit: only {_human(free)} free in {folder}{os.sep}; lower --identities, "
                            "--per-identity or --size, or write --out to a larger disk")
    return need


class _Grid:
    """The items ``(identity, index)`` of a synthetic store, computed on access (a list of 10 M tuples would
    hold gigabytes)."""

    def __init__(self, identities: int, per_identity: int) -> None:
        self.identities, self.per_identity = identities, per_identity

    def __len__(self) -> int:
        return self.identities * self.per_identity

    def __getitem__(self, k: int | slice) -> Any:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        return divmod(k % len(self), self.per_identity)


def prepare_synthetic(
    out: str | Path,
    *,
    identities: int = 20,
    per_identity: int = 40,
    size: int = 112,
    seed: int = 0,
    test_fraction: float = 0.2,
    bias: str | BiasSpec | None = None,
    overwrite: bool = False,
    resume: bool = False,
    workers: int = 1,
    landmarks: bool = True,
    pose: str = "default",
) -> tuple[Path, dict]:
    """Render a synthetic face store. Returns (path, summary dict of the written store); a report (counts and
    settings, as the other prepare commands write) goes beside it, ``<out stem>.json``. ``landmarks`` stores
    the iBUG 68-point landmark set of every image (:func:`dense_landmarks`; the images are the same either
    way). ``pose="wide"`` widens yaw and pitch (:data:`POSE_RANGES`) so that the cohort code's pose bins vary."""
    from facetool.data.imdbface import finish_report, guard_report
    from facetool.prepare import build_store
    from facetool.store import FaceStore, Record

    if identities < 1 or per_identity < 1:
        raise FacetoolError(f"--identities and --per-identity must be >= 1, got {identities} and {per_identity}")
    if not 32 <= size <= 1024:
        raise FacetoolError(f"--size must be in 32..1024, got {size}")
    if not 0.0 <= test_fraction < 1.0:
        raise FacetoolError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    if seed < 0:
        raise FacetoolError(f"--seed must be >= 0, got {seed}")
    if pose not in POSE_RANGES:
        raise FacetoolError(f"--pose must be one of {', '.join(POSE_RANGES)}, got {pose!r}")
    spec = parse_bias(bias)
    check_size(out, identities, per_identity, size, resume=resume, dense_points=68 if landmarks else 0)
    guard_report(Path(out), overwrite)
    people = make_identities(identities, seed)
    split = split_codes(identities, per_identity, test_fraction, seed)
    plan = accessory_plan(people, per_identity, spec, seed)
    codes = identity_attributes(identities, seed)
    items = _Grid(identities, per_identity)
    parts = PARTS if spec else PARTS[: PARTS.index("accessory")]

    def process(item: tuple[int, int]) -> Record:
        i, j = item
        p = people[i]
        rng = np.random.default_rng([seed, 2, i, j])
        acc = int(plan[i, j])
        view = sample_view(rng, acc, pose)
        image, lm, mask = draw_face(p, view, size, rng)
        dense = {"ibug68": dense_landmarks(p, view, size, mask)} if landmarks else None
        return Record(
            image=image,
            label=i,
            split=int(split[i, j]),
            source=f"{identity_name(i)}/{j:04d}",
            landmarks=lm,
            attributes={"accessory": acc} if spec else None,
            part_mask=mask,
            meta={"pose": view.pose, "expression": view.expression},
            landmark_sets=dense,
        )

    preprocessing = {
        "generator": "facetool.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "identities": identities,
        "per_identity": per_identity,
        "size": size,
        "seed": seed,
        "test_fraction": test_fraction,
        "bias": str(spec) if spec else None,
        "expression": ["smile", "mouth_open", "brow_raise", "eye_open"],
        "pose": ["yaw", "pitch", "roll"],
    }
    if pose != "default":  # the default store's report stays as it was
        preprocessing["pose_range"] = pose
    writer_kwargs = dict(
        image_size=(size, size),
        identities=[identity_name(i) for i in range(identities)],
        attribute_values={"accessory": ACCESSORIES} if spec else None,
        identity_attributes={k: (v, codes[k]) for k, v in ATTRIBUTES.items()},
        parts=parts,
        meta_shapes={"pose": (3,), "expression": (4,)},
        source="synthetic",
        preprocessing=preprocessing,
        template=_template(people, size),
        landmark_sets={"ibug68": 68} if landmarks else None,
    )
    path, counters = build_store(out, items, process, writer_kwargs=writer_kwargs, overwrite=overwrite, resume=resume,
                                 workers=workers, label="synthetic", drop_empty_identities=False)
    finish_report(path, counters, preprocessing)
    with FaceStore(path) as s:
        return path, s.summary()


def save_grid(store_path: str | Path, png_path: str | Path, n_identities: int = 8, per_identity: int = 6) -> Path:
    """Write a PNG grid: one row per identity (the first ``n_identities``), ``per_identity`` images each."""
    from facetool.io import atomic_path
    from facetool.store import FaceStore

    with FaceStore(store_path) as s:
        labels = s.labels
        rows = []
        for lab in range(min(n_identities, s.num_classes)):
            idx = np.flatnonzero(labels == lab)[:per_identity]
            if len(idx) == 0:
                continue
            imgs = s.images(idx)
            pad = np.zeros((per_identity - len(idx), *imgs.shape[1:]), np.uint8)
            rows.append(np.concatenate(list(np.concatenate([imgs, pad])), axis=1))
    if not rows:
        raise FacetoolError(f"store {store_path} has no images to show")
    grid = np.concatenate(rows, axis=0)
    png = Path(png_path)
    with atomic_path(png.with_suffix(".png") if png.suffix.lower() != ".png" else png) as tmp:
        ok, buf = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
        if not ok:
            raise FacetoolError(f"could not encode grid image {png}")
        tmp.write_bytes(buf.tobytes())
    return png
