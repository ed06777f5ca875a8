"""torch Dataset and DataLoader over an index of image files."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from transferkit.core.runtime import to_device
from transferkit.data.cache import DecodedImageCache
from transferkit.data.decode import load_scaled
from transferkit.errors import TransferkitError


class ImageDataset(Dataset):
    """Decodes ``paths`` and applies ``transform``; yields ``(tensor, label)``.

    ``transform`` is an albumentations pipeline (called as ``transform(image=...)["image"]``) or a
    callable ``transform(image=...)`` returning the tensor itself, such as the transforms of
    :class:`transferkit.models.preprocessing.Preprocessing`. Those have ``pixels``: the dataset then yields
    their uint8 ``(3, H, W)`` pixels, and :attr:`normalize` (the transform's) is what :func:`make_loader`
    applies to each batch once it is on the device. ``min_short_side`` lets large JPEGs be draft-decoded at no
    less than the size the transform needs (its ``decode_short_side``); ``cache``
    (:func:`transferkit.data.cache.build_cache`) keeps them decoded at that size for later epochs.
    """

    def __init__(self, paths: Sequence, labels: Sequence[int] | None, transform: Callable,
                 min_short_side: int | None = None, cache: DecodedImageCache | None = None):
        self.paths = [os.fspath(p) for p in paths]
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.transform = transform
        self.min_short_side = min_short_side
        self.cache = cache
        self._pixels = getattr(transform, "pixels", None)
        self.normalize = getattr(transform, "normalize", None) if self._pixels is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        if self.cache is not None:
            image = self.cache.get(path, self.min_short_side)
        else:  # a draft decode keeps its place in the full frame, for the eval geometry
            image = load_scaled(path, self.min_short_side)
            image = image if self._pixels is not None else image.array()
        return (self._pixels(image) if self._pixels is not None else apply_transform(self.transform, image)), self.labels[i]

    def reseed(self, seed: int) -> None:
        """Give the augmentation its own random stream (albumentations keeps one per pipeline object)."""
        set_seed = getattr(self.transform, "set_random_seed", None)
        if set_seed is not None:
            set_seed(seed % 2**32)


def default_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool = False, workers: int | None = None,
                device: torch.device | str = "cpu", sampler=None, drop_last: bool = False,
                seed: int | None = None, persistent_workers: bool | None = None,
                pin_memory: bool | None = None, normalize: Callable | None = None) -> DataLoader:
    """DataLoader with sensible defaults: workers from CPU count, persistent workers, pinned memory on GPU.

    Each worker reseeds the dataset's augmentation from torch's per-worker seed: albumentations
    pipelines carry their own generator, which forked workers would otherwise all copy and replay.
    With ``normalize`` (default: the dataset's, see :class:`ImageDataset`) uint8 image batches come out as the
    model's input on ``device`` (:class:`ModelInputLoader`).
    """
    workers = default_workers() if workers is None else workers
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    if workers == 0 and seed is not None and hasattr(dataset, "reseed"):
        dataset.reseed(seed)
    return ModelInputLoader(
        dataset,
        normalize=getattr(dataset, "normalize", None) if normalize is None else normalize,
        device=device,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=(workers > 0) if persistent_workers is None else (persistent_workers and workers > 0),
        pin_memory=(torch.device(device).type == "cuda") if pin_memory is None else pin_memory,
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=_reseed_worker if workers > 0 else None,
    )


class ModelInputLoader(DataLoader):
    """A DataLoader whose uint8 image batches leave it as the model's input: moved to ``device`` as uint8 (pinned
    and non-blocking on a GPU: a quarter of float32's bytes over PCIe), converted and normalised there by
    ``normalize``, channels_last on a GPU (:func:`transferkit.core.runtime.to_device`). Other batches pass as
    they are."""

    def __init__(self, *args, normalize: Callable | None = None, device: torch.device | str = "cpu", **kwargs):
        super().__init__(*args, **kwargs)
        self.normalize = normalize
        self.device = torch.device(device)

    def __iter__(self):
        batches = super().__iter__()
        return batches if self.normalize is None else map(self._model_input, batches)

    def _model_input(self, batch):
        images, *rest = batch
        if isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
            images = to_device(images, self.device, self.normalize)
        return [images, *rest]


def _reseed_worker(worker_id: int) -> None:
    reseed = getattr(get_worker_info().dataset, "reseed", None)
    if reseed is not None:
        reseed(torch.initial_seed())


def preprocessed_batches(images: Sequence, transform: Callable, batch_size: int,
                         min_short_side: int | None = None) -> Iterator[torch.Tensor]:
    """Image paths or HxWx3 uint8 RGB arrays → batches of preprocessed tensors, in order, in this process.

    For in-memory inputs (a notebook, the MLflow model) where a DataLoader's workers do not pay off. A transform
    with ``pixels`` is normalised once per batch (the same numbers as image by image).
    """
    pixels = getattr(transform, "pixels", None)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        decoded = [load_scaled(im, min_short_side) if isinstance(im, (str, os.PathLike)) else as_rgb_array(im)
                   for im in chunk]
        if pixels is not None:
            yield transform.normalize(torch.stack([pixels(im) for im in decoded]))
        else:
            yield torch.stack([apply_transform(transform, im.array() if hasattr(im, "array") else im) for im in decoded])


def apply_transform(transform: Callable, image: np.ndarray) -> torch.Tensor:
    """``transform(image=...)``: an albumentations pipeline (returns a dict) or a Preprocessing transform (a tensor)."""
    out = transform(image=image)
    return out["image"] if isinstance(out, Mapping) else out


def as_rgb_array(image) -> np.ndarray:
    """An in-memory image, checked rather than silently cast: a float or grayscale array is a caller's mistake."""
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise TransferkitError(f"images must be paths or HxWx3 uint8 RGB arrays, got an array {array.dtype} {array.shape}")
    return np.ascontiguousarray(array)
