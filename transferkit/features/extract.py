"""Frozen-backbone features: one forward loop shared by `extract`, the SVM model and the linear probe.

A feature vector is the backbone's pre-logits output (timm's ``forward_features`` + ``forward_head(
pre_logits=True)``), or timm's global pooling of ``forward_features`` / of an intermediate feature map
(``forward_intermediates``) when another pooling or ``layer`` is asked for; ``tta='hflip'`` averages it
with the mirrored image's. :func:`extract_features` streams the vectors of a whole dataset to parquet or
npz in chunks, so memory stays flat as the dataset grows, and shards the images across ranks under torchrun.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transferkit import __version__
from transferkit.choices import (
    FEATURE_DTYPES,
    FEATURE_SPLITS,
    FEATURE_TTA_MODES,
    POOLS,
    RESIZE_MODES,
    check_choice,
)
from transferkit.core.fileio import atomic_path
from transferkit.errors import TransferkitError

if TYPE_CHECKING:
    import torch

    from transferkit.models.preprocessing import Preprocessing

FORMAT = "transferkit-features"
SUFFIXES = (".parquet", ".npz")
METADATA_KEY = "transferkit"
CHUNK_ROWS = 1024
# What makes two sets of vectors comparable: a model trained on one can score the other.
IDENTITY_KEYS = ("backbone", "model_kwargs", "weights", "preprocessing", "pool", "layer", "tta", "feature_dim")


# --------------------------------------------------------------------------- the forward pass


def embed(model: torch.nn.Module, batch: torch.Tensor, *, pool: str | None = None, layer: int | None = None,
          tta: str = "none") -> torch.Tensor:
    """``[B, D]`` vectors for a preprocessed batch; ``layer`` is an index into ``model.feature_info``."""
    vectors = _pooled(model, batch, pool, layer)
    if tta == "hflip":
        vectors = (vectors + _pooled(model, batch.flip(-1), pool, layer)) / 2
    return vectors


def _pooled(model, batch, pool, layer):
    if layer is not None:
        (feature_map,) = model.forward_intermediates(batch, indices=[layer], intermediates_only=True, stop_early=True)
        return _global_pool(model, feature_map, pool or "avg")
    features = model.forward_features(batch)
    if pool is None or pool == own_pool(model):
        return model.forward_head(features, pre_logits=True)
    return _global_pool(model, features, pool)


def _global_pool(model, features: torch.Tensor, pool: str) -> torch.Tensor:
    """timm's own pooling: SelectAdaptivePool2d for NCHW maps, global_pool_nlc for token sequences."""
    from timm.layers import SelectAdaptivePool2d
    from timm.models.vision_transformer import global_pool_nlc

    if features.dim() == 3:
        return global_pool_nlc(features, pool_type=pool, num_prefix_tokens=getattr(model, "num_prefix_tokens", 0))
    return SelectAdaptivePool2d(pool_type=pool, flatten=True)(features)


def own_pool(model: torch.nn.Module) -> str | None:
    """The pooling the model's head uses (``avg`` for CNNs, ``token`` for most ViTs)."""
    pool = getattr(model, "global_pool", None) or getattr(getattr(model, "head", None), "global_pool", None)
    return pool if isinstance(pool, str) else getattr(pool, "pool_type", None)


def resolve_layer(model: torch.nn.Module, layer: str | int | None) -> int | None:
    """A feature_info module name (``blocks.3``) or index → the index forward_intermediates takes."""
    if layer is None:
        return None
    names = [info["module"] for info in getattr(model, "feature_info", [])]
    if str(layer) in names:
        return names.index(str(layer))
    if str(layer).lstrip("-").isdigit() and -len(names) <= int(layer) < len(names):
        return int(layer) % len(names)
    raise TransferkitError(f"unknown layer {layer!r} for this backbone; use one of {', '.join(names) or '(none)'}")


def check_pool(model: torch.nn.Module, pool: str | None, layer: int | None) -> None:
    if pool is not None:
        check_choice("pool", pool, POOLS)
    if pool == "token" and (layer is not None or not getattr(model, "num_prefix_tokens", 0)):
        raise TransferkitError("pool 'token' needs a backbone with a class token (a ViT) and no --layer; use avg")


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


def feature_dim(model: torch.nn.Module, pool: str | None, layer: int | None, tta: str = "none") -> int:
    """Vector length, found by one forward of a blank image (cheap, and right for every timm family)."""
    import torch

    _, height, width = model.pretrained_cfg.get("input_size", (3, 224, 224))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        dim = embed(model, torch.zeros(1, 3, height, width, device=device), pool=pool, layer=layer, tta=tta).shape[1]
    model.train(was_training)
    return int(dim)


def build_feature_model(backbone: str, *, weights=None, weights_config=None, pretrained: bool = True,
                        data_overrides: Mapping | None = None, resize_mode: str | None = None, **model_kwargs):
    """The backbone without classifier (``num_classes=0``) and its :class:`Preprocessing`."""
    from transferkit.models.backbones import load_backbone

    return load_backbone(backbone, weights=weights, num_classes=0, pretrained=pretrained, weights_config=weights_config,
                         data_overrides=data_overrides, resize_mode=resize_mode, **model_kwargs)


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
    _check_choices(out=out, split=split, pool=pool, tta=tta, dtype=dtype, batch_size=batch_size,
                   chunk_rows=chunk_rows, resize_mode=resize_mode)
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
                sink = (_ParquetSink if out.suffix == ".parquet" else _NpzSink)(tmp, metadata, rows, chunk_rows)
                with sink:
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


def _check_choices(*, out: Path, split, pool, tta, dtype, batch_size, chunk_rows, resize_mode) -> None:
    if out.suffix not in SUFFIXES:
        raise TransferkitError(f"--out {out} must end in .parquet or .npz")
    for name, value, allowed in (("split", split, FEATURE_SPLITS), ("pool", pool, POOLS), ("tta", tta, FEATURE_TTA_MODES),
                                 ("dtype", dtype, FEATURE_DTYPES), ("resize mode", resize_mode, RESIZE_MODES)):
        if value is not None or name != "resize mode":  # no resize mode: the backbone's own
            check_choice(name, value, allowed)
    for name, value in (("batch size", batch_size), ("chunk rows", chunk_rows)):
        if int(value) < 1:
            raise TransferkitError(f"{name} must be at least 1, got {value}")


def is_up_to_date(out: Path, metadata: Mapping) -> bool:
    """True when ``out`` exists and was written from the same inputs (its metadata equals ``metadata``)."""
    if not out.is_file() or metadata["weights"] == "random-init":
        return False
    try:
        existing = read_metadata(out)
    except TransferkitError:
        return False
    return existing == json.loads(json.dumps(metadata))


# --------------------------------------------------------------------------- file formats


class _Sink:
    """Buffers vectors to ``chunk_rows`` and hands each chunk, with its rows, to ``_write``."""

    def __init__(self, path: Path, metadata: Mapping, rows: list[tuple], chunk_rows: int):
        self.path, self.metadata, self.rows, self.chunk_rows = path, dict(metadata), rows, chunk_rows
        self.dtype = np.dtype(metadata["dtype"])
        self.written = 0
        self.buffer: list[np.ndarray] = []

    def add(self, vectors: np.ndarray) -> None:
        self.buffer.append(vectors)
        if sum(len(b) for b in self.buffer) >= self.chunk_rows:
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            vectors = np.concatenate(self.buffer).astype(self.dtype, copy=False)
            self.buffer = []
            self._write(self.rows[self.written:self.written + len(vectors)], vectors)
            self.written += len(vectors)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self._flush()
            if self.written != len(self.rows):
                raise RuntimeError(f"wrote {self.written} feature rows for {len(self.rows)} images")
        self._close()

    def _write(self, rows: list[tuple], vectors: np.ndarray) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


class _ParquetSink(_Sink):
    """One parquet row group per chunk; the metadata JSON lives in the schema metadata."""

    def __init__(self, *args):
        import pyarrow as pa
        import pyarrow.parquet as pq

        super().__init__(*args)
        self.schema = pa.schema(
            [("path", pa.string()), ("label", pa.string()), ("label_index", pa.int32()), ("split", pa.string()),
             ("features", pa.list_(pa.from_numpy_dtype(self.dtype), self.metadata["feature_dim"]))],
            metadata={METADATA_KEY: json.dumps(self.metadata)},
        )
        self.writer = pq.ParquetWriter(self.path, self.schema)

    def _write(self, rows, vectors):
        import pyarrow as pa

        paths, labels, label_index, splits = zip(*rows)
        features = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
        table = pa.Table.from_arrays([pa.array(paths), pa.array(labels), pa.array(label_index, pa.int32()),
                                      pa.array(splits), features], schema=self.schema)
        self.writer.write_table(table, row_group_size=len(rows))

    def _close(self):
        self.writer.close()


class _NpzSink(_Sink):
    """A plain ``np.savez`` layout, but ``features.npy`` is streamed into the zip entry chunk by chunk."""

    def __init__(self, *args):
        super().__init__(*args)
        self.zip = zipfile.ZipFile(self.path, "w", allowZip64=True)
        self.entry = self.zip.open("features.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (len(self.rows), self.metadata["feature_dim"])}
        np.lib.format.write_array_header_2_0(self.entry, header)

    def _write(self, rows, vectors):
        self.entry.write(np.ascontiguousarray(vectors).tobytes())

    def _close(self):
        self.entry.close()
        paths, labels, label_index, splits = zip(*self.rows) if self.rows else ((),) * 4
        arrays = {"path": np.array(paths, dtype=str), "label": np.array(labels, dtype=str),
                  "label_index": np.array(label_index, dtype=np.int32), "split": np.array(splits, dtype=str),
                  "metadata": np.array(json.dumps(self.metadata))}
        for name, array in arrays.items():
            with self.zip.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, array, allow_pickle=False)
        self.zip.close()


@dataclass
class FeatureTable:
    """Rows of a features file: relative paths, class names and indices, splits and the ``[N, D]`` vectors."""

    paths: np.ndarray
    labels: np.ndarray
    label_index: np.ndarray
    splits: np.ndarray
    vectors: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, split: str) -> FeatureTable:
        keep = self.splits == split
        return FeatureTable(self.paths[keep], self.labels[keep], self.label_index[keep], self.splits[keep],
                            self.vectors[keep])


def read_features(path: str | os.PathLike) -> tuple[FeatureTable, dict]:
    """``(table, metadata)`` of a file written by :func:`extract_features`; vectors as float32."""
    path = Path(path)
    metadata = read_metadata(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        features = table.column("features").combine_chunks()
        vectors = features.flatten().to_numpy(zero_copy_only=False).reshape(len(table), -1)
        columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in ("path", "label", "split")}
        label_index = table.column("label_index").to_numpy()
    else:
        with np.load(path, allow_pickle=False) as npz:
            vectors, label_index = npz["features"], npz["label_index"]
            columns = {name: npz[name] for name in ("path", "label", "split")}
    vectors = vectors.reshape(len(label_index), metadata["feature_dim"]).astype(np.float32, copy=False)
    table = FeatureTable(columns["path"].astype(str), columns["label"].astype(str), label_index.astype(np.int64),
                         columns["split"].astype(str), vectors)
    return table, metadata


def read_metadata(path: str | os.PathLike) -> dict:
    """Only the metadata (cheap: no vectors are read)."""
    path = Path(path)
    if not path.is_file():
        raise TransferkitError(f"features file {path} does not exist; create it with `transferkit extract`")
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY.encode())
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                raw = str(npz["metadata"]) if "metadata" in npz.files else None
        else:
            raise TransferkitError(f"{path} is not a features file; expected .parquet or .npz from `transferkit extract`")
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise TransferkitError(f"cannot read features file {path}: {exc}") from exc
    metadata = json.loads(raw) if raw else {}
    if metadata.get("format") != FORMAT:
        raise TransferkitError(f"{path} was not written by `transferkit extract` (no transferkit metadata)")
    return metadata


def feature_identity(metadata: Mapping) -> dict:
    from transferkit.models.preprocessing import Preprocessing

    return {**{key: metadata.get(key) for key in IDENTITY_KEYS}, **Preprocessing.from_metadata(metadata).to_metadata()}


def check_same_features(expected: Mapping, found: Mapping, found_name: str) -> None:
    """Refuse vectors made by another backbone, weights, preprocessing or pooling than ``expected``."""
    differ = [key for key in IDENTITY_KEYS if json.dumps(expected.get(key)) != json.dumps(found.get(key))]
    if differ:
        details = "; ".join(f"{key}: {found.get(key)!r} vs expected {expected.get(key)!r}" for key in differ[:3])
        raise TransferkitError(
            f"{found_name} holds features from another model ({details}); re-extract them with this model's "
            "backbone, weights and pooling"
        )
