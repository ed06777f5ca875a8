"""The features file: parquet or npz rows of path, label, split and vector, with the metadata that says which
backbone, weights, preprocessing and pooling made them, so vectors from different models are never mixed."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.errors import TransferkitError

FORMAT = "transferkit-features"
SUFFIXES = (".parquet", ".npz")
METADATA_KEY = "transferkit"
# What makes two sets of vectors comparable: a model trained on one can score the other.
IDENTITY_KEYS = ("backbone", "model_kwargs", "weights", "preprocessing", "pool", "layer", "tta", "feature_dim")


def is_up_to_date(out: Path, metadata: Mapping) -> bool:
    """True when ``out`` exists and was written from the same inputs (its metadata equals ``metadata``)."""
    if not out.is_file() or metadata["weights"] == "random-init":
        return False
    try:
        existing = read_metadata(out)
    except TransferkitError:
        return False
    return existing.keys() == metadata.keys() and not feature_identity_mismatch(existing, metadata)


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



def feature_writer(path: Path, suffix: str, metadata: Mapping, rows: list[tuple], chunk_rows: int) -> _Sink:
    """A context manager that streams vectors to ``path`` in the format ``suffix`` names (``path`` itself is
    usually a temporary name, renamed once complete)."""
    return (_ParquetSink if suffix == ".parquet" else _NpzSink)(path, metadata, rows, chunk_rows)

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


def feature_identity_mismatch(metadata: Mapping, expected: Mapping) -> list[str]:
    """The keys of ``expected`` whose value a features file's ``metadata`` states differently.

    Values are compared as sorted-key JSON, the form the metadata is stored in: a tuple equals its list,
    and the same mapping written in another key order is no mismatch.
    """
    return [key for key, value in expected.items() if _as_stored(metadata.get(key)) != _as_stored(value)]


def _as_stored(value) -> str:
    return json.dumps(value, sort_keys=True)


def check_same_features(expected: Mapping, found: Mapping, found_name: str) -> None:
    """Refuse vectors made by another backbone, weights, preprocessing or pooling than ``expected``."""
    differ = feature_identity_mismatch(found, {key: expected.get(key) for key in IDENTITY_KEYS})
    if differ:
        details = "; ".join(f"{key}: {found.get(key)!r} vs expected {expected.get(key)!r}" for key in differ[:3])
        raise TransferkitError(
            f"{found_name} holds features from another model ({details}); re-extract them with this model's "
            "backbone, weights and pooling"
        )
