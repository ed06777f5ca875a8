"""Image decoding that survives real user folders.

EXIF orientation is applied, every mode (grayscale, palette, RGBA, CMYK, 16-bit) becomes 8-bit RGB,
decompression bombs are refused, and large JPEGs are decoded with PIL's draft mode (DCT-domain
downscale) when the caller only needs a smaller working size. The draft keeps :data:`DRAFT_MARGIN` times
the size asked for, so the final antialiased resize, not the DCT scaling, sets the pixels: features then
match a full decode to a mean cosine of 0.9995 (``docs/benchmarks/preprocessing.md``).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from transferkit.errors import TransferkitError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAX_PIXELS = 89_478_485  # PIL's own default bomb limit: ~ 9459 x 9459
DRAFT_MARGIN = 1.5  # a draft-decoded JPEG keeps at least this many times the short side asked for
# Long side / short side. A 60000x1 strip is tiny on disk but, scaled to a 224 px short side, 3 GB of pixels;
# panoramas stay well below this.
MAX_ASPECT_RATIO = 20


class ImageDecodeError(TransferkitError):
    """A file that cannot be turned into an RGB image."""


def is_image_file(name: str | os.PathLike) -> bool:
    return str(name).lower().endswith(IMAGE_EXTENSIONS)


def load_image(path: str | os.PathLike, min_short_side: int | None = None) -> np.ndarray:
    """Decode ``path`` to an ``(H, W, 3)`` uint8 RGB array.

    With ``min_short_side`` a JPEG may be decoded at a reduced DCT scale whose shorter side is still
    at least that many pixels; the exact final resize is left to the transform.
    """
    try:
        with _open(path) as img:
            _refuse_bombs(img, path, min_short_side)
            if min_short_side and img.format == "JPEG":
                img.draft("RGB", _draft_request(img.size, min_short_side))
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb_array(img)
    except ImageDecodeError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"cannot decode image {path}: {exc}") from exc


def check_image(path: str | os.PathLike, min_short_side: int | None = None) -> str | None:
    """Why ``path`` cannot be trained on, from its header (and PNG chunk checksums) alone; None if it looks fine.

    Much cheaper than a decode: what finetune checks up front, so a bad file fails before any training time.
    """
    try:
        with _open(path) as img:
            _refuse_bombs(img, path, min_short_side)
            img.verify()
    except ImageDecodeError as exc:
        return str(exc)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"cannot decode image {path}: {exc}; remove or re-encode it"
    return None


def _open(path) -> Image.Image:
    """``Image.open`` without PIL's own DecompressionBombWarning print: :func:`_refuse_bombs` decides instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any PIL mode to 8-bit RGB: 16-bit scaled down, alpha composited on white, CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / peak), 0, 255).round().astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header only."""
    with Image.open(path) as img:
        width, height = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _refuse_bombs(img: Image.Image, path, min_short_side: int | None = None) -> None:
    """Refuse what would exhaust memory: too many pixels as stored, or once the short side is scaled up."""
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(
            f"image {path} is {width}x{height} pixels, above the {MAX_PIXELS:,}-pixel decompression-bomb limit; "
            "downscale it before training"
        )
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
        raise ImageDecodeError(
            f"image {path} is {width}x{height} pixels, an aspect ratio above {MAX_ASPECT_RATIO}:1; "
            "crop it into tiles or remove it"
        )
    if min_short_side and width * height * (min_short_side / min(width, height)) ** 2 > MAX_PIXELS:
        raise ImageDecodeError(f"image {path} ({width}x{height}) would exceed {MAX_PIXELS:,} pixels once its short "
                               f"side is scaled to {min_short_side}; crop it before training")


def _draft_request(size: tuple[int, int], min_short_side: int) -> tuple[int, int]:
    """A draft size whose shorter side stays >= DRAFT_MARGIN x min_short_side (draft never goes below the request)."""
    width, height = size
    scale = DRAFT_MARGIN * min_short_side / min(width, height)
    return max(1, int(np.ceil(width * scale))), max(1, int(np.ceil(height * scale)))
