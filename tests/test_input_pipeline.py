"""Fast input pipeline: JPEG draft decode, the decoded-image cache, ImageDataset / make_loader behaviour."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from transferkit.choices import CACHE_MODES
from transferkit.data.cache import DiskCache, MemoryCache, build_cache, decode_working, working_size
from transferkit.data.dataset import ImageDataset, make_loader
from transferkit.data.decode import image_size, load_image, load_scaled
from transferkit.errors import TransferkitError
from transferkit.models.preprocessing import Preprocessing

CONFIG = {"input_size": [3, 64, 64], "interpolation": "bicubic", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3],
          "crop_pct": 0.875, "crop_mode": "center"}
PRE = Preprocessing.resolve(CONFIG)
SHORT = PRE.decode_short_side  # 73


def _photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients and soft blobs: natural-image statistics, unlike noise, survive a downscale."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / width * 200, y / height * 200, (x + y) / (width + height) * 255], axis=-1)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0.05, 0.2) * width
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        image = image * (1 - blob) + rng.uniform(0, 255, 3) * blob
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture
def jpegs(tmp_path):
    paths = []
    for i, size in enumerate([(800, 600), (640, 960), (120, 90)]):
        path = tmp_path / "imgs" / f"img{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(_photo_like(*size, seed=i)).save(path, quality=95)
        paths.append(path)
    return paths


def test_draft_decode_is_close_to_full_decode_then_resize(jpegs):
    full = load_image(jpegs[0])
    draft = load_image(jpegs[0], SHORT)
    assert full.shape == (600, 800, 3)
    assert draft.shape[0] < full.shape[0] and min(draft.shape[:2]) >= SHORT  # DCT-domain downscale happened
    transform = PRE.eval_transform()
    a, b = (transform(im) for im in (full, draft))
    std = torch.tensor(CONFIG["std"]).view(3, 1, 1)
    pixel_error = ((a - b) * std * 255).abs()  # back in 0..255 units
    assert pixel_error.mean() < 2.0 and pixel_error.max() < 40
    assert load_image(jpegs[2], SHORT).shape == (90, 120, 3)  # half of it would be under SHORT: not drafted


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cache_returns_identical_arrays_and_hits_the_second_time(mode, jpegs, tmp_path):
    cache = build_cache(mode, folder=tmp_path / "cache")
    for path in jpegs:
        expected = decode_working(path, SHORT)
        assert min(expected.shape[:2]) == min(SHORT, *load_image(path).shape[:2])
        first, second = cache.get(path, SHORT), cache.get(path, SHORT)
        assert first.dtype == np.uint8 and np.array_equal(first, expected) and np.array_equal(second, expected)
    assert (cache.misses, cache.hits) == (3, 3)


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cache_invalidates_when_a_file_changes(mode, jpegs, tmp_path):
    cache = build_cache(mode, folder=tmp_path / "cache")
    path = jpegs[0]
    before = cache.get(path, SHORT)
    Image.fromarray(_photo_like(800, 600, seed=42)).save(path, quality=80)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # even on coarse-mtime file systems
    after = cache.get(path, SHORT)
    assert not np.array_equal(before, after)
    assert np.array_equal(after, decode_working(path, SHORT))
    assert cache.misses == 2


def test_disk_cache_is_shared_across_processes_and_workers(jpegs, tmp_path):
    folder = tmp_path / "cache"
    dataset = ImageDataset(jpegs * 2, [0] * 6, PRE.eval_transform(), min_short_side=SHORT,
                           cache=build_cache("disk", folder=folder))
    worker_batches = [x for x, _ in make_loader(dataset, 2, workers=2)]
    fresh = DiskCache(folder)  # a new process would start exactly like this
    for path in jpegs:
        fresh.get(path, SHORT)
    assert (fresh.misses, fresh.hits) == (0, 3)
    assert len(list(folder.rglob("*.npy"))) == 3 and not list(folder.rglob("*.tmp"))
    uncached = ImageDataset(jpegs * 2, [0] * 6, PRE.eval_transform(), min_short_side=SHORT)
    pixels = torch.stack([uncached[i][0] for i in range(6)])
    assert pixels.dtype == torch.uint8  # the workers' output; the loader normalises whole batches
    assert torch.allclose(torch.cat(worker_batches), PRE.normalize(pixels), atol=3 / 255 / min(CONFIG["std"]))


def test_cached_eval_pixels_match_uncached_in_crop_mode(jpegs, tmp_path):
    """The cache holds timm's first resize (sized from the full frame); the eval crop of it is the fused resize's
    result within 2 grey levels."""
    transform = PRE.eval_transform()
    plain = ImageDataset(jpegs, None, transform, min_short_side=SHORT)
    cached = ImageDataset(jpegs, None, transform, min_short_side=SHORT, cache=build_cache("memory"))
    for i in range(len(jpegs)):
        cached[i]  # fill
        pixels = cached[i][0]
        assert pixels.dtype == torch.uint8 and (plain[i][0].int() - pixels.int()).abs().max() <= 2
    assert cached.cache.hits == len(jpegs)


def test_memory_cache_is_bounded_and_callers_cannot_corrupt_it(jpegs):
    one = decode_working(jpegs[0], SHORT).nbytes
    cache = MemoryCache(max_bytes=int(one * 1.5))
    image = cache.get(jpegs[0], SHORT)
    image[:] = 0  # a transform writing in place
    assert np.array_equal(cache.get(jpegs[0], SHORT), decode_working(jpegs[0], SHORT))
    cache.get(jpegs[1], SHORT)  # evicts the first (least recently used)
    assert cache.nbytes <= cache.max_bytes and len(cache._entries) == 1
    cache.get(jpegs[0], SHORT)
    assert cache.misses == 3


class _BudgetProbe(torch.utils.data.Dataset):
    def __init__(self, cache):
        self.cache = cache

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return self.cache.process_budget()


def test_memory_budget_is_shared_by_the_loader_workers():
    cache = MemoryCache(max_bytes=1000)
    assert cache.process_budget() == 1000
    assert [int(b) for b in make_loader(_BudgetProbe(cache), 1, workers=2)] == [500, 500]


def test_disk_cache_recovers_from_a_damaged_entry(jpegs, tmp_path):
    cache = DiskCache(tmp_path / "cache")
    expected = cache.get(jpegs[0], SHORT)
    (entry,) = (tmp_path / "cache").rglob("*.npy")
    entry.write_bytes(b"not an array")
    assert np.array_equal(DiskCache(tmp_path / "cache").get(jpegs[0], SHORT), expected)


def test_build_cache_validates_its_arguments(tmp_path):
    assert CACHE_MODES == ("none", "memory", "disk")
    assert build_cache("none") is None
    with pytest.raises(TransferkitError, match="--cache 'ram'"):
        build_cache("ram")
    with pytest.raises(TransferkitError, match="interpolation"):
        build_cache("memory", interpolation="fancy")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TransferkitError, match="cannot create"):
        build_cache("disk", folder=blocker / "cache")


def test_workers_draw_different_augmentations_reproducibly(tmp_path):
    path = tmp_path / "one.png"
    Image.fromarray(_photo_like(96, 80)).save(path)
    dataset = ImageDataset([path] * 4, [0] * 4, PRE.train_transform("heavy"))

    def run():
        return [x for x, _ in make_loader(dataset, 1, workers=2, seed=3)]

    first = run()
    assert not torch.equal(first[0], first[1])  # worker 0 and worker 1 do not replay one random stream
    assert all(torch.equal(a, b) for a, b in zip(first, run()))


def test_make_loader_defaults_and_overrides(jpegs):
    dataset = ImageDataset(jpegs, [0, 1, 0], PRE.eval_transform())
    loader = make_loader(dataset, 2, workers=0)
    assert not loader.persistent_workers and not loader.pin_memory
    assert make_loader(dataset, 2, workers=1).persistent_workers
    assert not make_loader(dataset, 2, workers=1, persistent_workers=False).persistent_workers
    assert make_loader(dataset, 2, workers=0, pin_memory=True).pin_memory
    images, labels = next(iter(loader))
    assert images.shape == (2, 3, 64, 64) and labels.tolist() == [0, 1]


@pytest.mark.parametrize("workers", [0, 2])
def test_loaders_carry_uint8_and_hand_out_the_normalised_model_input(jpegs, workers):
    """Workers batch uint8 pixels; the loader normalises each batch (in this process, on the device), exactly as the
    transform normalises one image."""
    transform = PRE.eval_transform()
    dataset = ImageDataset(jpegs, [0, 1, 0], transform, min_short_side=SHORT)
    assert dataset[0][0].dtype == torch.uint8 and dataset.normalize is not None
    images, labels = next(iter(make_loader(dataset, 3, workers=workers)))
    assert images.dtype == torch.float32 and images.is_contiguous() and labels.tolist() == [0, 1, 0]
    assert torch.equal(images, torch.stack([transform(load_scaled(p, SHORT)) for p in jpegs]))
    assert torch.equal(images, PRE.normalize(torch.stack([dataset[i][0] for i in range(3)])))
    plain = ImageDataset(jpegs, [0, 1, 0], lambda image: {"image": torch.zeros(2)})  # not a Preprocessing transform
    assert plain.normalize is None and next(iter(make_loader(plain, 3, workers=0)))[0].shape == (3, 2)


def test_train_transform_pixels_are_the_uint8_of_its_output(jpegs):
    """Seeded, the train transform's pixels normalise to exactly its tensor (with and without a sized crop)."""
    for preset in ("none", "light"):
        transform = PRE.train_transform(preset)
        image = load_scaled(jpegs[0], SHORT)
        transform.set_random_seed(5)
        pixels = transform.pixels(image)
        transform.set_random_seed(5)
        assert pixels.dtype == torch.uint8 and torch.equal(PRE.normalize(pixels), transform(image))


def test_cache_describes_its_footprint(jpegs, tmp_path):
    memory = build_cache("memory", max_bytes=64 << 20)
    line = memory.describe(jpegs, SHORT)
    expected = sum(3 * w * h for w, h in (working_size(image_size(p), SHORT) for p in jpegs)) / 2**20
    assert line.startswith("--cache memory: ~") and f"~{expected:,.0f} MB for 3 images" in line and "budget 64 MB" in line
    disk = build_cache("disk", folder=tmp_path / "cache")
    assert "holds 0 entries" in disk.describe(jpegs, SHORT)
    for path in jpegs:
        disk.get(path, SHORT)
    assert "holds 3 entries" in disk.describe(jpegs, SHORT)
    assert working_size((1280, 960), 256) == (341, 256) and working_size((100, 90), 256) == (100, 90)


def test_dataset_batches_tta_views(jpegs):
    dataset = ImageDataset(jpegs, [0, 1, 0], PRE.tta_views("ten-crop"), min_short_side=SHORT)
    views, labels = next(iter(make_loader(dataset, 3, workers=0)))
    assert views.shape == (3, 10, 3, 64, 64) and labels.tolist() == [0, 1, 0]
