"""Frozen-backbone features: one feature loop shared by `extract`, `svm`, `data audit` and the linear probe.

A feature vector is :func:`transferkit.models.embedding.embed` of an image. :func:`extract_features` streams the vectors of a whole dataset to parquet or
npz in chunks, so memory stays flat as the dataset grows, and shards the images across ranks under torchrun.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transferkit import params
from transferkit.core.fileio import atomic_path
from transferkit.errors import TransferkitError
from transferkit.features.feature_file import FORMAT, SUFFIXES, feature_writer, is_up_to_date, read_metadata
from transferkit.models.embedding import build_feature_model, check_pool, embed, feature_dim, resolve_layer
from transferkit.version import __version__

if TYPE_CHECKING:
    import torch

    from transferkit.models.preprocessing import Preprocessing

CHUNK_ROWS = 1024


# --------------------------------------------------------------------------- the feature loop


def iter_features(model: torch.nn.Module, loader: Iterable, device: torch.device, *, amp: bool = True,
                  pool: str | None = None, layer: int | None = None, tta: str = "none",
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """THE feature loop: ``(vectors [b, D] float32, labels [b])`` per batch of ``loader``, in order."""
    import torch
    from tqdm.auto import tqdm

    from transferkit.core.runtime import autocast, to_device

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():  # a bar on a terminal only (disable=None), one per pass
            for images, labels in tqdm(loader, desc="features", unit="batch", disable=None, leave=False):
                with autocast(device, amp):
                    vectors = embed(model, to_device(images, device), pool=pool, layer=layer, tta=tta)
                yield vectors.float().cpu().numpy(), np.asarray(labels)
    finally:
        model.train(was_training)


def compute_features(model: torch.nn.Module, loader: Iterable, device: torch.device, amp: bool = True,
                     pool: str | None = None, *, layer: str | int | None = None, tta: str = "none",
                     ) -> tuple[np.ndarray, np.ndarray]:
    """All vectors of ``loader`` in memory (for the linear probe): ``(X [N, D] float32, labels [N])``.

    ``pool=None`` keeps the model's own pre-logits features; the model's head, if any, is not used.
    """
    layer_index = resolve_layer(model, layer)
    check_pool(model, pool, layer_index)
    chunks = list(iter_features(model, loader, device, amp=amp, pool=pool, layer=layer_index, tta=tta))
    if not chunks:
        return np.zeros((0, feature_dim(model, pool, layer_index)), np.float32), np.zeros(0, np.int64)
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


# --------------------------------------------------------------------------- extract to a file


def extract_features(backbone: str, data, out, *, weights=None, weights_config=None, pretrained: bool = True,
                     split: str = "all", pool: str = "avg", layer: str | int | None = None, tta: str = "none",
                     batch_size: int = 32, dtype: str = "float32", resize_mode: str | None = None,
                     workers: int | None = None, device: str = "auto", force: bool = False,
                     val_ratio: float = 0.2, seed: int = 0, chunk_rows: int = CHUNK_ROWS,
                     data_overrides: Mapping | None = None) -> Path:
    """Write one row per image (path, label, split, vector) to ``out`` (.parquet or .npz); returns ``out``.

    An existing ``out`` with the same metadata (backbone, weights, preprocessing, pooling, dataset
    fingerprint, ...) is reused unless ``force``; ``resize_mode`` None keeps the backbone's own crop mode, and
    ``data_overrides`` (e.g. ``img_size``) change its preprocessing as in :func:`~transferkit.models.backbones.load_backbone`.
    Under torchrun, ranks compute interleaved batches and rank 0 writes them in the single-process order, so
    the file is the same for any number of processes.
    """
    from transferkit.core import distributed
    from transferkit.core.runtime import prepare_model, select_device
    from transferkit.data import discover

    out = Path(out)
    _check_params(out, split=split, pool=pool, tta=tta, dtype=dtype, batch_size=batch_size, chunk_rows=chunk_rows,
                  resize_mode=resize_mode, workers=workers, val_ratio=val_ratio, seed=seed)
    _refuse_other_file(out)
    index = discover(data, val_ratio=val_ratio, seed=seed)
    samples = index.samples if split == "all" else index.split(split)
    if not samples:
        raise TransferkitError(f"split {split!r} of {data} has no images; available: {', '.join(index.splits)}")
    torch_device = select_device(device)
    with distributed.process_group(torch_device):
        model, preprocessing = build_feature_model(backbone, weights=weights, weights_config=weights_config,
                                                   pretrained=pretrained, resize_mode=resize_mode,
                                                   data_overrides=data_overrides)
        layer_index = resolve_layer(model, layer)
        check_pool(model, pool, layer_index)
        model = prepare_model(model, torch_device).eval()
        dim = feature_dim(model, pool, layer_index)
        metadata = _metadata(model, preprocessing, index, weights=weights, split=split, pool=pool, layer=layer,
                             tta=tta, dtype=dtype, dim=dim, rows=len(samples))
        if not force and distributed.broadcast_from_main(is_up_to_date(out, metadata)):
            return out
        rows = [(index.relpath(s), index.classes[s.label], s.label, s.split) for s in samples]
        loader_factory = _LoaderFactory(samples, preprocessing, batch_size, workers, torch_device)
        stream = _merged_batches(model, loader_factory, torch_device, dim, pool=pool, layer=layer_index, tta=tta)
        if distributed.is_main():
            with atomic_path(out) as tmp:
                with feature_writer(tmp, out.suffix, metadata, rows, chunk_rows) as sink:
                    for vectors in stream:
                        sink.add(vectors)
        else:
            for _ in stream:
                pass
        distributed.barrier()  # the file exists on return, on every rank
    return out


@dataclass
class _LoaderFactory:
    """A loader over one rank's batches: global batches rank, rank+W, rank+2W, ... in that order."""

    samples: list
    preprocessing: Preprocessing
    batch_size: int
    workers: int | None
    device: torch.device

    @property
    def num_batches(self) -> int:
        return math.ceil(len(self.samples) / self.batch_size)

    def loader(self, rank: int, world: int):
        from transferkit.data.dataset import ImageDataset, make_loader

        size = self.batch_size
        mine = [s for b in range(rank, self.num_batches, world) for s in self.samples[b * size:(b + 1) * size]]
        dataset = ImageDataset([s.path for s in mine], [s.label for s in mine], self.preprocessing.eval_transform(),
                               min_short_side=self.preprocessing.decode_short_side)
        workers = 0 if len(mine) <= size else self.workers  # one batch gains nothing from worker start-up
        return make_loader(dataset, size, workers=workers, device=self.device)


def _merged_batches(model, factory: _LoaderFactory, device, dim: int, **embed_kwargs) -> Iterator[np.ndarray]:
    """Vectors of every global batch in order; on one process simply the feature loop."""
    from transferkit.core import distributed

    rank, world = distributed.rank(), distributed.world_size()
    stream = iter_features(model, factory.loader(rank, world), device, **embed_kwargs)
    for _ in range(math.ceil(factory.num_batches / world)):
        mine = next(stream, None)
        for block in distributed.gather_rows(None if mine is None else mine[0], factory.batch_size, dim, device):
            if len(block):
                yield block


def _metadata(model, preprocessing, index, *, weights, split, pool, layer, tta, dtype, dim, rows) -> dict:
    from transferkit.models.backbones import backbone_identity

    identity = backbone_identity(model)
    return {
        "format": FORMAT,
        "backbone": identity["backbone"],
        "model_kwargs": identity["model_kwargs"],
        "weights": identity["weights"],
        "weights_file": str(Path(weights).resolve()) if weights else None,
        **preprocessing.to_metadata(),
        "pool": pool,
        "layer": None if layer is None else str(layer),
        "tta": tta,
        "feature_dim": dim,
        "dtype": dtype,
        "split": split,
        "class_names": list(index.classes),
        "rows": rows,
        "dataset": {"root": str(index.root.resolve()), "layout": index.layout, "fingerprint": index.fingerprint()},
        "transferkit_version": __version__,
    }


_PARAMETER_CONSTRAINTS = {
    "split": params.FEATURE_SPLIT, "pool": params.POOL, "tta": params.FEATURE_TTA, "dtype": params.FEATURE_DTYPE,
    "batch_size": params.BATCH_SIZE, "chunk_rows": params.Interval(int, 1, None), "resize_mode": params.RESIZE_MODE,
    "workers": params.WORKERS.allowing(None), "val_ratio": params.VAL_RATIO, "seed": params.SEED,
}


def _refuse_other_file(out: Path) -> None:
    """An existing ``out`` is replaced only when it is a features file (issue 24: never a user's parquet)."""
    if out.exists() or out.is_symlink():
        try:
            read_metadata(out)
        except TransferkitError:
            raise TransferkitError(f"--out {out} already exists and is not a features file; extract never replaces "
                                   "other files: choose another --out") from None


def _check_params(out: Path, **values) -> None:
    """Every argument before minutes of extraction, with the messages the CLI flags give."""
    if out.suffix not in SUFFIXES:
        raise TransferkitError(f"--out {out} must end in .parquet or .npz")
    params.check_params("", _PARAMETER_CONSTRAINTS, values)
