"""torch Dataset and DataLoader over an index of image files."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .decode import load_image


class ImageDataset(Dataset):
    """Decodes ``paths`` and applies an albumentations ``transform``; yields ``(tensor, label)``.

    ``min_short_side`` lets large JPEGs be draft-decoded at no less than the size the transform needs.
    """

    def __init__(self, paths: Sequence, labels: Sequence[int] | None, transform: Callable,
                 min_short_side: int | None = None):
        self.paths = [os.fspath(p) for p in paths]
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.transform = transform
        self.min_short_side = min_short_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image = load_image(self.paths[i], self.min_short_side)
        return self.transform(image=image)["image"], self.labels[i]


def default_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool = False, workers: int | None = None,
                device: torch.device | str = "cpu", sampler=None, drop_last: bool = False,
                seed: int | None = None) -> DataLoader:
    """DataLoader with sensible defaults: workers from CPU count, persistent workers, pinned memory on GPU."""
    workers = default_workers() if workers is None else workers
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.device(device).type == "cuda",
        drop_last=drop_last,
        generator=generator,
    )
