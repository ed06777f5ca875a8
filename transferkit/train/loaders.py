"""Train and val loaders whose every random choice is a function of (seed, epoch, sample).

The sampler is torch's DistributedSampler (also for one process) or a seeded weighted sampler, reset per
epoch; each sample's augmentation is seeded from (seed, epoch, index). So an epoch sees the same images
in the same order with the same augmentations whether the run is fresh, resumed, split across ranks or
loaded by any number of workers — which is what makes resume and DDP reproduce a single run.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, Subset, TensorDataset, WeightedRandomSampler

from transferkit.core import distributed
from transferkit.data.dataset import make_loader


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` so the dataset can seed the sample's augmentation."""

    def __init__(self, base: Sampler, seed: int):
        self.base = base
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if isinstance(self.base, WeightedRandomSampler):
            self.base.generator.manual_seed(self.seed * 100_003 + epoch)
        else:
            self.base.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, int(i)) for i in self.base)

    def __len__(self) -> int:
        return len(self.base)


class SeededSamples(Dataset):
    """``dataset[i]`` with its augmentation reseeded from (seed, epoch, i) first."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.normalize = getattr(dataset, "normalize", None)  # uint8 batches: what the loader normalises with

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        reseed = getattr(self.dataset, "reseed", None)
        if reseed is not None:
            reseed(int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0]))
        return self.dataset[i]


def train_loader(dataset: Dataset, labels: np.ndarray, *, batch_size: int, seed: int, balance: str,
                 workers: int | None, device: torch.device):
    """``batch_size`` is per rank; the last incomplete batch is dropped (BatchNorm needs more than one image)."""
    if balance == "sampler":
        counts = np.bincount(labels)
        weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
        base = WeightedRandomSampler(weights, num_samples=len(labels), replacement=True, generator=torch.Generator())
    else:
        base = distributed.train_sampler(len(dataset), seed=seed)
    sampler = EpochSampler(base, seed)
    return make_loader(SeededSamples(dataset, seed), batch_size, sampler=sampler, workers=workers, device=device,
                       drop_last=len(sampler) > batch_size)


def val_loader(dataset: Dataset, *, batch_size: int, workers: int | None, device: torch.device):
    """This rank's strided share of ``dataset``, in order (see :func:`distributed.shard_indices`)."""
    shard = Subset(dataset, distributed.shard_indices(len(dataset)))
    return make_loader(shard, batch_size, workers=workers, device=device, normalize=getattr(dataset, "normalize", None))


def feature_dataset(features: np.ndarray, labels: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(features), torch.from_numpy(np.asarray(labels, dtype=np.int64)))
