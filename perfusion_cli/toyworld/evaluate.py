"""Evaluators for the toy world: "did the personalization work" as numbers.

* `alignment(image, caption)`: how well a 64×64 image matches a caption of the world's grammar, in [0, 1]
  (the toy world's CLIP-T). The caption is parsed into clauses (the scene, and for each object phrase
  its kind, colour(s), pattern, size and count, plus "nothing else is there"); each clause gets a soft
  truth value from the image and the score is their mean. `alignment_details` gives every clause.
* `fidelity(image, instance)`: how close the instance-like object in an image is to the instance's
  reference photos (default `photo_set(instance)`), in [0, 1] (the toy world's CLIP-I): the mean of
  the agreement of the object kinds, the similarity of colour histograms of the objects' pixels over
  the world's palette, of the layout of those colours in the objects' normalised bounding boxes (either
  facing), and the presence of the references' minor "signature" colours (the instance's extras).
* `recognition(image, instance)`: is the instance recognised, i.e. is the object that best matches it matched to
  it better than to every other instance (instance-retrieval top-1, per object: works with several instances).
* `validate(...)`: retrieval accuracies against ground truth on held-out renders, clean and degraded.

How an image is read (`perceive`)
---------------------------------
Two tiny networks and analytic steps (weights in `registry/evaluators/toyworld-perceiver.safetensors`,
368 KiB, fp16; reproduced bit for bit by `registry/evaluators/train_toyworld_perceiver.py`, i.e.
`train_perceiver()`, in about 3.5 minutes on two CPU cores, same torch version and thread count):

1. A dense network (stride-2 stem + dilated 3×3 convolutions, 52k parameters) maps the 64×64 image to
   32×32 maps: object vs background, "body colour shows here", and for every object pixel the offset to
   its object's centre; plus the scene (6 classes). Object pixels vote for their centres (Hough-style);
   peaks of the smoothed vote map are objects and each pixel joins the peak it votes for, so touching
   or overlapping objects (twins included) come apart.
2. A crop network (131k parameters) reads each object from a crop around it (RGB + its mask, scaled to
   40×40), a 24×24 window at native resolution and its box size: kind (9), solid vs patterned, size.
3. Analytic: which pattern (striped / spotted / checked) from the autocorrelation of the body's
   main colour contrast along axes and diagonals (a linear classifier on 22 texture features);
   colours by matching body pixels to the palette (11 base + 6 reserved colours) in CIE Lab, and for
   patterned objects by fitting the pixels as mixtures of two palette colours (blur mixes a pattern's
   colours along the RGB segment between them).

Both networks are trained on world renders augmented with blur, down/up sampling, small warps, noise and
colour jitter (the flaws of a small diffusion model's samples), on base scenes and on instance-like
objects (reserved colours, random extras: never the actual INSTANCES), on background variants
TRAIN_BACKGROUNDS of each scene; validation uses HELD_OUT_BACKGROUNDS and other seeds.

Everything here is a pure function of its inputs (nothing is printed or written, except the one-time
cache of freshly trained weights when the bundled file is missing).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import world as W
from .world import (
    ALL_COLOURS, COLOURS, EXTRAS, INSTANCES, KINDS, NUMBERS, PATTERNS, PLURALS, RES, SCENES, SIZES, Instance,
    Obj, Scene, caption as world_caption, draw, object_mask, photo_set, place, render_instance_in, sample_scene,
)

__all__ = [
    "alignment", "alignment_details", "fidelity", "fidelity_details", "recognition", "validate", "perceive",
    "perceive_batch",
    "parse_caption", "Phrase", "Claim", "claim_is_true", "distractors", "validation_scenes", "instance_renders",
    "degrade", "describe", "colour_share", "colour_presence", "texture_features", "train_perceiver",
    "save_weights", "WEIGHTS_FILE", "TRAIN_BACKGROUNDS", "HELD_OUT_BACKGROUNDS", "CHANGES", "PALETTE",
]

# ------------------------------------------------------------------------------------------------
# Vocabulary and palette
# ------------------------------------------------------------------------------------------------

PALETTE: tuple[str, ...] = tuple(ALL_COLOURS)  # 11 base colours, then the 6 reserved instance colours
N_PAL = len(PALETTE)
N_KIND = len(KINDS)
TRAIN_BACKGROUNDS = range(0, 36)  # background variants the perceiver is trained on
HELD_OUT_BACKGROUNDS = range(36, W.N_BACKGROUNDS)  # ... and the ones validation uses
WEIGHTS_NAME = "toyworld-perceiver.safetensors"


_LINEAR = np.where(np.arange(256) / 255.0 > 0.04045, ((np.arange(256) / 255.0 + 0.055) / 1.055) ** 2.4,
                   np.arange(256) / 255.0 / 12.92).astype(np.float32)


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIE Lab (D65) of sRGB values in 0..255, any leading shape."""
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        c = _LINEAR[rgb]
    else:
        c = np.asarray(rgb, np.float32) / 255.0
        c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]], np.float32)
    xyz = (c @ m.T) / np.array([0.9505, 1.0, 1.089], np.float32)
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_PAL_LAB = _srgb_to_lab(np.array([ALL_COLOURS[c] for c in PALETTE], np.float32))
TAU = 11.0      # Lab distance scale of the soft palette assignment
D_OTHER = 24.0  # a pixel farther than about this from every palette colour counts as "other"


def palette_weights(image: np.ndarray) -> np.ndarray:
    """Soft assignment of every pixel to the palette: (..., N_PAL + 1), the last column is "other"."""
    lab = _srgb_to_lab(image)
    d2 = ((lab[..., None, :] - _PAL_LAB) ** 2).sum(-1)
    logits = np.concatenate([-d2, np.full(d2.shape[:-1] + (1,), -D_OTHER ** 2, np.float32)], -1) / (2 * TAU ** 2)
    logits -= logits.max(-1, keepdims=True)
    w = np.exp(logits)
    return (w / w.sum(-1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# The perceiver: a dense network (where are objects) and a crop network (what is each one)
# ------------------------------------------------------------------------------------------------

M_FG, M_BODY, M_OFF = 0, 1, slice(2, 4)  # channels of the dense 32×32 maps: object, body, offset to centre
OFF_SCALE = 16.0  # offsets are predicted in units of 16 pixels
DENSE_WIDTH = 32
DILATIONS = (1, 2, 4, 8, 1)
CROP = 40                       # crops are CROP×CROP, about the object's own resolution
CROP_WIDTHS = (32, 48, 64, 96)
WINDOW = 24                     # ... plus a WINDOW×WINDOW window at native resolution (texture: pattern)
N_CROP_OUT = N_KIND + len(PATTERNS) + len(SIZES)


def _cbr(i: int, o: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(o), nn.ReLU(inplace=True))


class DenseNet(nn.Module):
    """64×64 RGB (+ a row-coordinate channel) -> 32×32 maps (object, body colour, offset from the pixel
    to the centre of its object) and scene logits: a stride-2 stem and dilated 3×3 convolutions that see
    about the whole image."""

    def __init__(self, width: int = DENSE_WIDTH, dilations: tuple[int, ...] = DILATIONS):
        super().__init__()
        self.stem = _cbr(4, width, 2)
        self.body = nn.Sequential(*[_cbr(width, width, dilation=d) for d in dilations])
        self.head = nn.Conv2d(width, 4, 1)
        self.scene = nn.Linear(width + 6, len(SCENES))
        self.register_buffer("rows", torch.linspace(-1, 1, RES).view(1, 1, RES, 1).expand(1, 1, RES, RES).clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: float (B, 3, 64, 64) in 0..1."""
        top, bottom = x[:, :, : RES // 3].mean((2, 3)), x[:, :, -RES // 4:].mean((2, 3))
        f = self.body(self.stem(torch.cat([x - 0.5, self.rows.expand(x.shape[0], -1, -1, -1)], 1)))
        return self.head(f), self.scene(torch.cat([f.mean((2, 3)), top - 0.5, bottom - 0.5], 1))


class CropNet(nn.Module):
    """One object -> kind, pattern and size logits, from a crop around it scaled to CROP×CROP (RGB + the
    object's mask), a WINDOW×WINDOW window of its middle at native resolution (RGB + mask: the texture
    of a pattern survives there) and its box size (height, width, crop side, over 64)."""

    def __init__(self, widths: tuple[int, int, int, int] = CROP_WIDTHS):
        super().__init__()
        a, b, c, d = widths
        self.features = nn.Sequential(_cbr(4, a), nn.MaxPool2d(2), _cbr(a, b), nn.MaxPool2d(2), _cbr(b, c),
                                      nn.MaxPool2d(2), _cbr(c, d))
        self.texture = nn.Sequential(_cbr(4, 24), _cbr(24, 32, 2), _cbr(32, 48))
        self.fc = nn.Sequential(nn.Linear(d + 48 + 3, 64), nn.ReLU(inplace=True), nn.Linear(64, N_CROP_OUT))

    def forward(self, crops: torch.Tensor, windows: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        f = self.features(torch.cat([crops[:, :3] - 0.5, crops[:, 3:]], 1)).mean((2, 3))
        t = self.texture(torch.cat([windows[:, :3] - 0.5, windows[:, 3:]], 1))
        m = F.avg_pool2d(windows[:, 3:], 2)
        t = (t * m).sum((2, 3)) / m.sum((2, 3)).clamp_min(1e-3)  # texture features of the object's pixels
        return self.fc(torch.cat([f, t, box], 1))


def _crops(images: torch.Tensor, masks: torch.Tensor, boxes: torch.Tensor,
           g: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CropNet's inputs for objects in images (B, 3, 64, 64) with masks (B, 1, 64, 64) and boxes (B, 4) =
    (r0, c0, r1, c1): square crops (B, 4, CROP, CROP) around the boxes with a 15% margin (jittered in
    scale and place when g is given, zeros outside the image), native-resolution windows (B, 4, WINDOW,
    WINDOW) at the masks' centroids (jittered by whole pixels), and the box features (B, 3)."""
    b = boxes.float()
    B = b.shape[0]
    cy, cx = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    h, w = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    side = torch.maximum(h, w) * 1.15 + 2
    if g is not None:
        side = side * (1 + 0.12 * (torch.rand(B, generator=g) * 2 - 1))
        cy = cy + side * 0.05 * (torch.rand(B, generator=g) * 2 - 1)
        cx = cx + side * 0.05 * (torch.rand(B, generator=g) * 2 - 1)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = side / RES
    theta[:, 0, 2], theta[:, 1, 2] = cx / (RES / 2) - 1, cy / (RES / 2) - 1
    grid = F.affine_grid(theta, [B, 4, CROP, CROP], align_corners=False)
    both = torch.cat([images, masks], 1)
    crops = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # windows: whole-pixel offsets, so that sampling reads pixels exactly
    m = masks[:, 0]
    tot = m.sum((1, 2)).clamp_min(1e-3)
    ys = torch.arange(RES, dtype=torch.float32)
    wy = ((m.sum(2) * ys).sum(1) / tot).round()
    wx = ((m.sum(1) * ys).sum(1) / tot).round()
    if g is not None:
        wy = wy + torch.randint(-3, 4, (B,), generator=g)
        wx = wx + torch.randint(-3, 4, (B,), generator=g)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = WINDOW / RES
    theta[:, 0, 2], theta[:, 1, 2] = wx / (RES / 2) - 1, wy / (RES / 2) - 1
    grid = F.affine_grid(theta, [B, 4, WINDOW, WINDOW], align_corners=False)
    windows = F.grid_sample(both, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return crops, windows, torch.stack([h / RES, w / RES, side / RES], 1)


# ------------------------------------------------------------------------------------------------
# Degradations: what a small diffusion model's samples get wrong (blur, noise, colour cast, wobble)
# ------------------------------------------------------------------------------------------------


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample separable Gaussian blur; sigma (B,) in pixels (0 = none)."""
    B, C, H, Wd = x.shape
    r = 3
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    s = sigma.clamp_min(1e-3).view(B, 1)
    k = torch.exp(-t.view(1, -1) ** 2 / (2 * s ** 2))
    k = k / k.sum(1, keepdim=True)  # (B, 7); sigma ~0 gives a delta
    k = k.repeat_interleave(C, 0)
    y = x.reshape(1, B * C, H, Wd)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(B * C, 1, 1, -1), groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(B * C, 1, -1, 1), groups=B * C)
    return y.view(B, C, H, Wd)


def _warp(x: torch.Tensor, amp: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Smooth random displacement of up to about amp (B,) pixels."""
    B = x.shape[0]
    d = torch.rand(B, 2, 5, 5, generator=g) * 2 - 1
    d = F.interpolate(d, size=(RES, RES), mode="bicubic", align_corners=True)
    d = d * (amp.view(B, 1, 1, 1) * 2 / RES)
    lin = (torch.arange(RES, dtype=x.dtype) + 0.5) * 2 / RES - 1
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    grid = torch.stack([gx, gy], -1).unsqueeze(0) + d.permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _degrade_batch(x: torch.Tensor, g: torch.Generator, sigma, noise, gain, offset, sat, warp, downup) -> torch.Tensor:
    """x float (B,3,64,64) in 0..1; per-sample parameters as tensors: sigma (B,) px, noise (B,) std in 0..1
    units, gain (B,3), offset (B,3) in 0..1 units, sat (B,), warp (B,) px, downup (B,) bool."""
    B = x.shape[0]
    grey = x.mean(1, keepdim=True)
    x = grey + (x - grey) * sat.view(B, 1, 1, 1)
    x = x * gain.view(B, 3, 1, 1) + offset.view(B, 3, 1, 1)
    if bool(downup.any()):
        small = F.interpolate(x[downup], scale_factor=0.5, mode="bilinear", antialias=True)
        x = x.clone()
        x[downup] = F.interpolate(small, size=(RES, RES), mode="bilinear", align_corners=False)
    if bool((warp > 0).any()):
        x = _warp(x, warp, g)
    x = _blur(x, sigma)
    x = x + torch.randn(x.shape, generator=g) * noise.view(B, 1, 1, 1)
    return x.clamp(0, 1)


def degrade(image: np.ndarray, seed: int | tuple = 0, strength: float = 1.0) -> np.ndarray:
    """A world render made to look like a small diffusion model's sample: colour cast (per-channel gain
    about ±4%, offset about ±8 levels, saturation ±10%), a smooth wobble of about 0.8 px, Gaussian blur
    (sigma 0.8 px), noise (std 5 levels); every amount times strength. image: uint8 (64, 64, 3) or a batch
    (n, 64, 64, 3); deterministic in seed. The perceiver's training augmentations span about twice these
    amounts, so strength 1 is inside what it has seen, strength 2 at its edge."""
    img = np.asarray(image)
    batch = img.ndim == 4
    x = torch.from_numpy(np.ascontiguousarray(img.reshape(-1, RES, RES, 3))).permute(0, 3, 1, 2).float() / 255
    B = x.shape[0]
    g = torch.Generator().manual_seed(int(hashlib.sha256(repr(seed).encode()).hexdigest()[:12], 16))
    s = float(strength)
    u = lambda *shape: torch.rand(*shape, generator=g) * 2 - 1  # noqa: E731
    out = _degrade_batch(
        x, g, sigma=torch.full((B,), 0.8 * s), noise=torch.full((B,), 5 / 255 * s),
        gain=1 + 0.04 * s * u(B, 3), offset=(8 / 255 * s) * u(B, 3), sat=1 + 0.1 * s * u(B),
        warp=torch.full((B,), 0.8 * s), downup=torch.zeros(B, dtype=torch.bool))
    out = (out.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return out if batch else out[0]


_degrade = degrade  # validate() has a parameter of that name


def _augment(x: torch.Tensor, g: torch.Generator, p_clean: float = 0.2) -> torch.Tensor:
    """Training augmentation: the degrade() family with amounts up to about twice strength 1."""
    B = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    y = _degrade_batch(
        x, g, sigma=u(B) * 1.3, noise=u(B) * (12 / 255), gain=1 + 0.09 * (2 * u(B, 3) - 1),
        offset=(2 * u(B, 1) - 1) * (10 / 255) + (2 * u(B, 3) - 1) * (8 / 255), sat=1 + 0.22 * (2 * u(B) - 1),
        warp=u(B) * 1.4, downup=u(B) < 0.25)
    keep = (u(B) < p_clean).view(B, 1, 1, 1)
    return torch.where(keep, x, y)


# ------------------------------------------------------------------------------------------------
# Pattern texture: analytic features of an object's body pixels
# ------------------------------------------------------------------------------------------------

TEXTURE_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1), (0, 2), (2, 0), (2, 2), (2, -2),
                  (0, 3), (3, 0), (3, 3), (3, -3), (0, 4), (4, 0), (4, 4), (4, -4))


def texture_features(image: np.ndarray, body_weights: np.ndarray) -> np.ndarray | None:
    """Features telling stripes, dots and checks apart, from an object's body pixels (body_weights > 0.5):
    the pixels' colours are projected on their main axis of variation (a pattern's two colours) and
    standardised; then the autocorrelation of that signal at TEXTURE_SHIFTS (stripes are diagonal:
    correlated along one diagonal only; checks are axis-aligned squares: anti-correlated along the axes,
    correlated along both diagonals), the diagonal asymmetry, the skewness (dots cover about a third)
    and the contrast. None if fewer than 20 body pixels."""
    V = body_weights > 0.5
    if V.sum() < 20:
        return None
    px = image[V].astype(np.float32)
    mu = px.mean(0)
    _, vec = np.linalg.eigh(np.cov((px - mu).T) + 1e-3 * np.eye(3))
    tv = (px - mu) @ vec[:, -1]
    sd = float(tv.std()) + 1e-3
    t = np.zeros(V.shape, np.float32)
    t[V] = tv / sd
    f = []
    for dy, dx in TEXTURE_SHIFTS:
        a = (slice(max(0, -dy), RES - max(0, dy)), slice(max(0, -dx), RES - max(0, dx)))
        b = (slice(max(0, dy), RES + min(0, dy) or None), slice(max(0, dx), RES + min(0, dx) or None))
        m = V[a] & V[b]
        f.append(float((t[a][m] * t[b][m]).mean()) if m.sum() > 5 else 0.0)
    f = np.array(f, np.float32)
    asym = np.abs(f[2::4] - f[3::4])
    skew = abs(float(((tv / sd) ** 3).mean()))
    return np.concatenate([f, asym, [skew, math.log(sd + 1)]]).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Training data: world renders with per-pixel and per-object ground truth
# ------------------------------------------------------------------------------------------------

_N_EXTRA_CONFIGS = 48  # instance-like objects draw from this many random (kind, extras) designs


def _random_colour(rng, exclude=()) -> str:
    names = [c for c in PALETTE if c not in exclude]
    return names[int(rng.integers(len(names)))]


@lru_cache(maxsize=1)
def _extra_designs() -> tuple[tuple[str, tuple], ...]:
    """Random (kind, extras) designs for instance-like training objects (fixed, so templates stay cached)."""
    rng = np.random.default_rng([20_250_611, 1])
    out = []
    for i in range(_N_EXTRA_CONFIGS):
        kind = KINDS[i % N_KIND]
        feats = [f for f in EXTRAS[kind] if rng.random() < 0.5] or [EXTRAS[kind][int(rng.integers(len(EXTRAS[kind])))]]
        extras = []
        for feat in feats:
            n = 3 if feat == "segments" else 2 if feat == "roof_stripes" else 1
            cols = tuple(_random_colour(rng) for _ in range(n))
            extras.append((feat, cols if n > 1 else cols[0]))
        out.append((kind, tuple(extras)))
    return tuple(out)


def _instance_like(rng) -> Obj:
    kind, extras = _extra_designs()[int(rng.integers(_N_EXTRA_CONFIGS))]
    colour = _random_colour(rng)
    pattern, colour2 = "solid", None
    if rng.random() < 0.25:
        pattern = PATTERNS[1 + int(rng.integers(3))]
        colour2 = _random_colour(rng, exclude=(colour,))
    return Obj(kind, colour, pattern, colour2, size=SIZES[int(rng.integers(3))], flip=bool(rng.random() < 0.5),
               extras=extras, variant=int(rng.integers(128)))


def _rebackground(scene: Scene, rng, backgrounds) -> Scene:
    """The same scene content laid out again on a background variant from `backgrounds`."""
    bg = int(backgrounds[int(rng.integers(len(backgrounds)))])
    objs = [W._with(o, x=None, y=None) for o in scene.objs]
    return place(Scene(scene.name, objs, bg, scene.bg_flip), rng)


def _train_scene(rng) -> Scene:
    """Training scenes: 70% base distribution (1-4 objects), 30% with instance-like objects (reserved
    colours, random extras); always on a TRAIN_BACKGROUNDS variant."""
    if rng.random() < 0.7:
        sc = sample_scene(rng, (1, 4))
    else:
        sc = Scene(SCENES[int(rng.integers(len(SCENES)))], [], 0, bool(rng.random() < 0.5))
        k = 1 + int(rng.integers(3))
        sc.objs = [_instance_like(rng) if rng.random() < 0.7 else W.random_obj(rng) for _ in range(k)]
    return _rebackground(sc, rng, TRAIN_BACKGROUNDS)


def _scene_maps(scene: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(object index map (64,64) int, body map (64,64) bool, visible centres (n, 2) as (row, col))."""
    idx = object_mask(scene)
    body = np.zeros((RES, RES), bool)
    for o in scene.objs:
        t = W._template(o.kind, o.size, o.flip, o.extras)
        reg = W._region(t, o)
        if reg is None:
            continue
        (iy, ix), (ty, tx) = reg
        m = t.mask[ty, tx]
        sub = body[iy, ix]
        sub[m] = (t.body[ty, tx, 0] >= 0.9)[m]
    centres = np.full((len(scene.objs), 2), np.nan, np.float32)
    for i in range(len(scene.objs)):
        ys, xs = np.nonzero(idx == i)
        if len(ys):
            centres[i] = ys.mean(), xs.mean()
    return idx, body, centres


def _offset_target(idx: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(2, 32, 32): mean (row, col) offset, in pixels, from the object pixels of each 2×2 block to their
    objects' centres (0 where there is no object)."""
    h = RES // 2
    m = idx >= 0
    c = np.nan_to_num(centres)[np.maximum(idx, 0)] if len(centres) else np.zeros((RES, RES, 2), np.float32)
    n = np.maximum(m.reshape(h, 2, h, 2).sum((1, 3)), 1)
    oy = np.where(m, c[..., 0] - _YY, 0).reshape(h, 2, h, 2).sum((1, 3)) / n
    ox = np.where(m, c[..., 1] - _XX, 0).reshape(h, 2, h, 2).sum((1, 3)) / n
    return np.stack([oy, ox]).astype(np.float32)


def _make_dataset(n: int, seed: int) -> dict[str, np.ndarray]:
    """n training renders: images, object index maps, 32×32 targets (object and body pixel counts per
    2×2 block, offsets to object centres), scene labels, and one row per visible object (image, box, kind, pattern,
    size, object index)."""
    rng = np.random.default_rng([seed, 77])
    h = RES // 2
    images = np.empty((n, RES, RES, 3), np.uint8)
    index = np.empty((n, RES, RES), np.int8)
    fg = np.empty((n, h, h), np.uint8)
    body = np.empty((n, h, h), np.uint8)
    offset = np.empty((n, 2, h, h), np.float32)
    scene = np.empty(n, np.int64)
    objects = []
    for i in range(n):
        sc = _train_scene(rng)
        draw(sc, out=images[i])
        idx, b, centres = _scene_maps(sc)
        index[i] = idx
        fg[i] = (idx >= 0).reshape(h, 2, h, 2).sum((1, 3))
        body[i] = b.reshape(h, 2, h, 2).sum((1, 3))
        offset[i] = _offset_target(idx, centres)
        scene[i] = SCENES.index(sc.name)
        for j, o in enumerate(sc.objs):
            ys, xs = np.nonzero(idx == j)
            if len(ys) >= 12:
                objects.append([i, ys.min(), xs.min(), ys.max() + 1, xs.max() + 1, KINDS.index(o.kind),
                                PATTERNS.index(o.pattern), SIZES.index(o.size), j])
    return dict(images=images, index=index, fg=fg, body=body, offset=offset, scene=scene,
                objects=np.array(objects, np.int64))


def _rough_masks(m: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Exact object masks (B, 1, 64, 64) made as rough as predicted ones: grown, shrunk or blurred."""
    B = m.shape[0]
    u = torch.rand(B, generator=g).view(B, 1, 1, 1)
    grown = F.max_pool2d(m, 3, 1, 1)
    shrunk = -F.max_pool2d(-m, 3, 1, 1)
    soft = F.avg_pool2d(m, 3, 1, 1)
    return torch.where(u < 0.25, grown, torch.where(u < 0.45, shrunk, torch.where(u < 0.7, soft, m)))


def _predicted_crops(dense: DenseNet, images: torch.Tensor, T: dict, g: torch.Generator):
    """Segment augmented copies of training images (uint8 (n, 3, 64, 64)) with the dense network and label
    each segment with the training object it overlaps most (segments overlapping none are skipped).
    Returns (augmented images uint8, segment weights fp16 (m, 64, 64), rows (m, 8): image, box, kind,
    pattern, size)."""
    xs, ws, rows, tex = [], [], [], []
    lut = {(int(r[0]), int(r[8])): r for r in T["objects"]}
    for s in range(0, len(images), 64):
        x = _augment(images[s:s + 64].float() / 255, g)
        x = (x * 255).round() / 255
        d = _dense_pass(dense, x)
        xs.append((x * 255).round().to(torch.uint8))
        xu = xs[-1].permute(0, 2, 3, 1).numpy()
        for i in range(len(x)):
            idx = T["index"][s + i].numpy()
            for w, box, _, _ in _segment(d["fg"][i], d["vy"][i], d["vx"][i], d["votes"][i], d["peaks"][i]):
                cover = np.bincount(idx[w > 0.5].astype(np.int64) + 1, minlength=1)
                j = int(np.argmax(cover[1:])) if len(cover) > 1 and cover[1:].max() >= 0.3 * cover.sum() else -1
                r = lut.get((s + i, j))
                if r is None:
                    continue
                ws.append(torch.from_numpy(w).half())
                rows.append([s + i, *box, int(r[5]), int(r[6]), int(r[7])])
                if int(r[6]) > 0:  # patterned: texture features for the pattern classifier
                    f = texture_features(xu[i], w * d["body"][i])
                    if f is not None:
                        tex.append((f, int(r[6]) - 1))
    return torch.cat(xs), torch.stack(ws), torch.tensor(rows, dtype=torch.int64), tex


def _fit_pattern(tex: list[tuple[np.ndarray, int]]) -> dict[str, torch.Tensor]:
    """Multinomial logistic regression (L-BFGS) from texture features to striped / spotted / checked."""
    X = torch.tensor(np.stack([f for f, _ in tex]))
    y = torch.tensor([c for _, c in tex])
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Xn = (X - mu) / sd
    lin = nn.Linear(X.shape[1], len(PATTERNS) - 1)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(Xn), y) + 1e-3 * lin.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return {"weight": lin.weight.detach().clone(), "bias": lin.bias.detach().clone(), "mu": mu, "sd": sd}


def train_perceiver(dense_steps: int = 3200, crop_steps: int = 2000, batch: int = 32, crop_batch: int = 64,
                    n_train: int = 10000, n_pred: int = 2000, seed: int = 0,
                    lr: float = 1e-2) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Train both perceiver networks from scratch on CPU; deterministic in seed (same torch version and
    thread count). Returns (state dict with "dense." and "crop." keys, metadata)."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    data = _make_dataset(n_train, seed)
    t_data = time.perf_counter() - t0
    T = {k: torch.from_numpy(v) for k, v in data.items()}
    images = T["images"].permute(0, 3, 1, 2)

    dense = DenseNet()
    opt = torch.optim.AdamW(dense.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=dense_steps, pct_start=0.1)
    dense.train()
    for _ in range(dense_steps):
        ix = torch.randint(0, n_train, (batch,), generator=g)
        x = images[ix].float() / 255
        t_fg, t_body, t_off = T["fg"][ix].float() / 4, T["body"][ix].float() / 4, T["offset"][ix] / OFF_SCALE
        flip = (torch.rand(batch, generator=g) < 0.5).view(batch, 1, 1)
        x = torch.where(flip.unsqueeze(1), x.flip(-1), x)
        t_fg, t_body = (torch.where(flip, t.flip(-1), t) for t in (t_fg, t_body))
        t_off = torch.where(flip.unsqueeze(1), t_off.flip(-1) * torch.tensor([1.0, -1.0]).view(1, 2, 1, 1), t_off)
        maps, scene_logits = dense(_augment(x, g))
        off_err = F.smooth_l1_loss(maps[:, M_OFF], t_off, reduction="none", beta=0.1).sum(1)
        loss_dense = (F.binary_cross_entropy_with_logits(maps[:, M_FG], t_fg)
                      + F.binary_cross_entropy_with_logits(maps[:, M_BODY], t_body)
                      + (off_err * t_fg).sum() / t_fg.sum().clamp_min(1)
                      + 0.5 * F.cross_entropy(scene_logits, T["scene"][ix]))
        opt.zero_grad(set_to_none=True)
        loss_dense.backward()
        opt.step()
        sched.step()
    dense.eval()
    t_dense = time.perf_counter() - t0

    # the crop network learns from exact object masks and from the dense network's own segmentations
    # (of augmented training images), as it will meet the latter
    pred_x, pred_w, pred_rows, tex = _predicted_crops(dense, images[:n_pred], T, g)
    pattern = _fit_pattern(tex)
    crop = CropNet()
    objs = T["objects"]
    opt = torch.optim.AdamW(crop.parameters(), lr=lr / 2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr / 2, total_steps=crop_steps, pct_start=0.1)
    crop.train()
    for _ in range(crop_steps):
        half = crop_batch // 2
        r = objs[torch.randint(0, len(objs), (half,), generator=g)]
        uniq, inv = torch.unique(r[:, 0], return_inverse=True)  # augment each image once
        x = _augment(images[uniq].float() / 255, g)[inv]
        m = (T["index"][r[:, 0]] == r[:, 8].view(-1, 1, 1).to(torch.int8)).float().unsqueeze(1)
        c1, v1, box1 = _crops(x, _rough_masks(m, g), r[:, 1:5], g)
        q = torch.randint(0, len(pred_rows), (crop_batch - half,), generator=g)
        c2, v2, box2 = _crops(pred_x[pred_rows[q, 0]].float() / 255, pred_w[q].float().unsqueeze(1),
                              pred_rows[q, 1:5], g)
        c, v, box = torch.cat([c1, c2]), torch.cat([v1, v2]), torch.cat([box1, box2])
        r = torch.cat([r[:, :8], pred_rows[q, :8]])
        flip = (torch.rand(len(r), generator=g) < 0.5).view(-1, 1, 1, 1)
        c, v = torch.where(flip, c.flip(-1), c), torch.where(flip, v.flip(-1), v)
        out = crop(c, v, box)
        loss_crop = (F.cross_entropy(out[:, :N_KIND], r[:, 5])
                     + F.cross_entropy(out[:, N_KIND:N_KIND + len(PATTERNS)], r[:, 6])
                     + 0.5 * F.cross_entropy(out[:, N_KIND + len(PATTERNS):], r[:, 7]))
        opt.zero_grad(set_to_none=True)
        loss_crop.backward()
        opt.step()
        sched.step()
    crop.eval()
    state = {f"dense.{k}": v.detach().clone() for k, v in dense.state_dict().items()}
    state |= {f"crop.{k}": v.detach().clone() for k, v in crop.state_dict().items()}
    state |= {f"pattern.{k}": v for k, v in pattern.items()}
    meta = {
        "format": "perfusion toyworld perceiver v3", "pattern_examples": str(len(tex)),
        "dense_steps": str(dense_steps), "crop_steps": str(crop_steps),
        "batch": str(batch), "crop_batch": str(crop_batch), "n_train": str(n_train), "n_pred": str(n_pred),
        "seed": str(seed),
        "lr": str(lr), "train_backgrounds": f"{TRAIN_BACKGROUNDS.start}-{TRAIN_BACKGROUNDS.stop - 1}",
        "final_loss_dense": f"{float(loss_dense.detach()):.4f}", "final_loss_crop": f"{float(loss_crop.detach()):.4f}",
        "data_seconds": f"{t_data:.1f}", "dense_seconds": f"{t_dense - t_data:.1f}",
        "train_seconds": f"{time.perf_counter() - t0:.1f}", "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
    }
    return state, meta


# ------------------------------------------------------------------------------------------------
# Loading the weights: bundled file, else a cached fresh training
# ------------------------------------------------------------------------------------------------


def _bundled_weights() -> Path:
    from ..registry import bundled_dir
    return bundled_dir() / "evaluators" / WEIGHTS_NAME


WEIGHTS_FILE = _bundled_weights()


def save_weights(state: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> Path:
    """Write the perceiver's weights (fp16 floats) as safetensors with the training metadata."""
    from safetensors.torch import save_file
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def _cache_weights() -> Path:
    import platformdirs
    return Path(platformdirs.user_cache_dir("perfusion", appauthor=False)) / "evaluators" / WEIGHTS_NAME


@lru_cache(maxsize=1)
def _model() -> tuple[DenseNet, CropNet, dict[str, np.ndarray]]:
    from safetensors.torch import load_file
    path = WEIGHTS_FILE if WEIGHTS_FILE.is_file() else _cache_weights()
    if path.is_file():
        state = load_file(str(path))
    else:  # no bundled weights (a stripped install): train once, deterministically, and cache
        state, meta = train_perceiver()
        save_weights(state, meta, path)
    nets = DenseNet(), CropNet()
    for prefix, net in zip(("dense.", "crop."), nets):
        net.load_state_dict({k[len(prefix):]: v.float() if v.is_floating_point() else v
                             for k, v in state.items() if k.startswith(prefix)})
        net.eval()
    pattern = {k[len("pattern."):]: v.float().numpy() for k, v in state.items() if k.startswith("pattern.")}
    return nets[0], nets[1], pattern


# ------------------------------------------------------------------------------------------------
# Perception: image -> scene probabilities and objects
# ------------------------------------------------------------------------------------------------


@dataclass
class PerceivedObject:
    """One object found in an image. kind/pattern/size/colours are probability vectors over KINDS,
    PATTERNS, SIZES and PALETTE (+ "other" last, for colours: the body colour distribution);
    existence in [0, 1]; weights (64, 64): how much each pixel belongs to it; box (r0, c0, r1, c1)."""

    existence: float
    centre: tuple[float, float]
    area: float
    weights: np.ndarray = field(repr=False)
    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    colours: np.ndarray = field(default_factory=lambda: np.zeros(N_PAL + 1, np.float32))
    kind: np.ndarray = field(default_factory=lambda: np.full(N_KIND, 1 / N_KIND, np.float32))
    pattern: np.ndarray = field(default_factory=lambda: np.full(len(PATTERNS), 1 / len(PATTERNS), np.float32))
    size: np.ndarray = field(default_factory=lambda: np.full(len(SIZES), 1 / len(SIZES), np.float32))
    fit_one: np.ndarray = field(default=None, repr=False)  # (N_PAL,) colour-model error: one colour (diagnostic)
    fit_two: np.ndarray = field(default=None, repr=False)  # (N_PAL, N_PAL) ... two colours mixed

    def summary(self) -> dict:
        top = np.argsort(self.colours[:N_PAL])[::-1][:2]
        return {
            "kind": KINDS[int(np.argmax(self.kind))], "kind_p": round(float(self.kind.max()), 3),
            "colours": {PALETTE[i]: round(float(self.colours[i]), 3) for i in top},
            "pattern": PATTERNS[int(np.argmax(self.pattern))], "size": SIZES[int(np.argmax(self.size))],
            "existence": round(self.existence, 3), "centre": tuple(round(v, 1) for v in self.centre),
            "area": round(self.area, 1), "box": self.box,
        }


@dataclass
class Percept:
    """What the evaluators read from one image."""

    scene: np.ndarray                 # (len(SCENES),) probabilities
    objects: list[PerceivedObject]
    palette: np.ndarray = field(repr=False)  # (64, 64, N_PAL + 1) soft palette assignment of every pixel
    fg: np.ndarray = field(repr=False)       # (64, 64) object probability
    body: np.ndarray = field(repr=False)     # (64, 64) "body colour shows here" probability


FG_THRESHOLD = 0.5     # pixels at least this likely to be an object vote for their object's centre
VOTE_SIGMA = 2.0       # px: smoothing of the vote map
VOTE_WINDOW = 7        # px: peaks of the vote map closer than about this are one object
VOTE_THRESHOLD = 3.0   # smoothed vote mass a peak needs to be an object candidate
VOTE_REACH = 8.0       # px: a pixel belongs to the peak nearest its vote, if within this distance
MIN_AREA = 12.0        # px: smaller candidates are dropped
EXIST_AREA = 40.0      # px: a candidate with at least this many object pixels surely exists


def _as_batch(images) -> np.ndarray:
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[1:] != (RES, RES, 3):
        raise ValueError(f"images must be (64, 64, 3) or (n, 64, 64, 3) RGB, got shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


_YY, _XX = np.mgrid[0:RES, 0:RES].astype(np.float32)


def _vote_kernel() -> torch.Tensor:
    r = int(math.ceil(3 * VOTE_SIGMA))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * VOTE_SIGMA ** 2))
    return k / k.sum()


def _dense_pass(dense: DenseNet, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The dense network on x (B, 3, 64, 64) in 0..1, read out at 64×64: object and body probability,
    where each pixel votes its object's centre is (vy, vx), the smoothed vote map and its peaks, and
    scene probabilities."""
    B = x.shape[0]
    k = _vote_kernel()
    r = len(k) // 2
    with torch.inference_mode():
        maps, scene_logits = dense(x)
        up = F.interpolate(torch.cat([torch.sigmoid(maps[:, M_FG:M_BODY + 1]), maps[:, M_OFF] * OFF_SCALE], 1),
                           size=(RES, RES), mode="bilinear", align_corners=False)
        fg, body = up[:, 0], up[:, 1]
        vy = torch.arange(RES, dtype=torch.float32).view(1, RES, 1) + up[:, 2]
        vx = torch.arange(RES, dtype=torch.float32).view(1, 1, RES) + up[:, 3]
        w = fg * (fg > FG_THRESHOLD)
        cell = (vy.round().clamp(0, RES - 1) * RES + vx.round().clamp(0, RES - 1)).long().view(B, -1)
        votes = torch.zeros(B, RES * RES).scatter_add_(1, cell, w.reshape(B, -1)).view(B, 1, RES, RES)
        votes = F.conv2d(F.pad(votes, (r, r, 0, 0)), k.view(1, 1, 1, -1))
        votes = F.conv2d(F.pad(votes, (0, 0, r, r)), k.view(1, 1, -1, 1))[:, 0]
        peaks = (votes == F.max_pool2d(votes.unsqueeze(1), VOTE_WINDOW, 1, VOTE_WINDOW // 2)[:, 0]) \
            & (votes > VOTE_THRESHOLD)
        scene = torch.softmax(scene_logits, 1)
    return {k: v.numpy() for k, v in dict(fg=fg, body=body, vy=vy, vx=vx, votes=votes, peaks=peaks,
                                           scene=scene).items()}


def _segment(fg, vy, vx, votes, peaks) -> list[tuple[np.ndarray, tuple[int, int, int, int], float, tuple]]:
    """Objects from one image's dense maps: every vote-map peak is a candidate and each object pixel
    joins the peak nearest to where it votes. Returns [(weights (64, 64), box, area, centre)]."""
    py, px = np.nonzero(peaks)
    order = np.argsort(-votes[py, px])[:12]
    py, px = py[order], px[order]
    out = []
    if len(py):
        d2 = (vy[None] - py[:, None, None]) ** 2 + (vx[None] - px[:, None, None]) ** 2
        owner = np.argmin(d2, 0)
        near = (d2.min(0) <= VOTE_REACH ** 2) & (fg > 0.3)
        for n in range(len(py)):
            w = fg * ((owner == n) & near)
            area = float(w.sum())
            ys, xs = np.nonzero(w > 0.5)
            if area < MIN_AREA or not len(ys):
                continue
            box = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
            out.append((w.astype(np.float32), box, area, (float(py[n]), float(px[n]))))
    return out


EXTREME = 0.2  # share of body pixels at each end of the main colour axis taken as a pattern's pure colours
_PAL_RGB = np.array([ALL_COLOURS[c] for c in PALETTE], np.float32)
FIT_CAP = 45.0       # RGB distance at which a pixel's misfit saturates (shading, outline, extras)
FIT_MIN_END = 0.08   # a two-colour fit needs at least this share of pixels at each end


def _colour_fits(image: np.ndarray, w: np.ndarray, body: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How well an object's body pixels are explained (mean capped squared RGB distance) by one palette
    colour (N_PAL,) and by mixtures of two, i.e. the segment between them (N_PAL, N_PAL): blur and
    anti-aliasing mix a pattern's two colours linearly, so its pixels lie along that segment."""
    wb = w * body
    V = (wb > 0.5).ravel()
    if V.sum() < 8:
        V = (w > 0.5).ravel()
    X = image.reshape(-1, 3)[V].astype(np.float32)
    cap = FIT_CAP ** 2
    G = _PAL_RGB @ X.T                                       # (P, N) palette · pixel
    PP = _PAL_RGB @ _PAL_RGB.T                               # (P, P)
    xa = (X * X).sum(1)[None] - 2 * G + np.diag(PP)[:, None]  # (P, N) |x - a_i|^2
    one = np.minimum(xa, cap).mean(1)
    # segment a_i -> a_j: u = (x - a_i)·(a_j - a_i) / |a_j - a_i|^2, d^2 = |x - a_i|^2 - 2u(...) + u^2 |.|^2
    proj = G[None, :, :] - G[:, None, :] + (np.diag(PP)[:, None] - PP)[..., None]  # (P_i, P_j, N)
    dd = np.maximum(np.diag(PP)[:, None] + np.diag(PP)[None, :] - 2 * PP, 1e-6)[..., None]
    u = np.clip(proj / dd, 0, 1)
    d2 = np.minimum(np.maximum(xa[:, None, :] - 2 * u * proj + u * u * dd, 0), cap)
    two = d2.mean(-1)
    ends = np.minimum((u < 0.5).mean(-1), (u >= 0.5).mean(-1))
    two = np.where(ends >= FIT_MIN_END, two, np.inf)
    np.fill_diagonal(two, np.inf)
    return one.astype(np.float32), two.astype(np.float32)


def _object_colours(image: np.ndarray, pal: np.ndarray, w: np.ndarray, body: np.ndarray) -> np.ndarray:
    """An object's body colour distribution over the palette (+ "other"): half from all its body pixels,
    half from the EXTREME pixels at either end of their main axis of colour variation, which for a
    blurred pattern are the least mixed pixels of its two colours (for a solid object, its colour)."""
    wb = w * body
    if wb.sum() < 4:
        wb = w
    pw = pal.reshape(-1, N_PAL + 1)
    allpx = (pw * wb.reshape(-1, 1)).sum(0) / max(float(wb.sum()), 1e-6)
    V = (wb > 0.5).ravel()
    if V.sum() < 12:
        return allpx
    px = image.reshape(-1, 3)[V].astype(np.float32)
    _, vec = np.linalg.eigh(np.cov((px - px.mean(0)).T) + 1e-3 * np.eye(3))
    t = px @ vec[:, -1]
    lo, hi = np.quantile(t, [EXTREME, 1 - EXTREME])
    ends = pw[V][t <= lo].mean(0) / 2 + pw[V][t >= hi].mean(0) / 2
    return (allpx + ends) / 2


def perceive_batch(images, chunk: int = 64) -> list[Percept]:
    """perceive() for a batch (n, 64, 64, 3): one pass of each network per chunk."""
    a = _as_batch(images)
    dense, cropnet, pattern = _model()
    out: list[Percept] = []
    for s in range(0, len(a), chunk):
        part = a[s:s + chunk]
        x = torch.from_numpy(part).permute(0, 3, 1, 2).float() / 255
        d = _dense_pass(dense, x)
        pal = palette_weights(part)
        percepts = []
        for i in range(len(part)):
            objs = []
            for w, box, area, centre in _segment(d["fg"][i], d["vy"][i], d["vx"][i], d["votes"][i], d["peaks"][i]):
                colours = _object_colours(part[i], pal[i], w, d["body"][i])
                one, two = _colour_fits(part[i], w, d["body"][i])
                objs.append(PerceivedObject(existence=min(1.0, area / EXIST_AREA), centre=centre, area=area,
                                            weights=w, box=box, colours=colours, fit_one=one, fit_two=two))
            percepts.append(Percept(scene=d["scene"][i], objects=objs, palette=pal[i], fg=d["fg"][i],
                                    body=d["body"][i]))
        # what each object is: the crop network, all objects of the chunk at once
        owners = [(i, o) for i, p in enumerate(percepts) for o in p.objects]
        if owners:
            with torch.inference_mode():
                masks = torch.from_numpy(np.stack([o.weights for _, o in owners])).unsqueeze(1)
                boxes = torch.tensor([o.box for _, o in owners], dtype=torch.float32)
                logits = cropnet(*_crops(x[[i for i, _ in owners]], masks, boxes))
                kind = torch.softmax(logits[:, :N_KIND], 1).numpy()
                pat = torch.softmax(logits[:, N_KIND:N_KIND + len(PATTERNS)], 1).numpy()
                size = torch.softmax(logits[:, N_KIND + len(PATTERNS):], 1).numpy()
            for j, (i, o) in enumerate(owners):
                o.kind, o.pattern, o.size = kind[j], pat[j], size[j]
                # which pattern, if patterned: the texture classifier (the crop network says whether)
                f = texture_features(part[i], o.weights * percepts[i].body)
                if f is not None:
                    z = pattern["weight"] @ ((f - pattern["mu"]) / pattern["sd"]) + pattern["bias"]
                    z = np.exp(z - z.max())
                    o.pattern = np.concatenate([pat[j][:1], (1 - pat[j][0]) * z / z.sum()]).astype(np.float32)
        out += percepts
    return out


def perceive(image) -> Percept:
    """Read one image (uint8 (64, 64, 3)): scene probabilities and the objects in it."""
    return perceive_batch(image)[0]


# ------------------------------------------------------------------------------------------------
# Captions: parse the world's grammar into claims
# ------------------------------------------------------------------------------------------------

_COUNT_WORDS = {"a": 1, "an": 1, "one": 1, **{w: n for n, w in NUMBERS.items()}}
_NOUNS = {k: k for k in KINDS} | {p: k for k, p in PLURALS.items()}
_SAY_NUMBER = {1: None, **NUMBERS}


@dataclass(frozen=True)
class Phrase:
    """One object phrase of a caption: count objects of a kind, with the attributes the caption states
    (None = not said). noun is the word as written (a kind, a plural, or a concept word)."""

    count: int
    kind: str
    colour: str | None = None
    colour2: str | None = None
    pattern: str | None = None
    size: str | None = None
    noun: str | None = None

    def text(self) -> str:
        words = []
        if self.size:
            words.append(self.size)
        if self.colour:
            if self.pattern == "solid":
                words.append("solid")
            words.append(self.colour)
            if self.colour2:
                words += ["and", self.colour2]
        if self.pattern and self.pattern != "solid":
            words.append(self.pattern)
        noun = self.noun or self.kind
        if self.count == 1:
            return " ".join([W._article((words or [noun])[0]), *words, noun])
        plural = PLURALS.get(noun, noun if noun.endswith("s") else noun + "s")
        return " ".join([_SAY_NUMBER.get(self.count) or str(self.count), *words, plural])


@dataclass(frozen=True)
class Claim:
    """A parsed caption: the scene it states (or None) and its object phrases."""

    scene: str | None
    phrases: tuple[Phrase, ...]

    def text(self) -> str:
        t = " and ".join(p.text() for p in self.phrases)
        return f"{t} {self.scene}" if self.scene else t


def _concept_kind(value) -> str:
    if isinstance(value, Instance):
        return value.supercategory
    if value in KINDS:
        return value
    if value in W.INSTANCES_BY_NAME:
        return W.INSTANCES_BY_NAME[value].supercategory
    raise ValueError(f"concept {value!r} is neither a kind {KINDS} nor an instance name")


def parse_caption(caption: str, concepts: dict | None = None) -> Claim:
    """Parse a caption of the world's grammar: "[a|two..six] [small|big] [solid] [colour [and colour2]]
    [pattern] noun[ and ...][ scene]". Colours may be base or reserved instance colours; concepts maps
    extra nouns (concept words such as "mycat") to a kind, an instance name or an Instance.
    Raises ValueError on anything else."""
    text = " ".join(str(caption).lower().replace(",", " ").rstrip(". ").split())
    scene = None
    for s in sorted(SCENES, key=len, reverse=True):
        if text == s or text.endswith(" " + s):
            scene, text = s, text[: -len(s)].strip()
            break
    nouns = dict(_NOUNS)
    for word, value in (concepts or {}).items():
        k = _concept_kind(value)
        nouns[word.lower()] = k
        nouns.setdefault(word.lower() + "s", k)
    toks = text.split()
    if not toks:
        raise ValueError(f"caption {caption!r} names no object")
    i, phrases = 0, []

    def bad(why: str):
        raise ValueError(f"cannot read caption {caption!r}: {why}")

    while i < len(toks):
        if phrases:
            if toks[i] != "and":
                bad(f"expected 'and' before {toks[i]!r}")
            i += 1
        if i >= len(toks):
            bad("it ends after 'and'")
        if toks[i] in _COUNT_WORDS:
            count = _COUNT_WORDS[toks[i]]
        elif toks[i].isdigit() and int(toks[i]) > 0:
            count = int(toks[i])
        else:
            bad(f"a phrase must start with a number word, not {toks[i]!r}")
        i += 1
        ph: dict = {}
        if i < len(toks) and toks[i] in SIZES:
            ph["size"] = toks[i]
            i += 1
        if i < len(toks) and toks[i] == "solid":
            ph["pattern"] = "solid"
            i += 1
        if i < len(toks) and toks[i] in ALL_COLOURS:
            ph["colour"] = toks[i]
            i += 1
            if i + 1 < len(toks) and toks[i] == "and" and toks[i + 1] in ALL_COLOURS:
                ph["colour2"] = toks[i + 1]
                i += 2
        if i < len(toks) and toks[i] in PATTERNS:
            ph["pattern"] = toks[i]
            i += 1
        if i >= len(toks) or toks[i] not in nouns:
            bad(f"unknown object word {toks[i] if i < len(toks) else '(none)'!r}")
        phrases.append(Phrase(count=count, kind=nouns[toks[i]], noun=None if toks[i] in _NOUNS else toks[i], **ph))
        i += 1
    return Claim(scene, tuple(phrases))


# ------------------------------------------------------------------------------------------------
# Alignment
# ------------------------------------------------------------------------------------------------

COLOUR_SHARE = 0.25   # share of an object's body pixels at which a stated colour counts as fully there
COLOUR2_SHARE = 0.15  # ... for the second colour of a pattern (dots cover about a third)
MIN_EXISTENCE = 0.1


_BASE_IDX = [PALETTE.index(c) for c in COLOURS]


def colour_share(o: PerceivedObject, colour: str) -> float:
    """The share of an object's body colour that is `colour`, among the base colours and `colour` (so
    that a reserved colour next to a base one, gold next to yellow, takes nothing from a base claim)."""
    i = PALETTE.index(colour)
    idx = _BASE_IDX if i in _BASE_IDX else _BASE_IDX + [i]
    return float(o.colours[i] / max(float(o.colours[idx].sum()), 1e-6))


FIT_TEMPERATURE = 120.0  # error units (squared RGB) per e-fold of colour-hypothesis probability


def colour_presence(o: PerceivedObject, colour: str) -> float:
    """Probability that `colour` is one of the two colours of a patterned object, from the two-colour
    model: every pair of palette colours gets probability exp(-(error - best error) / (FIT_TEMPERATURE +
    best error / 2)), among pairs of base colours and `colour` only; `colour`'s presence is the total
    probability of the pairs that contain it."""
    i = PALETTE.index(colour)
    idx = np.array(_BASE_IDX if i in _BASE_IDX else _BASE_IDX + [i])
    err = o.fit_two[np.ix_(idx, idx)]
    k = int(np.nonzero(idx == i)[0][0])
    best = float(np.min(err))
    if not np.isfinite(best):
        return 0.0
    e = np.exp(-(err - best) / (FIT_TEMPERATURE + best / 2))  # symmetric: (a, b) and (b, a) both counted
    return float(min(1.0, (e[k].sum() + e[:, k].sum()) / e.sum()))


def _colour_score(o: PerceivedObject, colour: str, share: float) -> float:
    """Solid objects: the colour's share of the body (full at `share`); patterned ones: the two-colour
    model's presence probability; weighted by the crop network's P(solid)."""
    solid = float(o.pattern[0])
    pair = colour_presence(o, colour) if solid < 0.999 else 0.0
    by_share = min(1.0, colour_share(o, colour) / share)
    return solid * by_share + (1 - solid) * (0.7 * pair + 0.3 * by_share)


def _attribute_scores(o: PerceivedObject, ph: Phrase) -> dict[str, float]:
    s = {"kind": float(o.kind[KINDS.index(ph.kind)])}
    if ph.colour:
        s["colour"] = _colour_score(o, ph.colour, COLOUR_SHARE)
    if ph.colour2:
        s["colour2"] = _colour_score(o, ph.colour2, COLOUR2_SHARE)
    if ph.pattern:
        s["pattern"] = float(o.pattern[PATTERNS.index(ph.pattern)])
    if ph.size:
        s["size"] = float(o.size[SIZES.index(ph.size)])
    return s


def _best_assignment(value: np.ndarray) -> list[int]:
    """value (slots, objects) >= 0: an injective slot -> object map (-1 = none) maximising the sum."""
    S, J = value.shape
    best: dict[int, tuple[float, tuple]] = {0: (0.0, ())}
    for s in range(S):
        nxt: dict[int, tuple[float, tuple]] = {}
        for mask, (v, path) in best.items():
            cands = [(v, mask, path + (-1,))]
            cands += [(v + value[s, j], mask | (1 << j), path + (j,)) for j in range(J) if not mask >> j & 1]
            for nv, nm, npath in cands:
                if nm not in nxt or nv > nxt[nm][0]:
                    nxt[nm] = (nv, npath)
        best = nxt
    return list(max(best.values(), key=lambda t: t[0])[1]) if S else []


def _align(p: Percept, claim: Claim) -> dict:
    objs = [o for o in p.objects if o.existence >= MIN_EXISTENCE]
    slots = [i for i, ph in enumerate(claim.phrases) for _ in range(ph.count)]
    attr = [[_attribute_scores(o, claim.phrases[i]) for o in objs] for i in slots]
    value = np.array([[o.existence * float(np.mean(list(a.values()))) for o, a in zip(objs, row)]
                      for row in attr], np.float64).reshape(len(slots), len(objs))
    owner = _best_assignment(value)
    clauses = []
    if claim.scene is not None:
        clauses.append({"clause": "scene", "claim": claim.scene,
                        "score": float(p.scene[SCENES.index(claim.scene)])})
    for i, ph in enumerate(claim.phrases):
        mine = [(k, owner[k]) for k, s in enumerate(slots) if s == i]
        got = [(k, j) for k, j in mine if j >= 0]
        for name in ("kind", "colour", "colour2", "pattern", "size"):
            if name == "kind" or getattr(ph, name):
                sc = float(np.mean([attr[k][j][name] for k, j in got])) if got else 0.0
                clauses.append({"clause": name, "phrase": ph.text(), "claim": getattr(ph, name), "score": sc})
        clauses.append({"clause": "count", "phrase": ph.text(), "claim": ph.count,
                        "score": float(min(objs[j].existence if j >= 0 else 0.0 for _, j in mine))})
    extra = [j for j in range(len(objs)) if j not in owner]
    clauses.append({"clause": "nothing else", "claim": len(extra) and [objs[j].summary()["kind"] for j in extra],
                    "score": float(np.prod([1 - objs[j].existence for j in extra])) if extra else 1.0})
    return {"score": float(np.mean([c["score"] for c in clauses])), "caption": claim.text(), "clauses": clauses,
            "scene": {s: round(float(v), 3) for s, v in zip(SCENES, p.scene)},
            "objects": [o.summary() for o in objs]}


def alignment_details(image, caption: str, concepts: dict | None = None) -> dict:
    """alignment() with its workings: {"score", "caption" (as parsed), "clauses": [{"clause", "claim",
    "score", "phrase"?}, ...], "scene": probabilities, "objects": what was found}.

    Clauses: "scene" (if the caption states one); for every object phrase "kind", "colour", "colour2",
    "pattern", "size" (those it states), each averaged over the objects matched to the phrase, and
    "count" (there are that many: the least existence among the matched objects, 0 when fewer objects
    match than stated); finally "nothing else" (no object left undescribed, as every caption of the
    world describes every object: the product of 1 - existence over the unmatched objects)."""
    return _align(perceive(image), parse_caption(caption, concepts))


def alignment(image, caption: str, concepts: dict | None = None) -> float:
    """How well an image (uint8 (64, 64, 3)) matches a caption: the mean of its clauses' truth values,
    in [0, 1]. See alignment_details for the clauses."""
    return alignment_details(image, caption, concepts)["score"]


# ------------------------------------------------------------------------------------------------
# Fidelity
# ------------------------------------------------------------------------------------------------

GRID = 3
SIGNATURE_SHARE = 0.015  # a palette colour is part of an instance's signature from this share of its pixels
SIGNATURE_MAX = 0.3      # ... up to this share (above: its body colour, which the histogram already weighs)


@dataclass
class Descriptor:
    """An object's appearance: hist (N_PAL + 1) palette distribution of its pixels; cells (GRID, GRID,
    N_PAL + 1) the distribution in each cell of its normalised bounding box, mass (GRID, GRID) the cells'
    shares of its pixels; kind (N_KIND) kind probabilities."""

    hist: np.ndarray
    cells: np.ndarray
    mass: np.ndarray
    kind: np.ndarray


def describe(p: Percept, o: PerceivedObject) -> Descriptor:
    w = o.weights
    pal = p.palette * w[..., None]
    m = pal.reshape(-1, N_PAL + 1).sum(0)
    hist = m / max(float(m.sum()), 1e-6)
    r0, c0, r1, c1 = o.box
    if r1 <= r0 or c1 <= c0:
        r0, c0, r1, c1 = 0, 0, RES, RES
    gy = np.clip(((_YY + 0.5 - r0) / (r1 - r0) * GRID).astype(np.int64), 0, GRID - 1)
    gx = np.clip(((_XX + 0.5 - c0) / (c1 - c0) * GRID).astype(np.int64), 0, GRID - 1)
    cell = (gy * GRID + gx).ravel()
    cells = np.zeros((GRID * GRID, N_PAL + 1), np.float32)
    np.add.at(cells, cell, pal.reshape(-1, N_PAL + 1))
    mass = cells.sum(1)
    cells = cells / np.maximum(mass, 1e-6)[:, None]
    mass = mass / max(float(mass.sum()), 1e-6)
    return Descriptor(hist, cells.reshape(GRID, GRID, -1), mass.reshape(GRID, GRID), o.kind)


def _bc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bhattacharyya coefficient along the last axis."""
    return np.sqrt(np.maximum(a, 0) * np.maximum(b, 0)).sum(-1)


def _layout_sim(q: Descriptor, r: Descriptor) -> float:
    best = 0.0
    for cells, mass in ((q.cells, q.mass), (q.cells[:, ::-1], q.mass[:, ::-1])):
        wgt = np.sqrt(mass * r.mass)
        best = max(best, float((wgt * _bc(cells, r.cells)).sum() / max(wgt.sum(), 1e-6)))
    return best


@dataclass
class Reference:
    """An instance's reference appearance, from its photos."""

    descriptors: list[Descriptor]
    hist: np.ndarray    # mean palette distribution
    kind: np.ndarray    # mean kind probabilities
    signature: np.ndarray  # palette indices of its minor colours (markings, extras): SIGNATURE_SHARE..SIGNATURE_MAX


def _reference(images: np.ndarray) -> Reference:
    descs = []
    for p in perceive_batch(images):
        objs = [o for o in p.objects if o.existence >= MIN_EXISTENCE]
        if objs:
            descs.append(describe(p, max(objs, key=lambda o: o.existence * o.area)))
    if not descs:
        raise ValueError("no object found in the reference images")
    hist = np.mean([d.hist for d in descs], 0)
    kind = np.mean([d.kind for d in descs], 0)
    minor = (hist[:N_PAL] >= SIGNATURE_SHARE) & (hist[:N_PAL] < SIGNATURE_MAX)
    return Reference(descs, hist, kind, np.nonzero(minor)[0])


@lru_cache(maxsize=64)
def _instance_reference(name: str) -> Reference:
    return _reference(photo_set(name)[0])


_REF_CACHE: dict[str, Reference] = {}


def _reference_for(instance, reference_images) -> Reference:
    if reference_images is None:
        name = instance.name if isinstance(instance, Instance) else str(instance)
        if isinstance(instance, Instance) and W.INSTANCES_BY_NAME.get(name) != instance:
            return _reference(photo_set(instance)[0])
        if name not in W.INSTANCES_BY_NAME:
            raise ValueError(f"unknown instance {name!r}; instances: {[i.name for i in INSTANCES]}")
        return _instance_reference(name)
    a = _as_batch(reference_images)
    key = hashlib.sha1(a.tobytes()).hexdigest()
    if key not in _REF_CACHE:
        if len(_REF_CACHE) > 64:
            _REF_CACHE.clear()
        _REF_CACHE[key] = _reference(a)
    return _REF_CACHE[key]


def _similarity(q: Descriptor, ref: Reference) -> dict[str, float]:
    hist = float(np.mean([_bc(q.hist, r.hist) for r in ref.descriptors]))
    layout = float(np.mean([_layout_sim(q, r) for r in ref.descriptors]))
    sig = ref.signature
    presence = float(np.mean(np.minimum(1.0, q.hist[sig] / (0.5 * ref.hist[sig])))) if len(sig) else 1.0
    kind = float(_bc(q.kind, ref.kind))
    score = (kind + hist + layout + presence) / 4
    return {"score": score, "kind": kind, "colours": hist, "layout": layout, "signature": presence}


def _fidelity(p: Percept, ref: Reference, descriptors: list | None = None) -> dict:
    objs = [o for o in p.objects if o.existence >= MIN_EXISTENCE]
    descriptors = descriptors if descriptors is not None else [describe(p, o) for o in objs]
    best = {"score": 0.0, "kind": 0.0, "colours": 0.0, "layout": 0.0, "signature": 0.0, "object": None}
    for o, d in zip(objs, descriptors):
        s = _similarity(d, ref)
        if s["score"] > best["score"]:
            best = {**s, "object": o.summary()}
    return best


def fidelity_details(image, instance, reference_images=None) -> dict:
    """fidelity() with its parts for the best-matching object: {"score", "kind", "colours", "layout",
    "signature", "object"}."""
    return _fidelity(perceive(image), _reference_for(instance, reference_images))


def fidelity(image, instance, reference_images=None) -> float:
    """How close the object in image (uint8 (64, 64, 3)) that best matches an instance is to that
    instance's reference photos (default: photo_set(instance)), in [0, 1]: the mean of kind agreement,
    colour-histogram similarity, layout similarity and signature-colour presence, best over the objects
    found in the image (0 if none)."""
    return fidelity_details(image, instance, reference_images)["score"]


def recognition(image, instance, candidates=None) -> dict:
    """Is `instance` (a name of INSTANCES) recognised in the image? The object that best matches its reference
    photos (the one fidelity() scores) must match them strictly better than it matches every other candidate
    instance's (default: all of INSTANCES). On an image of one object this is exactly the instance-retrieval
    top-1 that validate() measures the evaluator with (≥ 0.97 on degraded renders); read per object it also
    works for an image of several instances: two instances are both recognised only in two distinct objects
    (an object recognised as A matches A better than B, so it cannot be the one recognised as B).

    Returns {"recognised": bool, "score": the fidelity of that object (= fidelity(image, instance)),
    "best_other": the candidate it matches next best, "margin": its score minus that candidate's}."""
    name = instance.name if isinstance(instance, Instance) else str(instance)
    if name not in W.INSTANCES_BY_NAME:
        raise ValueError(f"unknown instance {name!r}; instances: {[i.name for i in INSTANCES]}")
    p = perceive(image)
    objs = [o for o in p.objects if o.existence >= MIN_EXISTENCE]
    ref = _instance_reference(name)
    scored = [(_similarity(d, ref)["score"], d) for d in (describe(p, o) for o in objs)]
    if not scored:
        return {"recognised": False, "score": 0.0, "best_other": None, "margin": None}
    score, desc = max(scored, key=lambda t: t[0])
    others = [c for c in (candidates or [i.name for i in INSTANCES]) if c != name]
    rival = {c: _similarity(desc, _instance_reference(c))["score"] for c in others}
    best = max(rival, key=rival.get) if rival else None
    margin = score - rival[best] if best else float("inf")
    return {"recognised": bool(margin > 1e-9), "score": float(score), "best_other": best,
            "margin": float(margin)}


# ------------------------------------------------------------------------------------------------
# Validation against ground truth
# ------------------------------------------------------------------------------------------------

CHANGES = ("scene", "kind", "colour", "count", "pattern", "size")


def _phrase_true_of(ph: Phrase, o: Obj) -> bool:
    return (o.kind == ph.kind and ph.colour in (None, o.colour) and ph.colour2 in (None, o.colour2)
            and ph.pattern in (None, o.pattern) and ph.size in (None, o.size))


def claim_is_true(claim: Claim, scene: Scene) -> bool:
    """Exact truth of a claim about a scene, in the grammar's sense: the scene (if stated) is right and
    every object is described by exactly one phrase slot (unstated attributes match anything)."""
    if claim.scene is not None and claim.scene != scene.name:
        return False
    slots = [ph for ph in claim.phrases for _ in range(ph.count)]
    if len(slots) != len(scene.objs):
        return False

    def assign(k: int, free: frozenset) -> bool:
        return k == len(slots) or any(assign(k + 1, free - {j}) for j in free
                                      if _phrase_true_of(slots[k], scene.objs[j]))

    return assign(0, frozenset(range(len(scene.objs))))


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _perturb(claim: Claim, scene: Scene, change: str, rng) -> Claim | None:
    """The claim with one attribute changed (or None when that change does not apply)."""
    phs = list(claim.phrases)
    if change == "scene":
        return Claim(_pick(rng, [s for s in SCENES if s != claim.scene]), claim.phrases)
    i = int(rng.integers(len(phs)))
    ph = phs[i]
    if change == "kind":
        phs[i] = Phrase(**{**ph.__dict__, "kind": _pick(rng, [k for k in KINDS if k != ph.kind]), "noun": None})
    elif change == "colour":
        # never a colour the object shows (a striped object's second colour looks like its first)
        shown = {c for o in scene.objs if o.kind == ph.kind for c in (o.colour, o.colour2)}
        new = _pick(rng, [c for c in COLOURS if c not in shown])
        if ph.colour2 and rng.random() < 0.5:
            phs[i] = Phrase(**{**ph.__dict__, "colour2": new})
        else:
            phs[i] = Phrase(**{**ph.__dict__, "colour": new})
    elif change == "count":
        n = ph.count + (1 if ph.count == 1 and len(phs) == 1 or rng.random() < 0.5 else -1)
        if n == 0:
            del phs[i]
        else:
            phs[i] = Phrase(**{**ph.__dict__, "count": n})
    elif change == "pattern":
        options = [p for p in PATTERNS if p != ph.pattern and (p != "solid" or ph.colour)]
        new = _pick(rng, options)
        phs[i] = Phrase(**{**ph.__dict__, "pattern": new, "colour2": None if new == "solid" else ph.colour2})
    elif change == "size":
        phs[i] = Phrase(**{**ph.__dict__, "size": _pick(rng, [s for s in ("small", "big") if s != ph.size])})
    else:
        raise ValueError(change)
    return Claim(claim.scene, tuple(phs)) if phs else None


def distractors(claim: Claim, scene: Scene, rng, n: int = 31, n_changed: int = 20) -> list[tuple[str, Claim]]:
    """n false captions for a scene: n_changed differ from the true claim in one attribute (CHANGES, taken
    in turn), the rest are true captions of other random base scenes. Each is checked false against the
    scene's ground truth; returns [(change or "random", claim)]."""
    seen = {claim.text()}
    out: list[tuple[str, Claim]] = []
    k, tries = 0, 0
    while len(out) < n_changed and tries < 40 * n:
        change = CHANGES[k % len(CHANGES)]
        k += 1
        tries += 1
        c = _perturb(claim, scene, change, rng)
        if c is None or c.text() in seen or claim_is_true(c, scene):
            continue
        seen.add(c.text())
        out.append((change, c))
    while len(out) < n and tries < 80 * n:
        tries += 1
        other = sample_scene(rng)
        c = parse_caption(world_caption(other, rng))
        if c.text() in seen or claim_is_true(c, scene):
            continue
        seen.add(c.text())
        out.append(("random", c))
    return out


def validation_scenes(n: int, seed: int = 0) -> list[tuple[np.ndarray, str, Scene]]:
    """n held-out base-distribution renders (backgrounds from HELD_OUT_BACKGROUNDS) with true captions."""
    rng = np.random.default_rng([seed, 4_242])
    out = []
    for _ in range(n):
        sc = _rebackground(sample_scene(rng), rng, HELD_OUT_BACKGROUNDS)
        out.append((draw(sc), world_caption(sc, rng), sc))
    return out


def instance_renders(per_instance: int = 12, seed: int = 0) -> list[tuple[np.ndarray, str, Scene]]:
    """Renders of every instance (INSTANCES) via render_instance_in: cycling through the six scenes,
    alone and with one or two random base objects, size small/medium/big (1:2:1), on held-out
    backgrounds. Returns [(image, instance name, scene)]."""
    rng = np.random.default_rng([seed, 999])
    out = []
    for inst in INSTANCES:
        for k in range(per_instance):
            others = [W.random_obj(rng) for _ in range(1 + int(rng.integers(2)))] if (k // 6) % 2 else []
            size = SIZES[W._pick(W._SIZE_CUM, rng.random())]
            for _ in range(100):
                img, sc = render_instance_in(inst, SCENES[k % len(SCENES)], others, rng=rng, size=size)
                if sc.bg in HELD_OUT_BACKGROUNDS:
                    break
            out.append((img, inst.name, sc))
    return out


def _top1(true_score: float, others: np.ndarray) -> float:
    """1 if the truth scores highest, 1/(1+t) if it ties t others for highest (random tie-break), else 0."""
    best = float(np.max(others)) if len(others) else -np.inf
    if true_score > best + 1e-9:
        return 1.0
    if true_score < best - 1e-9:
        return 0.0
    return 1.0 / (1 + int(np.sum(np.abs(others - true_score) <= 1e-9)))


def _caption_retrieval(percepts: list[Percept], items, cands) -> dict:
    hits, pair = [], {}
    for p, (_, _, _), (truth, dis) in zip(percepts, items, cands):
        t = _align(p, truth)["score"]
        d = np.array([_align(p, c)["score"] for _, c in dis])
        hits.append(_top1(t, d))
        for (change, _), v in zip(dis, d):
            pair.setdefault(change, []).append(1.0 if t > v + 1e-9 else 0.5 if abs(t - v) <= 1e-9 else 0.0)
    return {"top1": float(np.mean(hits)), "pairwise": {k: round(float(np.mean(v)), 4) for k, v in sorted(pair.items())}}


def _instance_retrieval(percepts: list[Percept], renders, refs: dict[str, Reference]) -> dict:
    names = list(refs)
    hits, margins = [], []
    per: dict[str, list[float]] = {}
    for p, (_, name, _) in zip(percepts, renders):
        descs = [describe(p, o) for o in p.objects if o.existence >= MIN_EXISTENCE]
        s = np.array([_fidelity(p, refs[n], descs)["score"] for n in names])
        i = names.index(name)
        hit = _top1(s[i], np.delete(s, i))
        hits.append(hit)
        per.setdefault(name, []).append(hit)
        margins.append(s[i] - np.delete(s, i).max())
    return {"top1": float(np.mean(hits)), "median_margin": round(float(np.median(margins)), 4),
            "per_instance": {k: round(float(np.mean(v)), 3) for k, v in per.items()}}


def validate(n_images: int = 300, seed: int = 0, degrade: bool = True, n_distractors: int = 31,
             n_changed: int = 20, instance_renders_per: int = 12, strength: float = 1.0) -> dict:
    """Retrieval accuracies of the evaluators against ground truth on held-out renders.

    Caption retrieval: n_images base renders (held-out backgrounds, seed); each is scored by alignment()
    against its true caption and n_distractors false ones (n_changed differing in one attribute, the rest
    random captions; see distractors()); top-1 = how often the true caption scores highest (ties split).
    Instance retrieval: instance_renders(instance_renders_per, seed) scored by fidelity() against every
    instance's photo_set; top-1 = how often the true instance scores highest.
    Both on clean renders, and (degrade=True) on degrade(render, strength) copies. References (photo
    sets) are always clean: they stand for the user's photos."""
    t0 = time.perf_counter()
    items = validation_scenes(n_images, seed)
    rng = np.random.default_rng([seed, 31_337])
    cands = []
    for _, cap, sc in items:
        truth = parse_caption(cap)
        cands.append((truth, distractors(truth, sc, rng, n_distractors, n_changed)))
    renders = instance_renders(instance_renders_per, seed)
    refs = {inst.name: _instance_reference(inst.name) for inst in INSTANCES}
    cap_imgs = np.stack([it[0] for it in items]) if items else np.zeros((0, RES, RES, 3), np.uint8)
    inst_imgs = np.stack([r[0] for r in renders])
    out: dict = {"n_images": n_images, "seed": seed, "n_candidates": 1 + n_distractors, "n_changed": n_changed,
                 "n_instance_images": len(renders), "n_instances": len(refs),
                 "chance_caption_top1": round(1 / (1 + n_distractors), 4),
                 "chance_instance_top1": round(1 / len(refs), 4)}
    variants = [("clean", cap_imgs, inst_imgs)]
    if degrade:
        variants.append(("degraded", _degrade(cap_imgs, (seed, "captions"), strength) if len(cap_imgs) else cap_imgs,
                         _degrade(inst_imgs, (seed, "instances"), strength)))
        out["degrade_strength"] = strength
    for tag, ci, ii in variants:
        c = _caption_retrieval(perceive_batch(ci), items, cands) if len(ci) else {"top1": float("nan"), "pairwise": {}}
        r = _instance_retrieval(perceive_batch(ii), renders, refs)
        out[f"caption_top1_{tag}"] = round(c["top1"], 4)
        out[f"caption_pairwise_{tag}"] = c["pairwise"]
        out[f"instance_top1_{tag}"] = round(r["top1"], 4)
        out[f"instance_margin_{tag}"] = r["median_margin"]
        out[f"instance_per_{tag}"] = r["per_instance"]
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out
