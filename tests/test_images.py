"""Training photos and masks (perfusion_cli/images.py) on synthetic files made with PIL. No model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from perfusion_cli.errors import PerfusionError
from perfusion_cli.images import list_images, load_masks, load_photos, min_side_for, to_rgb

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def colour(pixels: torch.Tensor, y: int, x: int) -> tuple[int, int, int]:
    """The (3, R, R) [-1, 1] tensor's pixel as 0-255 RGB."""
    return tuple(int(round((float(v) + 1) * 127.5)) for v in pixels[:, y, x])


def close(a, b, tol: int = 12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def half_image(size=(96, 64), left=RED, right=BLUE, mode="RGB") -> Image.Image:
    w, h = size
    im = Image.new(mode, size, right)
    im.paste(Image.new(mode, (w // 2, h), left), (0, 0))
    return im


def test_exif_orientation_is_applied(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; show rotated 90° clockwise
    half_image((96, 64)).save(folder / "phone.jpg", exif=exif.tobytes(), quality=95)

    ps = load_photos(folder, 64)
    assert ps.pixels.shape == (1, 3, 64, 64) and ps.paths == [folder / "phone.jpg"]
    px = ps.pixels[0]
    # Shown upright the photo is 64x96 with the red (left) half on top; the centre square keeps
    # red above and blue below. Ignoring EXIF would put red on the left instead.
    assert close(colour(px, 8, 32), RED) and close(colour(px, 8, 4), RED)
    assert close(colour(px, 56, 32), BLUE) and close(colour(px, 56, 4), BLUE)


def test_rgba_is_composited_on_white(tmp_path):
    im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))            # fully transparent black ...
    im.paste(Image.new("RGBA", (32, 64), (255, 0, 0, 255)), (0, 0))  # ... with an opaque red left half
    rgb = to_rgb(im)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((10, 10)) == RED and rgb.getpixel((50, 10)) == WHITE

    folder = tmp_path / "p"
    folder.mkdir()
    im.save(folder / "cutout.png")
    px = load_photos(folder, 64).pixels[0]
    assert close(colour(px, 32, 8), RED) and close(colour(px, 32, 56), WHITE)


def test_greyscale_and_palette_become_rgb(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    Image.new("L", (64, 64), 100).save(folder / "grey.png")
    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([10, 200, 30] + [0, 0, 0] * 255)
    pal.save(folder / "palette.png")
    Image.new("LA", (64, 64), (50, 0)).save(folder / "grey_alpha.png")  # transparent -> white

    ps = load_photos(folder, 64)
    assert ps.pixels.shape == (3, 3, 64, 64)
    by_name = {p.name: px for p, px in zip(ps.paths, ps.pixels)}
    assert close(colour(by_name["grey.png"], 30, 30), (100, 100, 100), tol=2)
    assert close(colour(by_name["palette.png"], 30, 30), (10, 200, 30), tol=2)
    assert close(colour(by_name["grey_alpha.png"], 30, 30), WHITE, tol=2)
    for mode in ("L", "P", "LA", "CMYK", "I;16"):
        assert to_rgb(Image.new(mode, (8, 8))).mode == "RGB"


def test_centre_crop_keeps_the_centre(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    wide = Image.new("RGB", (192, 64), RED)
    wide.paste(Image.new("RGB", (64, 64), GREEN), (64, 0))
    wide.paste(Image.new("RGB", (64, 64), BLUE), (128, 0))
    wide.save(folder / "wide.png")
    tall = Image.new("RGB", (64, 192), RED)
    tall.paste(Image.new("RGB", (64, 64), GREEN), (0, 64))
    tall.save(folder / "tall.png")

    ps = load_photos(folder, 32)
    assert len(ps.paths) == 2
    for px in ps.pixels:
        for y, x in ((0, 0), (0, 31), (31, 0), (31, 31), (16, 16)):
            assert close(colour(px, y, x), GREEN, tol=3)


def test_corrupt_files_are_skipped_and_reported(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    half_image((64, 64)).save(folder / "good.png")
    half_image((64, 64)).save(folder / "GOOD2.JPG")            # suffixes are case-insensitive
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "cut.png").write_bytes((folder / "good.png").read_bytes()[:60])  # truncated PNG
    (folder / ".DS_Store").write_bytes(b"\x00\x01")           # hidden: ignored
    (folder / "notes.txt").write_text("not an image")        # other suffix: ignored

    ps = load_photos(folder, 64)
    assert [p.name for p in ps.paths] == ["GOOD2.JPG", "good.png"]
    assert ps.pixels.shape == (2, 3, 64, 64)
    assert ps.pixels.min() >= -1 and ps.pixels.max() <= 1
    skipped = " ".join(ps.skipped)
    assert len(ps.skipped) == 2 and "broken.jpg" in skipped and "cut.png" in skipped
    assert not any(".DS_Store" in s or "notes.txt" in s for s in ps.skipped)


def test_all_corrupt_raises(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * i)
    with pytest.raises(PerfusionError, match="could be read") as e:
        load_photos(folder, 64)
    assert "p0.png" in str(e.value) and "\n" not in str(e.value)


def test_too_small_raises_naming_the_file(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    half_image((64, 64)).save(folder / "fine.png")
    half_image((20, 80)).save(folder / "thin.png")
    assert min_side_for(64) == 32 and min_side_for(512) == 128
    with pytest.raises(PerfusionError, match=r"thin\.png \(20x80\)") as e:
        load_photos(folder, 64)
    assert "fine.png" not in str(e.value) and "32px" in str(e.value)


def test_folder_errors(tmp_path):
    with pytest.raises(PerfusionError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(PerfusionError, match="not a folder"):
        list_images(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PerfusionError, match="is empty"):
        list_images(tmp_path / "empty")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.gif.txt").write_text("x")
    with pytest.raises(PerfusionError, match="no images"):
        list_images(tmp_path / "docs")


# ----------------------------------------------------------------------------- masks


@pytest.fixture
def two_photos(tmp_path) -> list[Path]:
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = [folder / "cat1.jpg", folder / "cat2.png"]
    for p in paths:
        half_image((64, 64)).save(p)
    return paths


def test_load_masks_matches_by_stem(tmp_path, two_photos):
    masks = tmp_path / "masks"
    masks.mkdir()
    half_image((64, 64), left=255, right=0, mode="L").save(masks / "cat1.png")  # other suffix, same stem
    alpha = Image.new("RGBA", (96, 64), (0, 0, 0, 0))                          # RGBA: the alpha is the mask
    alpha.paste(Image.new("RGBA", (48, 64), (0, 0, 0, 255)), (48, 0))
    alpha.save(masks / "cat2.webp")
    Image.new("L", (64, 64), 255).save(masks / "unrelated.png")

    m = load_masks(masks, two_photos, 16)
    assert m.shape == (2, 16, 16) and m.dtype == torch.float32
    assert m.min() >= 0 and m.max() <= 1
    assert m[0, 8, 2] > 0.95 and m[0, 8, 13] < 0.05      # white left half
    assert m[1, 8, 2] < 0.05 and m[1, 8, 13] > 0.95      # opaque right half (centre crop of 96x64)


def test_missing_mask_raises(tmp_path, two_photos):
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (64, 64), 255).save(masks / "cat1.png")
    with pytest.raises(PerfusionError, match=r"no mask for cat2\.png"):
        load_masks(masks, two_photos, 16)
    with pytest.raises(PerfusionError, match="does not exist"):
        load_masks(tmp_path / "nope", two_photos, 16)


def test_all_black_mask_raises(tmp_path, two_photos):
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (64, 64), 255).save(masks / "cat1.png")
    Image.new("L", (64, 64), 0).save(masks / "cat2.png")
    with pytest.raises(PerfusionError, match=r"cat2\.png is empty"):
        load_masks(masks, two_photos, 16)


def test_unreadable_mask_raises(tmp_path, two_photos):
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (64, 64), 255).save(masks / "cat1.png")
    (masks / "cat2.png").write_bytes(b"not a png")
    with pytest.raises(PerfusionError, match=r"mask cat2\.png cannot be read"):
        load_masks(masks, two_photos, 16)
