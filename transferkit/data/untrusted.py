"""Decoding image bytes sent by someone else (a `serve` upload, a request to the MLflow model) within fixed bounds.

A file's size says nothing about its decoded size: a 10 KB 1-bit PNG can hold 81 M pixels (~850 MB once converted
to RGB). So before any pixel is decoded the header is checked against :data:`MAX_DECODED_PIXELS`, far below
PIL's own bomb limit (which is meant for a user's own files, not a service); a baseline JPEG is decoded at a
reduced DCT scale (draft) and is checked at that size, so a large phone photo still passes. Every other format is
box-reduced right after decoding, to no less than :data:`REDUCE_MARGIN` times the working size the model needs, so
what a request keeps in memory is small. Only the formats a user trains on are parsed (no EPS, PSD,
...), and at most :data:`MAX_CONCURRENT_DECODES` decodes run at once per process, whatever the number of requests.
"""

from __future__ import annotations

import io
import math
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from transferkit.data.decode import (
    MAX_ASPECT_RATIO,
    MAX_PIXELS,
    ImageDecodeError,
    _draft_request,
    to_rgb_array,
)

UPLOAD_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF")
MAX_DECODED_PIXELS = 4096 * 4096  # what one upload may decode to: ~16.8 M pixels, 5x below PIL's limit
MAX_CONCURRENT_DECODES = 2
REDUCE_MARGIN = 2  # a box-reduced image keeps at least this many times the short side asked for
# Modes PIL cannot box-reduce, and the mode they are reduced in (16-bit goes back to 16-bit after, so the 8-bit
# scaling is the one training used).
_REDUCE_AS = {"1": "L", "P": "RGBA", "I;16": "I", "I;16B": "I", "I;16L": "I"}
_DECODES = threading.BoundedSemaphore(MAX_CONCURRENT_DECODES)


class ImageTooLarge(ImageDecodeError):
    """An upload whose pixels (not bytes) are over the limit."""


@dataclass(frozen=True)
class DecodedImage:
    image: np.ndarray  # HxWx3 uint8 RGB, reduced to the working size when a min_short_side was given
    size: tuple[int, int]  # (width, height) of the image as sent, after EXIF orientation


def decode_untrusted(data: bytes, min_short_side: int | None = None) -> DecodedImage:
    """``data`` (encoded image bytes) as RGB, refusing what would cost more than :data:`MAX_DECODED_PIXELS`.

    With ``min_short_side`` a JPEG is draft-decoded as :func:`transferkit.data.decode.load_image` does, and any
    image is then box-reduced to no less than REDUCE_MARGIN times that short side.
    """
    with _DECODES:
        try:
            with _open(data) as img:
                width, height = img.size
                if min_short_side and img.format == "JPEG":
                    img.draft("RGB", _draft_request(img.size, min_short_side))  # header only: sets the decode scale
                _check_pixels(img, (width, height))
                img.load()
                decoded = img.size
                ImageOps.exif_transpose(img, in_place=True)
                size = (height, width) if img.size != decoded else (width, height)
                return DecodedImage(to_rgb_array(_reduced(img, min_short_side)), size)
        except ImageDecodeError:
            raise
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            reason = "" if isinstance(exc, UnidentifiedImageError) else f" ({exc})"
            raise ImageDecodeError(f"the bytes sent are not an image transferkit can decode{reason}; send a JPEG, "
                                   "PNG, BMP, WebP or TIFF file") from exc


def _open(data: bytes) -> Image.Image:
    """The image's header, parsed by the plugins of :data:`UPLOAD_FORMATS` only; PIL's bomb warning silenced
    (:func:`_check_pixels` is far stricter)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)


def _check_pixels(img: Image.Image, stored: tuple[int, int]) -> None:
    """Refuse, from the header alone, an image that would decode to more than MAX_DECODED_PIXELS. A baseline JPEG
    counts at its draft size (libjpeg scales while decoding); a progressive one keeps full-size coefficient
    buffers, so it counts at its stored size like every other format."""
    width, height = stored
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
        raise ImageTooLarge(f"the image is {width}x{height} pixels, an aspect ratio above {MAX_ASPECT_RATIO}:1; "
                            "crop it")
    decoded = width * height if img.info.get("progressive") or width * height > MAX_PIXELS else img.width * img.height
    if decoded > MAX_DECODED_PIXELS:
        raise ImageTooLarge(f"the image is {width}x{height} pixels, above the {MAX_DECODED_PIXELS:,}-pixel limit for "
                            "images sent to a model; downscale it")


def _reduced(img: Image.Image, min_short_side: int | None) -> Image.Image:
    """``img`` box-reduced by the largest power of two (as the JPEG draft scales are) that keeps its short side
    >= REDUCE_MARGIN x min_short_side: its features then match the full image's to a mean cosine of ~0.999
    (``docs/benchmarks/serve.md``)."""
    ratio = min(img.size) / (REDUCE_MARGIN * min_short_side) if min_short_side else 1
    if ratio < 2:
        return img
    factor = 1 << int(math.log2(ratio))
    mode = img.mode
    reduced = img.convert(_REDUCE_AS.get(mode, mode)).reduce(factor)
    return reduced.convert(mode) if mode.startswith("I;16") else reduced
