"""Predict classes for image files with a saved model; also the batched inference loop evaluate uses.

Inputs are files, folders (searched recursively for images) and glob patterns. A file that cannot be
decoded becomes a row with an ``error`` instead of stopping the batch. Test-time augmentation averages
the class probabilities over the views of the model's preprocessing (:meth:`Preprocessing.tta_views
<transferkit.models.preprocessing.Preprocessing.tta_views>`).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from transferkit import params
from transferkit.core.fileio import ROW_FILE_SUFFIXES, check_writable_file, write_rows
from transferkit.data.decode import ImageDecodeError, is_image_file, load_image
from transferkit.errors import TransferkitError


def predict(model_spec, inputs: Sequence[str | os.PathLike], topk: int = 3, tta: str = "none",
            batch_size: int = 32, out: str | os.PathLike | None = None, device: str = "auto",
            workers: int | None = None) -> list[dict]:
    """One row per image: ``path``, ``pred``, ``prob``, ``top1_class``, ``top1_prob`` ... ``topK_*``, ``error``.

    ``out`` (.csv, .json or .parquet) is written atomically; rows are returned either way. It replaces only an
    earlier predictions file (checked before any work), never another file.
    """
    from transferkit.core.runtime import select_device
    from transferkit.models.predictors import load_predictor

    params.TOPK.check("topk", topk)
    params.BATCH_SIZE.check("batch_size", batch_size)
    check_tta(tta)
    if out is not None:
        check_rows_out(out)
    paths = expand_inputs(inputs)
    predictor = load_predictor(model_spec, select_device(device))
    probs, errors = predict_paths(predictor, paths, tta=tta, batch_size=batch_size, workers=workers)
    rows = prediction_rows(paths, probs, errors, predictor.class_names, topk)
    if out is not None:
        write_rows(rows, out)
    return rows


def check_rows_out(out) -> Path:
    """``--out``: a rows file that can be written and replaces nothing but an earlier predictions file."""
    out = Path(out)
    if out.suffix.lower() not in ROW_FILE_SUFFIXES:
        raise TransferkitError(f"--out {out}: unknown format; end the name with one of {', '.join(ROW_FILE_SUFFIXES)}")
    check_writable_file(out, "--out")
    if (out.exists() or out.is_symlink()) and not _is_predictions_file(out):
        raise TransferkitError(f"--out {out} already exists and is not an earlier predictions file; predict never "
                               "replaces other files: choose another --out")
    return out


def _is_predictions_file(path: Path) -> bool:
    """Its columns are the rows :func:`prediction_rows` makes: path, pred, prob first, error among them."""
    import json

    try:
        suffix = path.suffix.lower()
        if suffix == ".csv":
            import pandas as pd

            columns = list(pd.read_csv(path, nrows=0).columns)
        elif suffix == ".json":
            rows = json.loads(path.read_text())
            columns = list(rows[0]) if isinstance(rows, list) and rows and isinstance(rows[0], dict) else []
        else:
            import pyarrow.parquet as pq

            columns = pq.read_schema(path).names
    except (OSError, ValueError):
        return False
    return columns[:3] == ["path", "pred", "prob"] and "error" in columns


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given, folders searched recursively for images, globs expanded; order kept, duplicates dropped."""
    if not inputs:
        raise TransferkitError("no input images; pass image files, folders or glob patterns")
    found: dict[Path, None] = {}
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p.name) and not p.name.startswith("."))
        elif glob.has_magic(str(item)):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(str(item)), recursive=True)
                             if Path(p).is_file() and is_image_file(p))
        else:
            raise TransferkitError(f"input {item} does not exist; pass image files, folders or quoted glob patterns")
        if not matches:
            raise TransferkitError(f"no images found for input {item} (extensions: jpg, png, bmp, webp, tif)")
        found.update(dict.fromkeys(matches))
    return list(found)


def predict_paths(predictor, paths: Sequence[str | os.PathLike], tta: str = "none", batch_size: int = 32,
                  workers: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Class probabilities ``[N, C]`` for ``paths`` (NaN rows where decoding failed) and one error per path ('' if ok).

    Decoding runs in DataLoader workers; with TTA each image's K views go through the model together and
    their probabilities are averaged.
    """
    from tqdm.auto import tqdm

    from transferkit.data.dataset import make_loader

    params.BATCH_SIZE.check("batch_size", batch_size)
    if predictor.members:  # each member sees the images through its own preprocessing
        runs = [predict_paths(member, paths, tta, batch_size, workers) for member in predictor.members]
        errors = [next((e for e in per_path if e), "") for per_path in zip(*(errs for _, errs in runs))]
        probs = predictor.combine([member_probs for member_probs, _ in runs])
        probs[[bool(e) for e in errors]] = np.nan
        return probs, errors
    views = predictor.preprocessing.tta_views(tta)
    dataset = _ViewsDataset(paths, views, views.decode_short_side)
    loader = make_loader(dataset, batch_size, workers=workers, device=predictor.device)
    probs = np.full((len(paths), len(predictor.class_names)), np.nan, dtype=np.float32)
    errors: list[str] = []
    start = 0
    with tqdm(total=len(paths), unit="img", desc="predict", disable=None, leave=False) as bar:
        for batch, batch_errors in loader:
            ok = [i for i, error in enumerate(batch_errors) if not error]
            if ok:
                probs[[start + i for i in ok]] = average_over_views(predictor.predict_proba_tensor, batch[ok])
            errors.extend(batch_errors)
            start += len(batch_errors)
            bar.update(len(batch_errors))
    return probs, errors


def average_over_views(predict_proba_tensor: Callable[[torch.Tensor], np.ndarray], batch: torch.Tensor) -> np.ndarray:
    """Probabilities averaged over views for a ``[B, K, 3, H, W]`` batch (a plain ``[B, 3, H, W]`` passes through)."""
    if batch.ndim == 4:
        return predict_proba_tensor(batch)
    n, views = batch.shape[:2]
    probs = predict_proba_tensor(batch.flatten(0, 1))
    return probs.reshape(n, views, -1).mean(axis=1)


def prediction_rows(paths: Sequence, probs: np.ndarray, errors: Sequence[str], class_names: Sequence[str],
                    topk: int) -> list[dict]:
    k = min(topk, len(class_names))
    rows = []
    for path, row_probs, error in zip(paths, probs, errors):
        row = {"path": str(path), "pred": None, "prob": None}
        order = [] if error else np.argsort(-row_probs, kind="stable")[:k]
        for rank in range(k):
            row[f"top{rank + 1}_class"] = class_names[order[rank]] if len(order) else None
            row[f"top{rank + 1}_prob"] = float(row_probs[order[rank]]) if len(order) else None
        if not error:
            row["pred"], row["prob"] = row["top1_class"], row["top1_prob"]
        row["error"] = error
        rows.append(row)
    return rows


class _ViewsDataset(Dataset):
    """Yields ``(views [K,3,H,W], error)``; a file that will not decode gives zeros and its error message."""

    def __init__(self, paths: Sequence, views: Callable, min_short_side: int | None):
        self.paths = [os.fspath(p) for p in paths]
        self.views = views
        self.min_short_side = min_short_side
        self.empty = torch.zeros_like(views(np.zeros((32, 32, 3), dtype=np.uint8)))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = load_image(self.paths[i], self.min_short_side)
        except ImageDecodeError as exc:
            return self.empty, str(exc)
        return self.views(image), ""


def check_tta(tta: str) -> None:
    params.TTA.check("--tta", tta)
