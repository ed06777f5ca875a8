"""Image decoding that survives real user folders.

EXIF orientation is applied, every mode (grayscale, palette, RGBA, CMYK, 16-bit) becomes 8-bit RGB,
decompression bombs are refused, and large JPEGs are decoded with PIL's draft mode (DCT-domain
downscale) when the caller only needs a smaller working size: the smallest DCT scale that keeps
:data:`DRAFT_MARGIN` times the size asked for, so the final antialiased resize, not the DCT scaling, sets the
pixels (``docs/benchmarks/input.md``: features within a mean cosine of 0.9995 of timm's on a full decode). A JPEG
decoded at full scale goes through torchvision's ``decode_jpeg`` (libjpeg-turbo without PIL's overhead: the same
pixels, about twice as fast).
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from transferkit.errors import TransferkitError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAX_PIXELS = 89_478_485  # PIL's own default bomb limit: ~ 9459 x 9459
# A draft-decoded JPEG keeps at least this many times the short side asked for. Less costs parity with timm: 1.0
# (exactly the size read) takes 1280x960 frames to 1/4 in squash/letterbox (mean cosine 0.9985 / 0.9990 on roads),
# 1.15 takes 8 MP photos to 1/8 (an 8x8 box average before the resize: 0.9987 in crop mode); docs/benchmarks/input.md.
DRAFT_MARGIN = 1.5
# Long side / short side. A 60000x1 strip is tiny on disk but, scaled to a 224 px short side, 3 GB of pixels;
# panoramas stay well below this.
MAX_ASPECT_RATIO = 20


class ImageDecodeError(TransferkitError):
    """A file that cannot be turned into an RGB image."""


def is_image_file(name: str | os.PathLike) -> bool:
    return str(name).lower().endswith(IMAGE_EXTENSIONS)


class ScaledImage(NamedTuple):
    """A decoded image and where its pixels sit in the full-resolution frame: pixel ``i`` covers full pixels
    ``[i * scale, (i + 1) * scale)``. The eval transform plans its geometry on ``full_size``, as timm does on a full
    decode, so a draft decode moves no crop edge by a pixel. ``image`` stays a PIL image, which the eval resize
    reads without a copy to numpy and back."""

    image: Image.Image  # RGB
    full_size: tuple[int, int]  # (width, height) after EXIF orientation
    scale: int  # the DCT scale denominator (1, 2, 4 or 8)

    def array(self) -> np.ndarray:
        """The pixels as an ``(H, W, 3)`` uint8 array."""
        return np.array(self.image)


def load_image(path: str | os.PathLike, min_short_side: int | None = None) -> np.ndarray:
    """Decode ``path`` to an ``(H, W, 3)`` uint8 RGB array.

    With ``min_short_side`` a JPEG may be decoded at a reduced DCT scale whose shorter side is still
    at least that many pixels; the exact final resize is left to the transform.
    """
    return load_scaled(path, min_short_side).array()


def load_scaled(path: str | os.PathLike, min_short_side: int | None = None) -> ScaledImage:
    """:func:`load_image`, also saying which DCT scale was decoded and the full-resolution size."""
    try:
        with _open(path) as img:
            _refuse_bombs(img, path, min_short_side)
            full_size = img.size
            if min_short_side and img.format == "JPEG":
                img.draft("RGB", _draft_request(img.size, min_short_side))
            scale = round(full_size[0] / img.size[0])
            orientation = img.getexif().get(0x0112, 1)
            if orientation in (5, 6, 7, 8):
                full_size = full_size[::-1]
            if scale == 1 and img.format == "JPEG" and img.mode in ("RGB", "L") and isinstance(path, (str, os.PathLike)):
                return ScaledImage(Image.fromarray(_decode_jpeg(path)), full_size, 1)
            img.load()
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
            return ScaledImage(img if img.mode == "RGB" else Image.fromarray(to_rgb_array(img)), full_size, scale)
    except ImageDecodeError:
        raise
    except (OSError, ValueError, SyntaxError, RuntimeError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"cannot decode image {path}: {exc}") from exc


def _decode_jpeg(path) -> np.ndarray:
    """A full-scale RGB or greyscale JPEG through torchvision (libjpeg-turbo, EXIF orientation applied).

    torchvision 0.29 marks its image I/O deprecated in favour of torchcodec, which is not installable here; the
    warning is silenced until then, and PIL decodes the same pixels if torchvision drops it.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    with open(path, "rb") as fh:
        data = torch.frombuffer(bytearray(fh.read()), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        chw = decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    return np.ascontiguousarray(chw.permute(1, 2, 0).numpy())


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
