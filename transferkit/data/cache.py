"""Decoded-image cache: each image is decoded once at the working resolution and reused every later epoch.

The working resolution is the ``min_short_side`` the dataset asks for (a
:class:`~transferkit.models.preprocessing.Preprocessing`'s ``decode_short_side``): the image is draft-decoded,
then brought down to exactly that shorter side (the longer one as timm's resize computes it from the full-resolution
frame) with the backbone's interpolation and the same antialiased PIL resize the eval transform uses. Entries are
uint8 HWC at that working resolution (a 1280x960 frame for a 224 crop: 341x256x3, 262 KB);
:meth:`DecodedImageCache.describe` states what a run's images will take, which ``finetune`` prints at its start. In ``--resize-mode crop`` (square input) the eval transform's own resize is
then a no-op, so cached and uncached eval tensors are byte-for-byte equal; in squash/letterbox the
extra downscale changes pixels slightly, so keep validation uncached there if exact parity matters.

Entries are keyed by the file's content digest (recomputed only when its size / mtime / inode
change) plus the working size and interpolation, so an edited file is never served stale.

- ``memory``: an LRU bounded by bytes, private to each process. ``max_bytes`` is the budget of the
  whole DataLoader: each of its N worker processes keeps at most ``max_bytes / N``. Persistent
  workers keep their part between epochs; with ``shuffle`` a sample may land on another worker, so
  later epochs warm up gradually. Prefer ``disk`` for shuffled multi-worker training.
- ``disk``: one ``.npy`` per image under a cache folder, written atomically; shared by all worker
  processes and later runs through the OS page cache.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import psutil
from torch.utils.data import get_worker_info

from transferkit import params
from transferkit.core.fileio import atomic_path, ensure_writable_dir
from transferkit.data.decode import image_size, load_scaled
from transferkit.errors import TransferkitError

RESIZER = "pil-full-frame"  # part of the key: entries of an earlier resize (cv2; PIL sized from the draft) are not served
FOOTPRINT_SAMPLE = 64  # headers read to estimate a run's cache footprint
DEFAULT_MAX_BYTES = min(4 << 30, psutil.virtual_memory().total // 4)  # memory cache, all workers together


def default_cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "transferkit" / "decoded"


def build_cache(mode: str, folder: str | os.PathLike | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                interpolation: str = "bicubic") -> DecodedImageCache | None:
    """``--cache none|memory|disk`` → a cache for :class:`ImageDataset` (None for 'none').

    ``interpolation`` should be the backbone's (``data_config['interpolation']``).
    """
    params.CACHE_MODE.check("--cache", mode)
    params.INTERPOLATION.check("interpolation", interpolation)
    if mode == "memory":
        if max_bytes <= 0:
            raise TransferkitError(f"memory cache max_bytes must be positive, got {max_bytes}")
        return MemoryCache(max_bytes, interpolation)
    if mode == "disk":
        return DiskCache(folder or default_cache_folder(), interpolation)
    return None


def decode_working(path: str | os.PathLike, short_side: int | None, interpolation: str = "bicubic") -> np.ndarray:
    """Draft-decode ``path`` and shrink it to exactly ``short_side`` (never enlarge), with the same
    resize as timm's eval transform (torchvision on PIL, antialiased)."""
    image, full_size, _ = load_scaled(path, short_side)
    if short_side and min(image.size) > short_side:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.functional import pil_modes_mapping

        image = image.resize(working_size(full_size, short_side), pil_modes_mapping[InterpolationMode(interpolation)])
    return np.array(image)


def working_size(full_size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """(width, height) of a ``full_size`` frame with its shorter side at ``short_side`` (never enlarged), the longer
    side rounded as torchvision's ``Resize(short_side)`` does."""
    width, height = full_size
    if min(width, height) <= short_side:
        return width, height
    long = int(short_side * max(width, height) / min(width, height))
    return (short_side, long) if width <= height else (long, short_side)


class DecodedImageCache:
    """``get(path, short_side)`` returns the working-resolution image, decoding it on a miss."""

    def __init__(self, interpolation: str = "bicubic"):
        self.interpolation = interpolation
        self._digests: dict[str, tuple[tuple, str]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, path: str | os.PathLike, short_side: int | None) -> np.ndarray:
        key = self.key(path, short_side)
        image = self._read(key)
        if image is None:
            self.misses += 1
            image = decode_working(path, short_side, self.interpolation)
            self._write(key, image)
        else:
            self.hits += 1
        return image

    def describe(self, paths: list, short_side: int | None) -> str:
        """One line for the start of a run: what caching ``paths`` will hold (estimated from up to
        :data:`FOOTPRINT_SAMPLE` headers) and, per kind, the budget or what the folder holds already."""
        return f"--cache {self.kind}: {_estimate(paths, short_side)}; {self._state()}"

    def _state(self) -> str:
        raise NotImplementedError

    def key(self, path: str | os.PathLike, short_side: int | None) -> str:
        """Content digest + working size + interpolation; the digest is redone only when the file's stat changes."""
        path = os.fspath(path)
        st = os.stat(path)
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        known = self._digests.get(path)
        if known is None or known[0] != stamp:
            with open(path, "rb") as fh:
                known = (stamp, hashlib.blake2b(fh.read(), digest_size=16).hexdigest())
            self._digests[path] = known
        return f"{known[1]}-{short_side or 0}-{self.interpolation}-{RESIZER}"

    def _read(self, key: str) -> np.ndarray | None:
        raise NotImplementedError

    def _write(self, key: str, image: np.ndarray) -> None:
        raise NotImplementedError


def _estimate(paths: list, short_side: int | None) -> str:
    """``~N MB for K images at working resolution (uint8, short side S)``, from a spread sample of headers."""
    if not paths:
        return "no images"
    step = max(1, len(paths) // FOOTPRINT_SAMPLE)
    sample = paths[::step][:FOOTPRINT_SAMPLE]
    sizes = []
    for path in sample:
        try:
            sizes.append(working_size(image_size(path), short_side) if short_side else image_size(path))
        except OSError:  # unreadable files are reported by the image check, not here
            continue
    mean_bytes = sum(3 * w * h for w, h in sizes) / max(1, len(sizes))
    return (f"~{mean_bytes * len(paths) / 2**20:,.0f} MB for {len(paths)} images at working resolution "
            f"(uint8, short side {short_side or 'as stored'})")


class MemoryCache(DecodedImageCache):
    """Least-recently-used arrays, this process's share of ``max_bytes`` (split evenly over DataLoader workers)."""

    kind = "memory"

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, interpolation: str = "bicubic"):
        super().__init__(interpolation)
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()

    def _read(self, key):
        image = self._entries.get(key)
        if image is None:
            return None
        self._entries.move_to_end(key)
        return image.copy()  # callers may transform in place; the cached pixels must not change

    def _state(self) -> str:
        return f"budget {self.max_bytes / 2**20:,.0f} MB over all loader workers (least recently used beyond it)"

    def process_budget(self) -> int:
        worker = get_worker_info()
        return self.max_bytes // worker.num_workers if worker is not None else self.max_bytes

    def _write(self, key, image):
        budget = self.process_budget()
        if image.nbytes > budget:
            return
        self._entries[key] = image.copy()
        self.nbytes += image.nbytes
        while self.nbytes > budget:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes


class DiskCache(DecodedImageCache):
    """``<folder>/<ab>/<key>.npy``, written atomically so concurrent workers never read half a file."""

    kind = "disk"

    def __init__(self, folder: str | os.PathLike, interpolation: str = "bicubic"):
        super().__init__(interpolation)
        self.folder = ensure_writable_dir(Path(folder).expanduser())

    def _state(self) -> str:
        entries = [entry.stat().st_size for entry in self.folder.glob("??/*.npy")]
        return f"{self.folder} holds {len(entries)} entries, {sum(entries) / 2**20:,.0f} MB"

    def _entry(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"

    def _read(self, key):
        entry = self._entry(key)
        try:
            return np.load(entry, allow_pickle=False)
        except (OSError, ValueError):  # absent, or unreadable: decode again and overwrite it
            return None

    def _write(self, key, image):
        entry = self._entry(key)
        entry.parent.mkdir(exist_ok=True)
        with atomic_path(entry) as tmp, open(tmp, "wb") as fh:
            np.save(fh, image, allow_pickle=False)
