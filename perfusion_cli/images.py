"""Training photos: find, open, orient, convert, centre-crop and resize them; their masks too."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import PerfusionError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


@dataclass
class PhotoSet:
    pixels: torch.Tensor                 # (N, 3, R, R) in [-1, 1]
    paths: list[Path]                    # the images used, in order
    skipped: list[str] = field(default_factory=list)  # "file: why" for each unreadable file


def min_side_for(resolution: int) -> int:
    """Smallest accepted photo side: a quarter of the training resolution, at least 32 px."""
    return max(32, resolution // 4)


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB with EXIF orientation applied; transparency composited onto white."""
    im = ImageOps.exif_transpose(im)
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
        return bg
    return im.convert("RGB")


def centre_square(im: Image.Image, size: int, resample=Image.Resampling.LANCZOS) -> Image.Image:
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s)).resize((size, size), resample)


def list_images(folder: Path) -> list[Path]:
    if not folder.exists():
        raise PerfusionError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise PerfusionError(f"{folder} is not a folder; pass the folder that holds the photos")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise PerfusionError(f"image folder {folder} is empty; put 4-8 photos of the concept in it")
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise PerfusionError(
            f"no images in {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); found {len(files)} other files"
        )
    return images


def load_photos(folder: str | Path, resolution: int) -> PhotoSet:
    """Every readable image of `folder` at `resolution`². Unreadable files are skipped (listed in
    `skipped`); none left, or any image smaller than min_side_for(resolution), is an error."""
    folder = Path(folder)
    pixels, used, skipped, small = [], [], [], []
    min_side = min_side_for(resolution)
    for p in list_images(folder):
        try:
            with Image.open(p) as im:
                im.load()
                rgb = to_rgb(im)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            skipped.append(f"{p.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        if min(rgb.size) < min_side:
            small.append(f"{p.name} ({rgb.size[0]}x{rgb.size[1]})")
            continue
        arr = np.asarray(centre_square(rgb, resolution), dtype=np.float32) / 127.5 - 1.0
        pixels.append(torch.from_numpy(arr).permute(2, 0, 1))
        used.append(p)
    if small:
        raise PerfusionError(
            f"{len(small)} image(s) smaller than {min_side}px on a side, too small to train at {resolution}px: "
            + ", ".join(small[:3]) + ("…" if len(small) > 3 else "") + "; remove them or use larger photos"
        )
    if not pixels:
        raise PerfusionError(f"none of the {len(skipped)} image files in {folder} could be read (e.g. {skipped[0]})")
    return PhotoSet(torch.stack(pixels), used, skipped)


def load_masks(folder: str | Path, paths: list[Path], size: int) -> torch.Tensor:
    """(N, size, size) soft masks in [0, 1], one per photo, matched by file stem (any image suffix)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PerfusionError(f"mask folder {folder} does not exist; pass --mask none, attention, or a folder")
    by_stem = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    masks = []
    for p in paths:
        m = by_stem.get(p.stem)
        if m is None:
            raise PerfusionError(f"no mask for {p.name} in {folder} (expected {p.stem}.png or similar)")
        try:
            with Image.open(m) as im:
                im = ImageOps.exif_transpose(im)
                grey = im.getchannel("A") if im.mode in ("RGBA", "LA") else im.convert("L")
                arr = np.asarray(centre_square(grey, size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise PerfusionError(f"mask {m.name} cannot be read ({e}); fix or remove it") from None
        if arr.max() <= 0:
            raise PerfusionError(f"mask {m.name} is empty (all black); the object must be white in its mask")
        masks.append(torch.from_numpy(arr))
    return torch.stack(masks)
