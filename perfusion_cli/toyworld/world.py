"""The toy world: 64×64 RGB scenes of simple objects, their captions, and personal "instances".

Pure numpy + PIL, deterministic from a seed, fast (a few thousand images per second on one core).

Pieces
------
* Vocabulary: SCENES, KINDS, COLOURS, PATTERNS, SIZES (see the constants below).
* `Obj` / `Scene`: a scene description; `draw(scene)` renders it, `object_mask(scene)` says which
  object covers each pixel, `caption(scene, rng)` describes it truthfully.
* `sample_scene(rng)` / `sample(n, seed)`: the base-training distribution.
* `Instance`, `INSTANCES`, `DEV_INSTANCES`, `REPORTING_INSTANCES`: specific objects the base
  distribution never produces (instance-only colours in INSTANCE_COLOURS, instance-only "extras"
  such as collars, hats, markings); `photo_set(instance)` gives a user's photos of one,
  `render_instance_in(instance, scene, others, rng)` places it in a scene (evaluation ground truth).

How an image is made
--------------------
Backgrounds come from a per-scene bank of procedurally drawn variants (sky gradient, textured
ground, scene details), built once per process. Each (kind, size, flip, extras) object shape is drawn
once with PIL at 4× resolution into a *label map* (body, shaded body, light body, outline, eye,
fixed colours), reduced to per-pixel coverage coefficients, and cached; placing an object is then a
few numpy operations: body colour (or a two-colour pattern) × coefficients + fixed parts, alpha
composited over the background, with a soft contact shadow.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

RES = 64

# ------------------------------------------------------------------------------------------------
# Vocabulary
# ------------------------------------------------------------------------------------------------

SCENES: tuple[str, ...] = ("on grass", "on a beach", "in the snow", "at night", "in the desert", "on the water")
KINDS: tuple[str, ...] = ("cat", "dog", "bird", "fish", "ball", "box", "car", "house", "tree")
PLURALS: dict[str, str] = {
    "cat": "cats", "dog": "dogs", "bird": "birds", "fish": "fish", "ball": "balls",
    "box": "boxes", "car": "cars", "house": "houses", "tree": "trees",
}
#: Base colours: the only colours `sample_scene` ever gives an object (body or pattern).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (245, 215, 45),
    "green": (60, 170, 70),
    "blue": (45, 95, 215),
    "purple": (135, 60, 185),
    "pink": (245, 140, 185),
    "white": (245, 245, 245),
    "black": (30, 30, 35),
    "brown": (125, 80, 45),
    "grey": (135, 135, 140),
}
#: Reserved for instances: never used by the base sampler, never said in a base caption.
INSTANCE_COLOURS: dict[str, tuple[int, int, int]] = {
    "teal": (0, 140, 140),
    "gold": (225, 180, 0),
    "lime": (170, 230, 40),
    "navy": (15, 15, 110),
    "maroon": (125, 0, 60),
    "cyan": (70, 210, 230),
}
ALL_COLOURS: dict[str, tuple[int, int, int]] = {**COLOURS, **INSTANCE_COLOURS}
PATTERNS: tuple[str, ...] = ("solid", "striped", "spotted", "checked")
SIZES: tuple[str, ...] = ("small", "medium", "big")  # "medium" is never said: it is the unspecified size
SIZE_SCALE: dict[str, float] = {"small": 0.68, "medium": 1.0, "big": 1.38}
POSITIONS: tuple[str, ...] = ("left", "centre", "right")
NUMBERS: dict[int, str] = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}

#: Extras (instance-only features) each kind can draw; values are colour names (or tuples of them).
EXTRAS: dict[str, tuple[str, ...]] = {
    "cat": ("ears", "collar", "tag", "eye_patch", "star", "hat", "scarf", "chest", "paws", "tail_tip"),
    "dog": ("ears", "collar", "tag", "eye_patch", "blaze", "bandana", "paws", "tail_tip", "saddle", "cap"),
    "bird": ("crest", "wing"),
    "fish": ("fins",),
    "ball": ("segments",),
    "box": ("ribbon",),
    "car": ("stripe", "wheels"),
    "house": ("round_window", "roof_stripes"),
    "tree": ("fruit", "birdhouse"),
}


def rgb(colour: str) -> np.ndarray:
    """RGB (float32, 0..255) of a colour name (base or instance-only)."""
    return _RGB[colour]


_RGB = {k: np.array(v, np.float32) for k, v in ALL_COLOURS.items()}


def position_of(obj: "Obj") -> str:
    """'left', 'centre' or 'right': which third of the image the object's centre is in."""
    return POSITIONS[min(2, max(0, int(obj.x * 3 // RES)))]


# ------------------------------------------------------------------------------------------------
# Scene description
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Obj:
    """One object. x: centre column; y: the row it stands on (its ground line); None = not placed yet.

    pattern is drawn with colour2 inside the body; flip=True faces left; extras are instance-only
    features ((feature, colour-or-colours), ...); variant picks the pattern phase and stripe direction;
    instance names the Instance this object renders (None for base objects).
    """

    kind: str
    colour: str
    pattern: str = "solid"
    colour2: str | None = None
    size: str = "medium"
    x: int | None = None
    y: int | None = None
    flip: bool = False
    extras: tuple = ()
    variant: int = 0
    instance: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}")
        if self.colour not in ALL_COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}")
        if (self.pattern == "solid") != (self.colour2 is None):
            raise ValueError("colour2 is given exactly when the pattern is not solid")
        if self.colour2 is not None and self.colour2 not in ALL_COLOURS:
            raise ValueError(f"unknown colour {self.colour2!r}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}")
        for feat, val in self.extras:
            if feat not in EXTRAS[self.kind]:
                raise ValueError(f"a {self.kind} has no extra {feat!r} (has {EXTRAS[self.kind]})")
            for c in (val if isinstance(val, tuple) else (val,)):
                if c not in ALL_COLOURS:
                    raise ValueError(f"unknown colour {c!r} in extra {feat!r}")


@dataclass
class Scene:
    """A scene: its name (one of SCENES), objects in drawing order, and the background variant."""

    name: str
    objs: list[Obj] = field(default_factory=list)
    bg: int = 0
    bg_flip: bool = False


# ------------------------------------------------------------------------------------------------
# Object templates: drawn once at 4x into a label map, reduced to coverage coefficients
# ------------------------------------------------------------------------------------------------

_SS = 4  # supersampling of templates and backgrounds
NONE, BODY, SHADE, LIGHT, OUT, EYE = 0, 1, 2, 3, 4, 5
_BODYLIKE = (BODY, SHADE, LIGHT)
# Columns: body-colour factor (pattern applies), flat colour factor (no pattern), outline, eye, constant rgb.
_BASE_TABLE = [
    (0, 0, 0, 0, 0, 0, 0),
    (1, 0, 0, 0, 0, 0, 0),
    (0.78, 0, 0, 0, 0, 0, 0),
    (0.62, 0, 0, 0, 97, 97, 97),
    (0, 0, 1, 0, 0, 0, 0),
    (0, 0, 0, 1, 0, 0, 0),
]
# Fixed part colours of the base drawings (none near an instance-only colour).
DARK = (28, 26, 30)
NOSE = (235, 125, 150)
GLASS = (175, 215, 240)
TYRE = (35, 35, 40)
HUB = (165, 165, 170)
ROOF = (95, 68, 62)
DOOR = (105, 70, 40)
TRUNK = (112, 78, 46)
BEAK = (240, 160, 45)
FRAME = (240, 240, 240)
LAMP = (250, 238, 150)


@dataclass(frozen=True)
class _Template:
    alpha: np.ndarray    # (h, w) coverage
    mask: np.ndarray     # (h, w) bool, alpha >= 0.5
    area: int            # mask.sum()
    body: np.ndarray     # (h, w, 1) body-colour coefficient
    mix: np.ndarray      # (h, w, 3) coefficients of (colour, outline colour, eye colour)
    const: np.ndarray    # (h, w, 3) fixed-colour contribution
    shadow: np.ndarray   # (h, w, 1) contact shadow strength
    keep: np.ndarray     # (h, w, 1) background factor: (1 - shadow) * (1 - alpha)
    ax: int              # column of the object's centre line
    ay: int              # row of the ground line


class _Painter:
    """Draws in medium-size pixel units around the anchor (0, 0) = ground centre, y up is negative."""

    def __init__(self, f: float):
        self.f = f
        self.W = 2 * math.ceil(18 * f + 3)
        self.H = math.ceil(34 * f + 7)
        self.ax, self.ay = self.W // 2, self.H - 3
        self.lab = np.zeros((self.H * _SS, self.W * _SS), np.uint8)
        self.table = [list(r) for r in _BASE_TABLE]
        self._fixed: dict[tuple, int] = {}

    def colour(self, c) -> int:
        """Label of a fixed colour (an RGB tuple or a colour name)."""
        c = tuple(int(v) for v in (ALL_COLOURS[c] if isinstance(c, str) else c))
        if c not in self._fixed:
            self._fixed[c] = len(self.table)
            self.table.append([0, 0, 0, 0, *c])
        return self._fixed[c]

    def _p(self, x, y):
        return ((self.ax + x * self.f) * _SS, (self.ay + y * self.f) * _SS)

    def _apply(self, draw_fn, lab, clip):
        im = Image.new("L", (self.lab.shape[1], self.lab.shape[0]), 0)
        draw_fn(ImageDraw.Draw(im))
        m = np.asarray(im) > 0
        if clip is not None:
            m &= np.isin(self.lab, clip)
        self.lab[m] = lab if isinstance(lab, int) else self.colour(lab)

    def ellipse(self, cx, cy, rx, ry, lab, clip=None):
        box = [*self._p(cx - rx, cy - ry), *self._p(cx + rx, cy + ry)]
        self._apply(lambda d: d.ellipse(box, fill=255), lab, clip)

    def circle(self, cx, cy, r, lab, clip=None):
        self.ellipse(cx, cy, r, r, lab, clip)

    def rect(self, x0, y0, x1, y1, lab, clip=None, radius=0.0):
        box = [*self._p(x0, y0), *self._p(x1, y1)]
        if radius:
            r = radius * self.f * _SS
            self._apply(lambda d: d.rounded_rectangle(box, r, fill=255), lab, clip)
        else:
            self._apply(lambda d: d.rectangle(box, fill=255), lab, clip)

    def poly(self, pts, lab, clip=None):
        q = [self._p(x, y) for x, y in pts]
        self._apply(lambda d: d.polygon(q, fill=255), lab, clip)

    def line(self, pts, width, lab, clip=None):
        q = [self._p(x, y) for x, y in pts]
        w = max(1, round(width * self.f * _SS))
        r = w / 2

        def fn(d):
            d.line(q, fill=255, width=w, joint="curve")
            for x, y in (q[0], q[-1]):
                d.ellipse([x - r, y - r, x + r, y + r], fill=255)

        self._apply(fn, lab, clip)

    def pie(self, cx, cy, rx, ry, start, end, lab, clip=None):
        box = [*self._p(cx - rx, cy - ry), *self._p(cx + rx, cy + ry)]
        self._apply(lambda d: d.pieslice(box, start, end, fill=255), lab, clip)

    def star(self, cx, cy, r, lab, clip=None):
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        self.poly(pts, lab, clip)

    def finish(self, flip: bool, shadow_width: float) -> _Template:
        lab = self.lab
        sil = lab > 0
        dil = sil.copy()
        r = 3  # outline of ~0.75 px
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                if dx * dx + dy * dy <= r * r + 1 and (dx or dy):
                    dil |= np.roll(np.roll(sil, dy, 0), dx, 1)
        lab = lab.copy()
        lab[dil & ~sil] = OUT
        # contact shadow: a flat ellipse on the ground line
        im = Image.new("L", (lab.shape[1], lab.shape[0]), 0)
        sx, sy = self._p(0, 0)
        rx, ry = shadow_width * self.f * _SS / 2, 1.7 * _SS
        ImageDraw.Draw(im).ellipse([sx - rx, sy - ry, sx + rx, sy + ry], fill=255)
        shadow4 = np.asarray(im, np.float32) / 255.0

        table = np.array(self.table, np.float32)
        per = table[lab]  # (H4, W4, 7)
        full = np.concatenate([per, (lab > 0)[..., None], shadow4[..., None]], axis=-1)
        H, W = self.H, self.W
        red = _block_mean(full)
        ax = self.ax
        if flip:
            red = red[:, ::-1]
            ax = W - ax
        alpha = red[..., 7]
        keep = (alpha > 0.01) | (red[..., 8] > 0.01)
        rows, cols = np.nonzero(keep.any(1))[0], np.nonzero(keep.any(0))[0]
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        red = np.ascontiguousarray(red[r0:r1, c0:c1])
        alpha = red[..., 7]
        mask = alpha >= 0.5
        shadow = (0.32 * red[..., 8:9] * (1 - alpha[..., None])).astype(np.float32)
        return _Template(
            alpha=alpha[..., None].copy(), mask=mask, area=int(mask.sum()),
            body=red[..., 0:1].copy(), mix=red[..., 1:4].copy(), const=red[..., 4:7].copy(),
            shadow=shadow, keep=((1 - shadow) * (1 - alpha[..., None])).astype(np.float32),
            ax=int(ax - c0), ay=int(self.ay - r0),
        )


def _cat(p: _Painter, ex: dict):
    ear = p.colour(ex["ears"]) if "ears" in ex else BODY
    p.line([(-9, -10.5), (-12.2, -13), (-13.2, -17), (-11.8, -21)], 2.5, BODY)  # tail
    if "tail_tip" in ex:
        p.circle(-11.8, -21, 1.7, ex["tail_tip"], clip=_BODYLIKE)
    p.rect(-5.6, -8, -3.4, 0, SHADE)  # far legs
    p.rect(6.2, -8, 8.4, 0, SHADE)
    p.ellipse(-1, -10.5, 10, 5.6, BODY)
    p.rect(-9, -8, -6.8, 0, BODY)  # near legs
    p.rect(2.8, -8, 5.0, 0, BODY)
    if "paws" in ex:
        for x0 in (-5.6, 6.2, -9, 2.8):
            p.rect(x0, -2.2, x0 + 2.2, 0, ex["paws"], clip=_BODYLIKE)
    if "star" in ex:
        p.star(-3.5, -10.5, 3.6, ex["star"], clip=_BODYLIKE)
    if "chest" in ex:
        p.ellipse(5.5, -10, 2.6, 3.6, ex["chest"], clip=_BODYLIKE)
    p.poly([(3.3, -19), (4.0, -26.5), (8.3, -21.5)], ear)  # ears
    p.poly([(7.9, -21.5), (12.2, -26.5), (13.1, -19)], ear)
    p.ellipse(8.2, -16.5, 5.9, 5.4, BODY)  # head
    if "scarf" in ex:
        p.line([(3.6, -15.5), (6.3, -11.8), (9.5, -11.0)], 2.4, ex["scarf"])
        p.poly([(4.6, -13.2), (6.9, -12.6), (5.6, -5.8), (3.6, -6.3)], ex["scarf"])
    if "collar" in ex:
        p.line([(3.9, -15.2), (6.4, -11.9), (9.6, -11.1)], 1.6, ex["collar"])
        if "tag" in ex:
            p.circle(6.6, -10.3, 1.2, ex["tag"])
    if "eye_patch" in ex:
        p.ellipse(10.2, -17.3, 2.6, 2.4, ex["eye_patch"])
    p.circle(6.3, -17.2, 1.0, EYE)
    front_eye = EYE
    if "eye_patch" in ex:
        front_eye = _contrast_eye(ex["eye_patch"])
    p.circle(10.1, -17.2, 1.0, front_eye)
    p.circle(8.3, -15.0, 0.75, NOSE)
    if "hat" in ex:
        p.rect(3.2, -22.6, 13.2, -21.2, ex["hat"])
        p.rect(5.3, -29.5, 11.1, -22.2, ex["hat"])
        p.rect(5.3, -24.2, 11.1, -23.0, (230, 40, 40) if ex["hat"] != "red" else (245, 245, 245))


def _contrast_eye(colour: str):
    c = ALL_COLOURS[colour]
    return DARK if 0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2] > 90 else (235, 225, 90)


def _dog(p: _Painter, ex: dict):
    ear = p.colour(ex["ears"]) if "ears" in ex else SHADE
    p.line([(-10.5, -13.5), (-13, -16.5), (-14, -20.5)], 2.2, BODY)  # tail, up
    if "tail_tip" in ex:
        p.circle(-14, -20.5, 1.6, ex["tail_tip"], clip=_BODYLIKE)
    p.rect(-6, -10, -3.8, 0, SHADE)  # far legs
    p.rect(7.2, -10, 9.4, 0, SHADE)
    p.ellipse(-1, -13, 11, 5.2, BODY)
    p.rect(-9.6, -10, -7.4, 0, BODY)  # near legs
    p.rect(3.6, -10, 5.8, 0, BODY)
    if "paws" in ex:
        for x0 in (-6, 7.2, -9.6, 3.6):
            p.rect(x0, -2.2, x0 + 2.2, 0, ex["paws"], clip=_BODYLIKE)
    if "saddle" in ex:
        p.ellipse(-3, -15.5, 6, 3.3, ex["saddle"], clip=_BODYLIKE)
    p.ellipse(9, -18.5, 5.2, 4.9, BODY)  # head
    p.ellipse(13.8, -16.4, 4.2, 2.7, LIGHT)  # snout
    if "blaze" in ex:
        p.line([(9.6, -23), (10.8, -20.5), (13, -17.5)], 1.7, ex["blaze"], clip=_BODYLIKE)
    if "eye_patch" in ex:
        p.ellipse(10.4, -19.6, 2.4, 2.2, ex["eye_patch"])
    p.poly([(4.6, -22.3), (8.6, -23.2), (8.2, -15.2), (5.8, -13.4), (3.9, -15.4)], ear)  # floppy ear
    if "bandana" in ex:
        p.poly([(5.0, -15.2), (11.6, -13.6), (7.6, -8.4)], ex["bandana"])
    if "collar" in ex:
        p.line([(5.4, -15.0), (8.0, -13.4), (11.2, -13.3)], 1.6, ex["collar"])
        if "tag" in ex:
            p.circle(8.3, -12.0, 1.25, ex["tag"])
    if "cap" in ex:
        p.pie(8.8, -21.6, 4.6, 3.6, 180, 360, ex["cap"])
        p.rect(8.8, -22.1, 15.2, -20.9, ex["cap"])
    p.circle(10.4, -19.6, 1.0, _contrast_eye(ex["eye_patch"]) if "eye_patch" in ex else EYE)
    p.circle(17.6, -17.0, 1.25, DARK)  # nose


def _bird(p: _Painter, ex: dict):
    p.line([(-1.2, -4.5), (-1.8, 0)], 0.8, BEAK)  # legs
    p.line([(1.6, -4.5), (2.2, 0)], 0.8, BEAK)
    p.poly([(-4.5, -8.5), (-11, -12.5), (-10.5, -6.5)], SHADE)  # tail
    p.ellipse(-0.5, -8.3, 6.4, 4.4, BODY)
    if "crest" in ex:
        for (x0, x1, xt, yt) in ((3.2, 5.0, 2.6, -18.3), (4.4, 6.2, 4.6, -19.0), (5.6, 7.2, 6.8, -18.0)):
            p.poly([(x0, -14.5), (x1, -14.5), (xt, yt)], ex["crest"])
    p.circle(5.2, -12.6, 3.5, BODY)  # head
    p.ellipse(-1.8, -8.6, 4.3, 2.5, p.colour(ex["wing"]) if "wing" in ex else SHADE)  # folded wing
    p.poly([(8.1, -13.6), (11.8, -12.4), (8.1, -11.2)], BEAK)
    p.circle(6.1, -13.3, 0.85, EYE)


def _fish(p: _Painter, ex: dict):
    fin = p.colour(ex["fins"]) if "fins" in ex else SHADE
    p.poly([(-6.5, -6.8), (-13, -12.5), (-11.2, -6.8), (-13, -1.0)], fin)  # tail
    p.poly([(-4, -10.5), (3, -11), (-2.5, -14.8)], fin)  # dorsal fin
    p.ellipse(0, -6.8, 8.6, 5.4, BODY)
    p.poly([(-1, -3.6), (3.6, -3.0), (0.2, -0.2)], fin)  # belly fin
    p.line([(3.6, -10.2), (4.7, -6.8), (3.6, -3.4)], 0.7, SHADE)  # gill
    p.circle(5.6, -8.0, 1.05, EYE)


def _ball(p: _Painter, ex: dict):
    p.circle(0, -8, 8, BODY)
    if "segments" in ex:
        cols = ex["segments"]
        k = len(cols)
        for i, c in enumerate(cols * 2):
            p.pie(0, -8, 8.5, 8.5, i * 180 / k - 90, (i + 1) * 180 / k - 90, c, clip=_BODYLIKE)
        p.circle(0, -8, 2.2, BODY)
    p.ellipse(-3.1, -11.2, 2.2, 1.8, LIGHT, clip=_BODYLIKE)  # highlight


def _box(p: _Painter, ex: dict):
    p.rect(-8, -15, 6, 0, BODY)
    p.poly([(-8, -15), (6, -15), (9.5, -18.5), (-4.5, -18.5)], LIGHT)
    p.poly([(6, -15), (9.5, -18.5), (9.5, -3.5), (6, 0)], SHADE)
    if "ribbon" in ex:
        c = ex["ribbon"]
        p.rect(-2.2, -15, 0.2, 0, c)
        p.rect(-8, -8.7, 6, -6.3, c)
        p.poly([(6, -8.7), (9.5, -12.2), (9.5, -9.8), (6, -6.3)], c)
        p.poly([(-2.2, -15), (0.2, -15), (3.7, -18.5), (1.3, -18.5)], c)
        p.poly([(-6.3, -16.1), (6.3, -16.1), (7.5, -17.4), (-5.1, -17.4)], c, clip=(LIGHT,))
        p.poly([(0.8, -17.2), (-4, -21.5), (-3.4, -16.8)], c)  # bow
        p.poly([(0.8, -17.2), (5.2, -21.8), (5.4, -16.6)], c)
        p.circle(0.8, -17.2, 1.2, c)


def _car(p: _Painter, ex: dict):
    p.poly([(-8.4, -10), (-5.2, -16.2), (5.4, -16.2), (9.6, -10)], BODY)  # cabin
    p.rect(-15, -10.8, 15, -3, BODY, radius=2.2)
    p.poly([(-6.6, -10.8), (-4.3, -15.0), (-0.4, -15.0), (-0.4, -10.8)], GLASS)
    p.poly([(0.6, -10.8), (0.6, -15.0), (4.8, -15.0), (7.6, -10.8)], GLASS)
    if "stripe" in ex:
        p.rect(-15, -8.0, 15, -5.9, ex["stripe"], clip=_BODYLIKE)
        p.rect(-15, -16.2, 15, -15.2, ex["stripe"], clip=_BODYLIKE)
    p.circle(14.1, -8.2, 0.9, LAMP)
    p.rect(-15, -9.0, -14.0, -7.2, (190, 30, 30))
    hub = ALL_COLOURS[ex["wheels"]] if "wheels" in ex else HUB
    hr = 2.1 if "wheels" in ex else 1.3
    for x in (-8.6, 8.6):
        p.circle(x, -3.4, 3.4, TYRE)
        p.circle(x, -3.4, hr, hub)


def _house(p: _Painter, ex: dict):
    p.rect(5, -29, 8.6, -21, ROOF)  # chimney
    p.rect(-11, -18, 11, 0, BODY)  # walls
    if "roof_stripes" in ex:
        a, b = ex["roof_stripes"]
        p.poly([(-14.2, -17.4), (14.2, -17.4), (0, -30.2)], a)
        for y in (-20.2, -25.0):
            p.rect(-15, y - 1.4, 15, y + 1.0, b, clip=(p.colour(a),))
        p.rect(-15, -29.8, 15, -28.4, b, clip=(p.colour(a),))
    else:
        p.poly([(-14.2, -17.4), (14.2, -17.4), (0, -30.2)], ROOF)
    p.rect(-2.8, -9.6, 2.8, 0, DOOR)
    p.circle(1.6, -4.6, 0.55, (230, 200, 80))
    if "round_window" in ex:
        for x in (-6.6, 6.6):
            p.circle(x, -13.2, 3.1, FRAME)
            p.circle(x, -13.2, 2.2, ex["round_window"])
        p.circle(0, -21.6, 2.3, FRAME)
        p.circle(0, -21.6, 1.5, ex["round_window"])
    else:
        for x0 in (-9.2, 4.6):
            p.rect(x0, -15.6, x0 + 4.6, -11.0, GLASS)
            p.rect(x0 + 2.0, -15.6, x0 + 2.6, -11.0, FRAME)
            p.rect(x0, -13.6, x0 + 4.6, -13.0, FRAME)


def _tree(p: _Painter, ex: dict):
    p.rect(-2.4, -14, 2.4, 0, TRUNK)
    p.circle(-6.4, -18.6, 5.9, BODY)
    p.circle(6.4, -18.6, 5.9, BODY)
    p.circle(0, -23.2, 8.6, BODY)
    p.circle(0, -15.8, 4.8, SHADE)
    if "fruit" in ex:
        for x, y in ((-4.5, -25.5), (3.8, -27.6), (5.2, -20.4), (-7.2, -18.2), (0.2, -19.8)):
            p.circle(x, y, 1.7, ex["fruit"])
    if "birdhouse" in ex:
        c = ex["birdhouse"]
        p.rect(-2.2, -11.2, 2.2, -7.0, c)
        p.poly([(-3.0, -11.0), (3.0, -11.0), (0, -13.4)], DARK)
        p.circle(0, -9.2, 0.8, DARK)


_KIND_DRAW = {"cat": _cat, "dog": _dog, "bird": _bird, "fish": _fish, "ball": _ball, "box": _box,
              "car": _car, "house": _house, "tree": _tree}
_KIND_SCALE = {"bird": 1.25, "fish": 1.1}  # drawings are in medium-size units; these kinds are drawn larger
_SHADOW_W = {"cat": 24, "dog": 26, "bird": 10, "fish": 20, "ball": 15, "box": 19, "car": 31, "house": 27,
             "tree": 12}


@lru_cache(maxsize=None)
def _template(kind: str, size: str, flip: bool, extras: tuple) -> _Template:
    p = _Painter(SIZE_SCALE[size] * _KIND_SCALE.get(kind, 1.0))
    _KIND_DRAW[kind](p, dict(extras))
    return p.finish(flip, _SHADOW_W[kind])


def object_size(obj: Obj) -> tuple[int, int]:
    """(width, height) in pixels of an object's drawing (its outline included)."""
    t = _template(obj.kind, obj.size, obj.flip, obj.extras)
    return t.mask.shape[1], t.mask.shape[0]


# ------------------------------------------------------------------------------------------------
# Patterns: precomputed anti-aliased coverage canvases, sliced at an object's phase
# ------------------------------------------------------------------------------------------------

_PERIOD = {"small": 5.0, "medium": 6.0, "big": 7.5}
_PAT_N = 96


@lru_cache(maxsize=None)
def _pattern_canvas(pattern: str, period: float, direction: int) -> np.ndarray:
    n = (_PAT_N + 8) * _SS
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    X, Y = (xx + 0.5) / _SS, (yy + 0.5) / _SS
    if pattern == "striped":
        s = (X + direction * Y) / math.sqrt(2)
        v = (s % period) < period / 2
    elif pattern == "spotted":
        row_h = period * 0.87
        row = np.floor(Y / row_h)
        cy = (row + 0.5) * row_h
        xo = X + (row % 2) * period / 2
        cx = (np.floor(xo / period) + 0.5) * period
        v = (xo - cx) ** 2 + (Y - cy) ** 2 < (0.32 * period) ** 2
    elif pattern == "checked":
        q = period / 2
        v = (np.floor(X / q) + np.floor(Y / q)) % 2 == 1
    else:
        raise ValueError(pattern)
    m = v.astype(np.float32).reshape(n // _SS, _SS, n // _SS, _SS).mean(axis=(1, 3))
    return m[..., None]


def _pattern(obj: Obj) -> np.ndarray:
    period = _PERIOD[obj.size]
    P = _pattern_canvas(obj.pattern, period, 1 if (obj.variant // 64) % 2 == 0 else -1)
    ox, oy = obj.variant % 8, (obj.variant // 8) % 8
    return P[oy:, ox:]


# ------------------------------------------------------------------------------------------------
# Backgrounds: a per-scene bank of variants
# ------------------------------------------------------------------------------------------------

N_BACKGROUNDS = 48
_BG: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _jit(rng, c, a=10):
    return np.clip(np.array(c, np.float32) + rng.uniform(-a, a, 3), 0, 255)


def _vgrad(c0, c1, rows: int, width: int) -> np.ndarray:
    t = np.linspace(0, 1, max(rows, 1), dtype=np.float32)[:, None, None]
    return np.broadcast_to((1 - t) * np.asarray(c0, np.float32) + t * np.asarray(c1, np.float32),
                           (max(rows, 1), width, 3)).copy()


def _smooth_noise(rng, shape, cells) -> np.ndarray:
    g = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    im = Image.fromarray(g, mode="F").resize((shape[1], shape[0]), Image.BICUBIC)
    return np.asarray(im, np.float32)


def _fill_rows(img, y0, y1, c0, c1):
    """Vertical gradient c0→c1 over rows y0..y1 (4x units)."""
    y0, y1 = int(max(0, y0)), int(min(img.shape[0], y1))
    if y1 > y0:
        img[y0:y1] = _vgrad(c0, c1, y1 - y0, img.shape[1])


def _ridge_fill(img, base, amp, wavelength, phase, colour_top, colour_bottom, rng):
    """Fill below a sinusoidal ridge y = base + amp*sin(...) (4x units) with a vertical gradient that
    runs from colour_top at the ridge's highest point to colour_bottom at the image bottom."""
    n = img.shape[0]
    xs = np.arange(img.shape[1], dtype=np.float32)
    ridge = base + amp * np.sin(2 * math.pi * xs / wavelength + phase) \
        + 0.4 * amp * np.sin(2 * math.pi * xs / (wavelength * 0.47) + 2 * phase)
    r0 = int(max(0, math.floor(ridge.min())))
    if r0 >= n:
        return ridge
    ys = np.arange(r0, n, dtype=np.float32)
    t = ((ys - r0) / max(n - r0, 1))[:, None]
    rows = (1 - t) * np.asarray(colour_top, np.float32) + t * np.asarray(colour_bottom, np.float32)
    inside = ys[:, None] >= ridge[None, :]
    sub = img[r0:]
    np.copyto(sub, rows[:, None, :], where=inside[..., None])
    return ridge


def _block_mean(a: np.ndarray, s: int = _SS) -> np.ndarray:
    """Mean over s×s blocks of the first two axes (strided adds: much faster than a reshaped mean)."""
    b = a[0::s].astype(np.float32)
    for i in range(1, s):
        b += a[i::s]
    c = b[:, 0::s].copy()
    for i in range(1, s):
        c += b[:, i::s]
    return c * (1.0 / (s * s))


def _down(img4: np.ndarray) -> np.ndarray:
    return _block_mean(img4)


def _pil_draw(img4, fn):
    im = Image.fromarray(np.clip(img4, 0, 255).astype(np.uint8))
    fn(ImageDraw.Draw(im))
    img4[:] = np.asarray(im, np.float32)


def _clouds(rng, img4, horizon4, k):
    def fn(d):
        for _ in range(k):
            cx, cy = rng.uniform(0, 256), rng.uniform(14, max(20, horizon4 - 50))
            w = rng.uniform(28, 50)
            for _ in range(rng.integers(3, 6)):
                ex, ey = cx + rng.uniform(-w / 2, w / 2), cy + rng.uniform(-6, 6)
                r = rng.uniform(8, 14)
                d.ellipse([ex - r * 1.3, ey - r, ex + r * 1.3, ey + r], fill=(250, 251, 253))
    _pil_draw(img4, fn)


def _bg_grass(rng):
    H = int(rng.integers(33, 40))
    S = _SS
    img = np.zeros((RES * S, RES * S, 3), np.float32)
    _fill_rows(img, 0, H * S, _jit(rng, (90, 150, 230)), _jit(rng, (185, 215, 245)))
    _fill_rows(img, H * S, RES * S, _jit(rng, (120, 192, 80)), _jit(rng, (56, 135, 46)))
    _ridge_fill(img, H * S - rng.uniform(4, 10), rng.uniform(2, 6), rng.uniform(60, 140), rng.uniform(0, 6.3),
                _jit(rng, (80, 150, 70)), _jit(rng, (110, 180, 80)), rng)  # far hills
    _fill_rows(img, H * S, RES * S, _jit(rng, (120, 192, 80)), _jit(rng, (56, 135, 46)))
    _clouds(rng, img, H * S, int(rng.integers(0, 4)))
    out = _down(img)
    g = out[H:]
    g += _smooth_noise(rng, g.shape[:2], 5)[..., None] * np.array([8, 14, 6], np.float32)
    # grass blades: short vertical darker / lighter strokes
    n = int(rng.integers(120, 220))
    ys, xs = rng.integers(H + 1, RES, n), rng.integers(0, RES, n)
    shade = rng.choice([-28.0, 22.0], n)[:, None] * np.array([0.6, 1.0, 0.5], np.float32)
    out[ys, xs] += shade
    out[ys - 1, xs] += shade * 0.6
    for _ in range(int(rng.integers(0, 8))):  # tiny flowers
        y, x = int(rng.integers(H + 3, RES)), int(rng.integers(0, RES))
        out[y, x] = (250, 250, 240) if rng.random() < 0.5 else (250, 225, 70)
    out += rng.normal(0, 2.5, out.shape).astype(np.float32)
    return out, H + 8


def _bg_beach(rng):
    H = int(rng.integers(29, 35))
    shore = H + int(rng.integers(6, 10))
    S = _SS
    img = np.zeros((RES * S, RES * S, 3), np.float32)
    _fill_rows(img, 0, H * S, _jit(rng, (95, 165, 235)), _jit(rng, (200, 226, 246)))
    _fill_rows(img, H * S, RES * S, _jit(rng, (35, 110, 195)), _jit(rng, (70, 155, 210)))
    if rng.random() < 0.5:
        cx, cy = rng.uniform(20, 236), rng.uniform(18, H * S - 40)
        _pil_draw(img, lambda d: d.ellipse([cx - 18, cy - 18, cx + 18, cy + 18], fill=(255, 240, 170)))
    _clouds(rng, img, H * S, int(rng.integers(0, 3)))
    def sea(d):
        for _ in range(int(rng.integers(8, 16))):
            x, y = rng.uniform(0, 256), rng.uniform(H * S + 4, shore * S - 6)
            d.line([x, y, x + rng.uniform(8, 20), y], fill=(210, 235, 250), width=3)
    _pil_draw(img, sea)
    ridge = _ridge_fill(img, shore * S, rng.uniform(2, 5), rng.uniform(50, 110), rng.uniform(0, 6.3),
                        (250, 252, 252), (250, 252, 252), rng)  # foam
    _ridge_fill(img, shore * S + 5, rng.uniform(2, 5), rng.uniform(50, 110), rng.uniform(0, 6.3),
                _jit(rng, (200, 175, 125), 6), _jit(rng, (215, 190, 140), 6), rng)  # wet sand
    _ridge_fill(img, shore * S + 14, rng.uniform(1, 3), rng.uniform(60, 130), rng.uniform(0, 6.3),
                _jit(rng, (240, 222, 170), 6), _jit(rng, (226, 204, 150), 6), rng)  # dry sand
    out = _down(img)
    g = out[shore:]
    g += _smooth_noise(rng, g.shape[:2], 6)[..., None] * np.array([9, 8, 6], np.float32)
    g += rng.normal(0, 5, g.shape).astype(np.float32) * np.array([1, 0.9, 0.7], np.float32)
    out += rng.normal(0, 1.5, out.shape).astype(np.float32)
    return out, shore + 5


def _bg_snow(rng):
    H = int(rng.integers(32, 40))
    S = _SS
    img = np.zeros((RES * S, RES * S, 3), np.float32)
    _fill_rows(img, 0, H * S, _jit(rng, (165, 182, 205), 8), _jit(rng, (220, 228, 238), 6))
    _ridge_fill(img, H * S - rng.uniform(10, 26), rng.uniform(5, 12), rng.uniform(70, 160), rng.uniform(0, 6.3),
                (238, 242, 250), (205, 216, 234), rng)  # snowy hills
    _ridge_fill(img, H * S, rng.uniform(1, 3), rng.uniform(60, 150), rng.uniform(0, 6.3),
                (248, 250, 253), (212, 222, 238), rng)  # ground
    out = _down(img)
    g = out[H:]
    g += _smooth_noise(rng, g.shape[:2], 6)[..., None] * np.array([12, 9, 4], np.float32)
    out[:] = np.minimum(out, 253)
    flakes = np.zeros((RES, RES), np.float32)
    n = int(rng.integers(35, 70))
    ys, xs = rng.integers(0, RES, n), rng.integers(0, RES, n)
    flakes[ys, xs] = rng.uniform(0.6, 1.0, n)
    big = rng.random(n) < 0.3
    for dy, dx in ((0, 1), (1, 0), (1, 1)):
        flakes[np.minimum(ys[big] + dy, RES - 1), np.minimum(xs[big] + dx, RES - 1)] = 0.9
    out = out * (1 - flakes[..., None]) + 255 * flakes[..., None]
    return out, H + 8


def _bg_night(rng):
    H = int(rng.integers(34, 41))
    S = _SS
    img = np.zeros((RES * S, RES * S, 3), np.float32)
    _fill_rows(img, 0, H * S, _jit(rng, (8, 12, 42), 5), _jit(rng, (32, 42, 90), 8))
    mx, my, mr = rng.uniform(16, 240), rng.uniform(20, H * S - 50), rng.uniform(15, 22)
    crescent = rng.random() < 0.5
    sky_at = img[int(my), int(mx)].copy()

    def moon(d):
        d.ellipse([mx - mr, my - mr, mx + mr, my + mr], fill=(242, 236, 195))
        if crescent:
            o = mr * 0.55
            d.ellipse([mx - mr + o, my - mr - o * 0.4, mx + mr + o, my + mr - o * 0.4],
                      fill=tuple(int(v) for v in sky_at))
    _pil_draw(img, moon)
    _ridge_fill(img, H * S - rng.uniform(6, 16), rng.uniform(3, 9), rng.uniform(70, 150), rng.uniform(0, 6.3),
                (22, 30, 52), (22, 30, 52), rng)  # dark hills
    _fill_rows(img, H * S, RES * S, _jit(rng, (34, 60, 50), 5), _jit(rng, (14, 30, 26), 4))
    out = _down(img)
    # stars (not on the moon)
    n = int(rng.integers(22, 45))
    ys, xs = rng.integers(0, H - 4, n), rng.integers(0, RES, n)
    far = (xs - mx / S) ** 2 + (ys - my / S) ** 2 > (mr / S + 2) ** 2
    ys, xs = ys[far], xs[far]
    b = rng.uniform(150, 255, len(ys))[:, None]
    out[ys, xs] = b * np.array([1, 1, 0.88], np.float32)
    g = out[H:]
    g += _smooth_noise(rng, g.shape[:2], 6)[..., None] * np.array([5, 8, 6], np.float32)
    out += rng.normal(0, 1.5, out.shape).astype(np.float32)
    return out, H + 8


def _bg_desert(rng):
    H = int(rng.integers(32, 40))
    S = _SS
    img = np.zeros((RES * S, RES * S, 3), np.float32)
    _fill_rows(img, 0, RES * S, _jit(rng, (240, 190, 120), 8), _jit(rng, (252, 240, 205), 5))
    cx, cy, r = rng.uniform(24, 232), rng.uniform(22, H * S - 60), rng.uniform(20, 28)

    def sun(d):
        d.ellipse([cx - r * 1.5, cy - r * 1.5, cx + r * 1.5, cy + r * 1.5], fill=(252, 222, 160))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, 248, 205))
    _pil_draw(img, sun)
    ridges = []
    for base, top, bot in ((H * S - rng.uniform(8, 20), (232, 180, 110), (214, 160, 92)),
                           (H * S + rng.uniform(2, 10), (238, 192, 118), (220, 168, 96)),
                           (H * S + rng.uniform(40, 70), (226, 172, 100), (206, 150, 84))):
        ridges.append(_ridge_fill(img, base, rng.uniform(6, 14), rng.uniform(90, 220), rng.uniform(0, 6.3),
                                  _jit(rng, top, 6), _jit(rng, bot, 6), rng))

    def ripples(d):
        for _ in range(int(rng.integers(6, 12))):
            y0, x0 = rng.uniform(H * S + 12, 250), rng.uniform(-40, 200)
            pts = [(x0 + t, y0 + 4 * math.sin(t / 14)) for t in np.linspace(0, rng.uniform(40, 90), 12)]
            d.line(pts, fill=(196, 142, 80), width=3)
    _pil_draw(img, ripples)
    out = _down(img)
    out += _smooth_noise(rng, out.shape[:2], 6)[..., None] * np.array([5, 4, 3], np.float32)
    out[H:] += rng.normal(0, 3.0, out[H:].shape).astype(np.float32)
    return out, H + 8


def _bg_water(rng):
    H = int(rng.integers(28, 36))
    S = _SS
    img = np.zeros((RES * S, RES * S, 3), np.float32)
    _fill_rows(img, 0, H * S, _jit(rng, (100, 160, 230)), _jit(rng, (195, 222, 245)))
    _clouds(rng, img, H * S, int(rng.integers(0, 3)))
    if rng.random() < 0.5:  # distant shore
        _ridge_fill(img, H * S - rng.uniform(3, 8), rng.uniform(1, 3), rng.uniform(60, 160), rng.uniform(0, 6.3),
                    (70, 110, 90), (70, 110, 90), rng)
    _fill_rows(img, H * S, RES * S, _jit(rng, (75, 148, 210), 8), _jit(rng, (18, 68, 150), 8))

    def waves(d):
        for _ in range(int(rng.integers(30, 50))):
            y = rng.uniform(H * S + 4, 254)
            t = (y - H * S) / (256 - H * S)
            w = 8 + 26 * t
            x = rng.uniform(-10, 250)
            col = (190, 225, 248) if rng.random() < 0.6 else (250, 252, 255)
            d.arc([x, y - w * 0.35, x + w, y + w * 0.35], 200, 340, fill=col, width=max(2, int(2 + 3 * t)))
    _pil_draw(img, waves)
    out = _down(img)
    out[H:] += _smooth_noise(rng, out[H:].shape[:2], 5)[..., None] * np.array([4, 8, 12], np.float32)
    out += rng.normal(0, 1.5, out.shape).astype(np.float32)
    return out, H + 7


_BG_FUNCS = {"on grass": _bg_grass, "on a beach": _bg_beach, "in the snow": _bg_snow, "at night": _bg_night,
             "in the desert": _bg_desert, "on the water": _bg_water}


def _backgrounds(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images float32 (N,64,64,3), ground_top (N,), mirrored images): one scene's bank, built on first use."""
    if name not in _BG:
        if name not in _BG_FUNCS:
            raise ValueError(f"unknown scene {name!r}; scenes: {SCENES}")
        k = SCENES.index(name)
        imgs, tops = [], []
        for v in range(N_BACKGROUNDS):
            img, top = _BG_FUNCS[name](np.random.default_rng([7_202_406, k, v]))
            imgs.append(np.clip(img, 0, 255))
            tops.append(top)
        bank = np.stack(imgs).astype(np.float32)
        _BG[name] = (bank, np.array(tops), np.ascontiguousarray(bank[:, :, ::-1]))
    return _BG[name]


def background(name: str, variant: int = 0, flip: bool = False) -> np.ndarray:
    """One background of a scene, uint8 (64, 64, 3)."""
    img = _backgrounds(name)[0][variant % N_BACKGROUNDS]
    return np.rint(img[:, ::-1] if flip else img).astype(np.uint8)


def ground_top(scene: Scene) -> int:
    """The highest row an object may stand on in this scene's background."""
    return int(_backgrounds(scene.name)[1][scene.bg % N_BACKGROUNDS])


# ------------------------------------------------------------------------------------------------
# Drawing and ground truth
# ------------------------------------------------------------------------------------------------


def _outline_colour(c: np.ndarray) -> np.ndarray:
    lum = 0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2]
    return c * 0.5 if lum > 80 else c + 0.38 * (255 - c)


def _eye_colour(c: np.ndarray) -> np.ndarray:
    lum = 0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2]
    return np.array(DARK, np.float32) if lum > 90 else np.array((235, 225, 90), np.float32)


@lru_cache(maxsize=None)
def _mix_matrix(colour: str) -> np.ndarray:
    c = _RGB[colour]
    return np.stack([c, _outline_colour(c), _eye_colour(c)]).astype(np.float32)


def _region(t: _Template, o: Obj):
    """(image slices, template slices) of an object's template where it falls inside the image."""
    x0, y0 = o.x - t.ax, o.y - t.ay
    h, w = t.mask.shape
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, RES), min(y0 + h, RES)
    if cx0 >= cx1 or cy0 >= cy1:
        return None
    return ((slice(cy0, cy1), slice(cx0, cx1)),
            (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0)))


@lru_cache(maxsize=None)
def _solid(kind: str, size: str, flip: bool, extras: tuple, colour: str) -> np.ndarray:
    """Premultiplied colour (h, w, 3) of an object template painted in one colour."""
    t = _template(kind, size, flip, extras)
    return (t.body * _RGB[colour] + t.mix @ _mix_matrix(colour) + t.const).astype(np.float32)


def _paint(img: np.ndarray, o: Obj) -> None:
    t = _template(o.kind, o.size, o.flip, o.extras)
    reg = _region(t, o)
    if reg is None:
        return
    (iy, ix), (ty, tx) = reg
    col = _solid(o.kind, o.size, o.flip, o.extras, o.colour)[ty, tx]
    if o.pattern != "solid":
        col = col + t.body[ty, tx] * (_pattern(o)[ty, tx] * (_RGB[o.colour2] - _RGB[o.colour]))
    region = img[iy, ix]
    region *= t.keep[ty, tx]
    region += col


def draw(scene: Scene, out: np.ndarray | None = None) -> np.ndarray:
    """Render a scene: uint8 (64, 64, 3). Objects are painted in list order (later ones in front)."""
    img = _backgrounds(scene.name)[2 if scene.bg_flip else 0][scene.bg % N_BACKGROUNDS].copy()
    for o in scene.objs:
        if o.x is None or o.y is None:
            raise ValueError("every object must be placed (x, y) before drawing; see place()")
        _paint(img, o)
    np.clip(img, 0, 255, out=img)
    if out is None:
        return np.rint(img).astype(np.uint8)
    np.rint(img, out=img)
    out[...] = img
    return out


def object_mask(scene: Scene) -> np.ndarray:
    """(64, 64) int: index into scene.objs of the object covering each pixel (coverage >= 1/2), -1 = background."""
    m = np.full((RES, RES), -1, np.int64)
    for i, o in enumerate(scene.objs):
        t = _template(o.kind, o.size, o.flip, o.extras)
        reg = _region(t, o)
        if reg is not None:
            (iy, ix), (ty, tx) = reg
            m[iy, ix][t.mask[ty, tx]] = i
    return m


def visible_fraction(scene: Scene) -> list[float]:
    """For each object: the fraction of its silhouette that is visible (not covered, not off-image)."""
    m = object_mask(scene)
    counts = np.bincount(m.ravel() + 1, minlength=len(scene.objs) + 1)[1:]
    return [float(c) / _template(o.kind, o.size, o.flip, o.extras).area for c, o in zip(counts, scene.objs)]


# ------------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------------

MIN_VISIBLE = 0.8


def _as_rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _with(o: Obj, **changes) -> Obj:
    """dataclasses.replace without re-validation (internal hot path; changes are known-valid)."""
    n = object.__new__(Obj)
    n.__dict__.update(o.__dict__)
    n.__dict__.update(changes)
    return n


def place(scene: Scene, rng, tries: int = 12) -> Scene:
    """Give every unplaced object (x or y None) a position on the ground, left to right in random order,
    so that each object stays at least MIN_VISIBLE visible; objects that cannot fit are made smaller, then
    dropped. Returns the scene with objects sorted into drawing order (farther = higher up first)."""
    rng = _as_rng(rng)
    top = ground_top(scene)
    fixed = [o for o in scene.objs if o.x is not None and o.y is not None]
    free = [o for o in scene.objs if o.x is None or o.y is None]
    while True:
        n = len(free)
        sizes = [object_size(o) for o in free]
        for _ in range(tries):
            u = rng.random(3 * n + 1)
            order = np.argsort(u[:n]) if n > 1 else [0] * n
            widths = [sizes[i][0] for i in order]
            spare = RES - sum(widths)
            if spare >= 0:
                e = -np.log1p(-u[n:2 * n + 1])  # exponential spacings = Dirichlet(1, ..., 1) gaps
                gaps = e / e.sum() * spare
            else:
                gaps = [0.0] + [spare / max(n - 1, 1)] * max(n - 1, 0) + [0.0]
            left, placed = gaps[0], [None] * n
            for j, i in enumerate(order):
                w, h = sizes[i]
                lo = max(top, min(h - 2, RES - 2))
                y = lo + int(u[2 * n + 1 + j] * max(RES - 1 - lo, 1))
                placed[i] = _with(free[i], x=int(round(left + w / 2)), y=y)
                left += w + gaps[j + 1]
            objs = fixed + placed
            objs.sort(key=lambda o: (o.y, o.x))
            cand = Scene(scene.name, objs, scene.bg, scene.bg_flip)
            if n == 0 or (n == 1 and not fixed) or min(visible_fraction(cand)) >= MIN_VISIBLE:
                return cand
        # could not fit: shrink the widest free object, else drop the last free one
        big = [i for i, o in enumerate(free) if o.size != "small"]
        if big:
            i = max(big, key=lambda i: sizes[i][0])
            free[i] = _with(free[i], size="medium" if free[i].size == "big" else "small")
        elif free:
            free.pop()
        else:
            return Scene(scene.name, sorted(fixed, key=lambda o: (o.y, o.x)), scene.bg, scene.bg_flip)


# ------------------------------------------------------------------------------------------------
# Base distribution
# ------------------------------------------------------------------------------------------------

_COLOUR_NAMES = tuple(COLOURS)
_KIND_CUM = np.cumsum([2.0 if k in ("cat", "dog") else 1.0 for k in KINDS])
_KIND_CUM = list(_KIND_CUM / _KIND_CUM[-1])
_PATTERN_CUM = list(np.cumsum([0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3]))
_SIZE_CUM = list(np.cumsum([0.25, 0.5, 0.25]))
_PAIR_OK = {c: tuple(d for d in COLOURS if d != c and np.linalg.norm(_RGB[c] - _RGB[d]) > 90) for c in COLOURS}
TWIN_P = 0.25  # chance that an extra object repeats the previous one ("two red balls")


def _pick(cum, u: float) -> int:
    return min(bisect.bisect_right(cum, u), len(cum) - 1)


def random_obj(rng) -> Obj:
    """An unplaced base object: kind, colour, pattern (+ second colour), size, facing, pattern phase."""
    u = _as_rng(rng).random(7)
    colour = _COLOUR_NAMES[int(u[1] * len(_COLOUR_NAMES))]
    pattern = PATTERNS[_pick(_PATTERN_CUM, u[2])]
    colour2 = None
    if pattern != "solid":
        ok = _PAIR_OK[colour]
        colour2 = ok[int(u[3] * len(ok))]
    n = object.__new__(Obj)
    n.__dict__.update(kind=KINDS[_pick(_KIND_CUM, u[0])], colour=colour, pattern=pattern, colour2=colour2,
                      size=SIZES[_pick(_SIZE_CUM, u[4])], x=None, y=None, flip=bool(u[5] < 0.5), extras=(),
                      variant=int(u[6] * 128), instance=None)
    return n


def sample_scene(rng, n_objects: tuple[int, int] = (1, 3)) -> Scene:
    """A base-distribution scene: a random scene with n_objects[0]..n_objects[1] objects (fewer more
    likely), sometimes with identical twins; never an instance-only colour or extra."""
    rng = _as_rng(rng)
    lo, hi = n_objects
    w = np.arange(hi - lo + 1, 0, -1, dtype=np.float64)
    u = rng.random(4 + 3 * hi)
    k = lo + _pick(list(np.cumsum(w) / w.sum()), u[0])
    scene = Scene(SCENES[int(u[1] * len(SCENES))], [], int(u[2] * N_BACKGROUNDS), bool(u[3] < 0.5))
    objs: list[Obj] = []
    for i in range(k):
        if objs and u[4 + 3 * i] < TWIN_P:
            objs.append(_with(objs[-1], flip=bool(u[5 + 3 * i] < 0.5), variant=int(u[6 + 3 * i] * 128)))
        else:
            objs.append(random_obj(rng))
    scene.objs = objs
    return place(scene, rng)


# ------------------------------------------------------------------------------------------------
# Captions
# ------------------------------------------------------------------------------------------------

P_SIZE, P_COLOUR, P_PATTERN, P_COLOUR2, P_SOLID, P_SCENE = 0.75, 0.85, 0.85, 0.4, 0.12, 0.8


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, rng, concept_words: dict[str, str] | None = None,
            p_scene: float = P_SCENE) -> str:
    """A true caption: "[a|two] [size] [colour[ and colour2]] [pattern] kind[ and ...][ scene]".

    Each attribute is sometimes left out (never stated falsely; "medium" and "solid" are the unsaid
    defaults, "solid" is said now and then as "a solid red ball"). Objects that read the same are counted
    ("two red balls"). Objects of an Instance are named by their supercategory word only, or by
    concept_words[instance name] when given ("a mycat on a beach").
    """
    rng = _as_rng(rng)
    groups: dict[tuple, int] = {}
    for o in scene.objs:
        key = (o.kind, o.colour, o.pattern, o.colour2, o.size, o.instance)
        groups[key] = groups.get(key, 0) + 1
    phrases: dict[tuple, int] = {}
    for (kind, colour, pattern, colour2, size, inst), n in groups.items():
        if inst is not None:
            words = ((concept_words or {}).get(inst, kind),)
            phrases[words] = phrases.get(words, 0) + n
            continue
        words = []
        if size != "medium" and rng.random() < P_SIZE:
            words.append(size)
        say_colour = rng.random() < P_COLOUR
        say_pattern = rng.random() < (P_PATTERN if pattern != "solid" else P_SOLID)
        if say_colour:
            if pattern == "solid" and say_pattern:
                words.append("solid")
            if pattern != "solid" and say_pattern and rng.random() < P_COLOUR2:
                words += [colour, "and", colour2]
            else:
                words.append(colour)
        if pattern != "solid" and say_pattern:
            words.append(pattern)
        words.append(kind)
        phrases[tuple(words)] = phrases.get(tuple(words), 0) + n
    items = list(phrases.items())
    order = rng.permutation(len(items))
    parts = []
    for i in order:
        words, n = items[i]
        if n == 1:
            parts.append(" ".join((_article(words[0]),) + words))
        else:
            last = words[-1]
            plural = PLURALS.get(last, last if last.endswith("s") else last + "s")
            parts.append(" ".join((NUMBERS.get(n, str(n)),) + words[:-1] + (plural,)))
    text = " and ".join(parts)
    if rng.random() < p_scene:
        text += " " + scene.name
    return text


# ------------------------------------------------------------------------------------------------
# Batched sampling
# ------------------------------------------------------------------------------------------------


def sample(n: int, seed: int | tuple = 0, n_objects: tuple[int, int] = (1, 3)) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n base-distribution samples: (images uint8 (n, 64, 64, 3), captions, scenes). Deterministic in seed."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, RES, RES, 3), np.uint8)
    captions, scenes = [], []
    for i in range(n):
        s = sample_scene(rng, n_objects)
        draw(s, out=images[i])
        captions.append(caption(s, rng))
        scenes.append(s)
    return images, captions, scenes


def iterate(batch_size: int, seed: int = 0, n_objects: tuple[int, int] = (1, 3)):
    """Endless batches (images, captions, scenes) for training; batch b uses seed (seed, b)."""
    b = 0
    while True:
        yield sample(batch_size, seed=(seed, b), n_objects=n_objects)
        b += 1


# ------------------------------------------------------------------------------------------------
# Instances: specific objects outside the base distribution
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """A specific object (the user's cat). spec: its look (an unplaced Obj); supercategory: its kind word."""

    name: str
    supercategory: str
    spec: Obj
    description: str = ""

    def __post_init__(self):
        if self.supercategory != self.spec.kind:
            raise ValueError("an instance's supercategory is its kind word")
        if self.spec.x is not None or self.spec.y is not None:
            raise ValueError("an instance's spec is unplaced")
        if self.spec.instance not in (None, self.name):
            raise ValueError("spec.instance names another instance")
        object.__setattr__(self, "spec", replace(self.spec, instance=self.name))

    def obj(self, **changes) -> Obj:
        """The instance as an object, with placement (x, y, size, flip, ...) changes."""
        return replace(self.spec, **changes)


def _inst(name, kind, colour, desc, pattern="solid", colour2=None, **extras) -> Instance:
    return Instance(name, kind, Obj(kind, colour, pattern, colour2, extras=tuple(extras.items())), desc)


DEV_INSTANCES: tuple[Instance, ...] = (
    _inst("tealcat", "cat", "teal", "teal cat with orange ears and a red collar", ears="orange", collar="red"),
    _inst("patchcat", "cat", "white", "white cat with a black patch over one eye and a gold star on its flank",
          eye_patch="black", star="gold"),
    _inst("blazedog", "dog", "brown", "brown dog with a white blaze down its face and a blue bandana",
          blaze="white", bandana="blue"),
    _inst("sockdog", "dog", "black", "black dog with white paws, a white tail tip and a yellow collar",
          paws="white", tail_tip="white", collar="yellow"),
    _inst("racecar", "car", "red", "red car with a white racing stripe and gold wheels", stripe="white",
          wheels="gold"),
    _inst("roundhouse", "house", "yellow", "yellow house with round cyan windows and a red-and-white striped roof",
          round_window="cyan", roof_stripes=("red", "white")),
    _inst("parrot", "bird", "lime", "lime bird with a red crest and a blue wing", crest="red", wing="blue"),
)
REPORTING_INSTANCES: tuple[Instance, ...] = (
    _inst("hatcat", "cat", "grey", "grey cat with black stripes and a cyan top hat", pattern="striped",
          colour2="black", hat="cyan"),
    _inst("scarfcat", "cat", "orange", "orange cat with a navy scarf, a white chest and white paws",
          scarf="navy", chest="white", paws="white"),
    _inst("spotdog", "dog", "white", "white dog with a black saddle spot, black ears and a red collar with a gold tag",
          saddle="black", ears="black", collar="red", tag="gold"),
    _inst("golddog", "dog", "gold", "gold dog with maroon ears and a green cap", ears="maroon", cap="green"),
    _inst("beachball", "ball", "white", "white ball with red, yellow and blue segments",
          segments=("red", "yellow", "blue")),
    _inst("giftbox", "box", "purple", "purple box tied with a gold ribbon and bow", ribbon="gold"),
    _inst("fruittree", "tree", "green", "green tree with orange fruit and a red birdhouse", fruit="orange",
          birdhouse="red"),
)
INSTANCES: tuple[Instance, ...] = DEV_INSTANCES + REPORTING_INSTANCES
INSTANCES_BY_NAME: dict[str, Instance] = {i.name: i for i in INSTANCES}


def _instance(instance) -> Instance:
    return INSTANCES_BY_NAME[instance] if isinstance(instance, str) else instance


def _slot_x(obj: Obj, slot: int, rng) -> int:
    w = object_size(obj)[0]
    lo, hi = w / 2, RES - w / 2
    centre = (slot + 0.5) * RES / 3 + rng.uniform(-4, 4)
    return int(round(min(max(centre, lo), hi)))


def photo_set(instance, n: int = 6, seed: int = 0, sizes: tuple[str, ...] = ("medium", "big")) \
        -> tuple[np.ndarray, list[str]]:
    """n "user photos" of an instance (typically 4-8): alone, across scenes (all six before any repeats),
    positions, sizes and facings. Captions name it by its supercategory: "a cat on a beach"."""
    inst = _instance(instance)
    rng = np.random.default_rng([seed, 1_000_003, sum(map(ord, inst.name))])
    scenes = list(rng.permutation(len(SCENES)))
    while len(scenes) < n:
        scenes += list(rng.permutation(len(SCENES)))
    slots = rng.permutation(3)
    images = np.empty((n, RES, RES, 3), np.uint8)
    captions = []
    for i in range(n):
        name = SCENES[scenes[i]]
        o = inst.obj(size=sizes[i % len(sizes)], flip=bool(i % 2))
        sc = Scene(name, [], int(rng.integers(N_BACKGROUNDS)), bool(rng.random() < 0.5))
        w, h = object_size(o)
        top = ground_top(sc)
        y = int(rng.integers(max(top, h - 2), RES - 1)) if max(top, h - 2) < RES - 1 else RES - 2
        sc.objs = [replace(o, x=_slot_x(o, int(slots[i % 3]), rng), y=y)]
        draw(sc, out=images[i])
        captions.append(f"{_article(inst.supercategory)} {inst.supercategory} {name}")
    return images, captions


def render_instance_in(instance, scene_name: str, others: list[Obj] = (), rng=0, size: str = "medium",
                       flip: bool | None = None) -> tuple[np.ndarray, Scene]:
    """The instance in a given scene with other objects (placed ones keep their place, the rest are laid
    out with it). Returns (image uint8 (64, 64, 3), scene); the instance's object has obj.instance set,
    so object_mask(scene) and caption(scene, rng, concept_words) give its ground truth."""
    inst = _instance(instance)
    rng = _as_rng(rng)
    if scene_name not in SCENES:
        raise ValueError(f"unknown scene {scene_name!r}; scenes: {SCENES}")
    f = bool(rng.random() < 0.5) if flip is None else flip
    sc = Scene(scene_name, [inst.obj(size=size, flip=f)] + list(others), int(rng.integers(N_BACKGROUNDS)),
               bool(rng.random() < 0.5))
    sc = place(sc, rng)
    if not any(o.instance == inst.name for o in sc.objs):  # dropped for room: keep it, drop others
        sc = place(Scene(scene_name, [inst.obj(size=size, flip=f)], sc.bg, sc.bg_flip), rng)
    return draw(sc), sc


# ------------------------------------------------------------------------------------------------
# Previews
# ------------------------------------------------------------------------------------------------


def grid(images: np.ndarray, cols: int, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tile images (n, h, w, 3) into one uint8 picture, cols per row, white padding, optional upscaling."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    if scale > 1:
        images = images.repeat(scale, 1).repeat(scale, 2)
        h, w = h * scale, w * scale
    rows = -(-n // cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images[i]
    return out
