"""Decoding bytes from someone else (`serve` uploads, the MLflow model's requests) within pixel bounds (issue 24)."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from transferkit.data import untrusted
from transferkit.data.decode import load_image
from transferkit.data.untrusted import MAX_DECODED_PIXELS, ImageTooLarge, decode_untrusted


def _encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_small_images_decode_exactly_as_training_does(tmp_path):
    rng = np.random.default_rng(0)
    for image in (Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)),
                  Image.fromarray(rng.integers(0, 65535, (30, 40), dtype=np.uint16)),  # 16-bit grey
                  Image.new("P", (40, 30), 3)):
        data = _encode(image)
        decoded = decode_untrusted(data, min_short_side=64)
        np.testing.assert_array_equal(decoded.image, load_image(io.BytesIO(data)))
        assert decoded.size == (40, 30)


def test_bit_depth_bomb_is_refused_from_its_header_alone():
    bomb = _encode(Image.new("1", (9000, 9000)))  # 9.9 KB, 81 M pixels
    started = time.perf_counter()
    with pytest.raises(ImageTooLarge, match="9000x9000 pixels, above the 16,777,216-pixel limit"):
        decode_untrusted(bomb, min_short_side=256)
    assert time.perf_counter() - started < 0.5  # nothing was decoded
    with pytest.raises(ImageTooLarge, match="aspect ratio above 20:1"):
        decode_untrusted(_encode(Image.new("L", (30000, 10))))


def test_large_images_are_reduced_to_the_working_size():
    near = decode_untrusted(_encode(Image.new("1", (4000, 3000), 1)), min_short_side=100)
    assert near.size == (4000, 3000) and near.image.shape == (375, 500, 3)  # box-reduced by 8: short side >= 200
    assert near.image.min() == 255  # white stays white through the reduce
    deep = np.full((1600, 1200), 65535 // 2, np.uint16)
    reduced = decode_untrusted(_encode(Image.fromarray(deep)), min_short_side=100)
    assert reduced.image.shape == (400, 300, 3) and int(reduced.image[0, 0, 0]) == 127  # 16-bit scaling as in training


def test_a_baseline_jpeg_passes_at_its_draft_size_a_progressive_one_does_not():
    photo = Image.linear_gradient("L").convert("RGB").resize((6000, 4000))  # 24 M pixels: over the limit as stored
    baseline = decode_untrusted(_encode(photo, "JPEG"), min_short_side=256)
    assert baseline.size == (6000, 4000) and min(baseline.image.shape[:2]) >= 1.5 * 256
    assert baseline.image.size < MAX_DECODED_PIXELS  # decoded at 1/8 scale
    with pytest.raises(ImageTooLarge, match="6000x4000"):  # full-size coefficient buffers: counted at full size
        decode_untrusted(_encode(photo, "JPEG", progressive=True), min_short_side=256)
    with pytest.raises(ImageTooLarge):  # no working size: decoded at full size
        decode_untrusted(_encode(photo, "JPEG"))


def test_only_training_formats_are_parsed():
    for data in (b"GIF89a" + bytes(40), b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", b"8BPS" + bytes(40),
                 b"just text", b""):
        with pytest.raises(untrusted.ImageDecodeError, match="not an image transferkit can decode; send a JPEG"):
            decode_untrusted(data)
    truncated = _encode(Image.new("RGB", (64, 64), (200, 10, 10)), "JPEG")[:-300]
    with pytest.raises(untrusted.ImageDecodeError, match="not an image transferkit can decode \\("):
        decode_untrusted(truncated)


def test_exif_rotated_size_is_the_size_as_shown():
    image = Image.new("RGB", (60, 40), (10, 200, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90
    decoded = decode_untrusted(_encode(image, "JPEG", exif=exif))
    assert decoded.size == (40, 60) and decoded.image.shape[:2] == (60, 40)


def test_at_most_max_concurrent_decodes_run_at_once(monkeypatch):
    running, peak, lock = 0, 0, threading.Lock()
    real = untrusted.to_rgb_array

    def slow_to_rgb(image):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return real(image)

    monkeypatch.setattr(untrusted, "to_rgb_array", slow_to_rgb)
    data = _encode(Image.new("RGB", (32, 32)))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: decode_untrusted(data), range(16)))
    assert peak == untrusted.MAX_CONCURRENT_DECODES
