"""Evaluate a saved model on a labelled split: metrics, confusion matrices, calibration, worst errors.

The dataset's class names are matched to the model's by name, so a test folder may hold a subset of the
classes (or list them in another order); a class the model does not know is an error. Files that fail
to decode are skipped and listed. Results go to ``out`` (a folder) and, with tracking on, to MLflow.

A finetuned model remembers the split it trained with (``metadata['split']``: path relative to the data
root, label, split). When the data on disk has no folder for the split asked for — a plain folder of class
folders whose val split transferkit carved — that split is rebuilt from those records, so ``evaluate --split
val`` scores exactly the images the run validated on.

Metric names carry the split (``test_accuracy``, see :mod:`transferkit.reports.metrics`). With tracking on,
the scores go to the MLflow run that trained the model (found by the checkpoint's digest, wherever the file
was copied to), so the training run shows its test score in the runs table; a model from elsewhere gets a
run of its own, tagged with the model it scored.

``out`` is checked before any work: a new or empty folder, or an earlier evaluate report, never a run or
model folder (whose ``metrics.json`` the report would replace) or a user's folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from transferkit import params
from transferkit.core.fileio import check_writable_file, ensure_writable_dir
from transferkit.errors import TransferkitError


def evaluate(model_spec, data, split: str | None = None, tta: str = "none", batch_size: int = 32,
             out: str | os.PathLike | None = None, device: str = "auto", *, track: bool = True,
             tracking_uri: str | None = None, experiment: str | None = None, topk: Sequence[int] = (1, 3),
             workers: int | None = None) -> dict:
    """Metrics of ``model_spec`` on ``split`` of ``data`` (see :func:`transferkit.reports.metrics.classification_metrics`).

    ``split=None`` means ``test`` when the data has split folders, or the whole dataset when it has a single
    split (a plain folder of class folders). A split the data has no folder for (``val`` of a plain folder)
    is rebuilt from the split records a finetuned model carries, matched by path relative to ``data``; files
    missing from ``data`` are an error. Files written to ``out``: ``metrics.json``, ``predictions.csv``,
    ``confusion_matrix.png``, ``confusion_matrix_normalized.png``, ``reliability.png``, ``errors.png``.
    """
    from transferkit.core.runtime import select_device
    from transferkit.data import discover
    from transferkit.models.predictors import load_predictor
    from transferkit.models.saved_model import find_checkpoint
    from transferkit.use.predict import check_tta

    check_tta(tta)
    params.BATCH_SIZE.check("batch_size", batch_size)  # before the model loads
    if out is not None:
        check_report_folder(out)
    if track:  # fail before the work, not after it
        from transferkit.tracking.store import check_tracking_store

        check_tracking_store(tracking_uri)
    index = discover(data, val_ratio=0, strict=False)
    checkpoint = find_checkpoint(model_spec)  # an MLflow URI is downloaded once, here
    predictor = load_predictor(checkpoint, select_device(device))
    split, samples, y_true = select_labelled_samples(predictor, index, split)
    with _output_folder(out, track) as folder:
        result = evaluate_samples(predictor, [s.path for s in samples], y_true, split=split, folder=folder,
                                  info={"model": str(model_spec), "data": str(data)}, tta=tta,
                                  batch_size=batch_size, workers=workers, topk=topk)
        if track:
            _track(result, folder, predictor, index, checkpoint, tracking_uri=tracking_uri, experiment=experiment)
    return result


def evaluate_samples(predictor, paths: Sequence, y_true: np.ndarray, *, split: str, folder: Path | None = None,
                     info: Mapping | None = None, tta: str = "none", batch_size: int = 32, workers: int | None = None,
                     topk: Sequence[int] = (1, 3)) -> dict:
    """Score ``predictor`` on labelled ``paths`` (``y_true``: the model's class indices); report into ``folder``.

    The one scoring path of `transferkit evaluate` and of the val report a finetune ends with, so both give
    the same numbers. The result is ``info`` + tta, the metrics named by split
    (:func:`transferkit.reports.metrics.split_scores`) and the ``skipped`` undecodable files.
    """
    from transferkit.reports.evaluation_report import score_probabilities
    from transferkit.use.predict import predict_paths

    probs, errors = predict_paths(predictor, paths, tta=tta, batch_size=batch_size, workers=workers)
    return score_probabilities(paths, y_true, probs, errors, predictor.class_names, split=split, folder=folder,
                               info=info, tta=tta, topk=topk)


def select_labelled_samples(predictor, index, split: str | None) -> tuple[str, list, np.ndarray]:
    """``(split name, samples, the model's class index of each)`` of the indexed data, chosen as `evaluate`
    does: a split the model recorded (its val split of a plain folder) is rebuilt from its records."""
    split, samples = _select_split(index, split, predictor.metadata.get("split") or [])
    return split, samples, _model_labels(index, samples, predictor.class_names)


def _select_split(index, split: str | None, records: Sequence[Mapping]):
    if split is None:
        if "test" in index.splits:
            return "test", index.split("test")
        if len(index.splits) == 1:
            return "all", list(index.samples)
        raise TransferkitError(f"{index.root} has no test split; pass --split one of: {', '.join(index.splits)}")
    on_disk = split in index.splits and index.layout != "class-folders"  # a plain folder's one split is all of it
    recorded = [r for r in records if r["split"] == split]
    if not on_disk and recorded:
        return split, _recorded_split(index, recorded)
    if split not in index.splits:
        raise TransferkitError(f"split {split!r} not found in {index.root}; it has: {', '.join(index.splits)}")
    return split, index.split(split)


def _recorded_split(index, records: Sequence[Mapping]) -> list:
    """The samples of ``index`` at the records' paths (relative to its root), in record order."""
    by_path = {index.relpath(s): s for s in index.samples}
    missing = [r["path"] for r in records if r["path"] not in by_path]
    if missing:
        raise TransferkitError(
            f"{len(missing)} of the {len(records)} images of the model's {records[0]['split']} split are not in "
            f"{index.root} (e.g. {missing[0]}); pass the data folder the model was trained on")
    return [by_path[r["path"]] for r in records]


def _model_labels(index, samples, class_names: Sequence[str]) -> np.ndarray:
    """Dataset labels re-expressed as the model's class indices, matched by class name."""
    model_index = {name: i for i, name in enumerate(class_names)}
    present = sorted({index.classes[s.label] for s in samples})
    unknown = [name for name in present if name not in model_index]
    if unknown:
        raise TransferkitError(
            f"the data has classes the model does not know: {', '.join(unknown)}; model classes: {', '.join(class_names)}"
        )
    return np.array([model_index[index.classes[s.label]] for s in samples], dtype=np.int64)


def check_report_folder(out) -> Path:
    """Refuse an ``out`` the report could not be written to, or whose files it would replace without having
    written them: anything but a new or empty folder or an earlier evaluate report."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TransferkitError(f"--out {out} is a file; evaluate writes a folder of report files")
    if out.is_dir() and any(out.iterdir()) and not _is_evaluate_report(out):
        raise TransferkitError(f"--out {out} holds files that are not an earlier evaluate report (a run or model "
                               "folder, or yours); evaluate never replaces them: choose a new or empty folder")
    check_writable_file(out / "metrics.json", "--out")
    return out


def _is_evaluate_report(folder: Path) -> bool:
    """Its metrics.json is one evaluate wrote: the model and data it scored, tta, skipped files."""
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(metrics, dict) and {"model", "data", "tta", "skipped"} <= metrics.keys()


@contextlib.contextmanager
def _output_folder(out, track: bool) -> Iterator[Path | None]:
    """``out`` if given; a temporary folder when only MLflow will keep the files; else None."""
    if out is not None:
        yield ensure_writable_dir(out)
    elif track:
        with tempfile.TemporaryDirectory(prefix="transferkit-eval-") as tmp:
            yield Path(tmp)
    else:
        yield None


def _track(result: dict, folder: Path | None, predictor, index, checkpoint: Path, *, tracking_uri, experiment) -> None:
    """Log to the run that trained the model when the store has it, else to a new run naming the model."""
    from transferkit.tracking.lookup import find_model_run, model_digest
    from transferkit.tracking.summary import evaluation_line
    from transferkit.tracking.tracker import open_run

    split = result["split"]
    digest = model_digest(checkpoint)
    line = evaluation_line(result, data=result["data"], tta=result["tta"], artifacts=split if folder else None)
    model_run = find_model_run(digest, tracking_uri)
    if model_run is not None:  # scores at the run's summary step (its best epoch): what its columns show
        tags = {f"{split}_data": result["data"], f"{split}_data_fingerprint": index.fingerprint(),
                f"{split}_tta": result["tta"]}
        with open_run("evaluate", tracking_uri=tracking_uri, run_id=model_run.info.run_id, tags=tags) as tracker:
            tracker.log_evaluation(result, artifacts_dir=folder, step=int(model_run.data.metrics.get("best_epoch", 0)))
            tracker.add_evaluation_to_description(split, line)
    else:
        meta = predictor.metadata
        params = {
            "model": result["model"], "backbone": meta.get("backbone"), "kind": meta.get("kind"),
            "data": result["data"], "data_fingerprint": index.fingerprint(), "split": split,
            "tta": result["tta"], "n_images": result[f"{split}_n"], "n_skipped": len(result["skipped"]),
        }
        source = _model_label(result["model"])
        tags = {"source_model": result["model"], "source_model_sha256": digest,
                "source_run_id": _run_id_in_uri(result["model"])}
        with open_run("evaluate", data=result["data"], backbone=meta.get("backbone"), params=params, tags=tags,
                      tracking_uri=tracking_uri, experiment=experiment,
                      run_name=f"evaluate-{source}-{split}") as tracker:
            tracker.log_evaluation(result, artifacts_dir=folder)
            tracker.describe(
                f"evaluate {source} on {split}", [f"model: `{result['model']}` (not trained in this store)", line[2:]],
                {k: result[k] for k in (f"{split}_accuracy", f"{split}_macro_f1", f"{split}_ece") if k in result})
    result["mlflow_run_id"] = tracker.run_id
    result["mlflow_model_run"] = model_run is not None


def _model_label(spec: str) -> str:
    """A short name for a model: its run or model folder's name, or the MLflow URI."""
    if "://" in spec or spec.startswith(("runs:/", "models:/")):
        return spec
    path = Path(spec)
    return path.parent.name if path.suffix in (".safetensors", ".json") else path.name


def _run_id_in_uri(spec: str) -> str | None:
    return spec.split("/")[1] if spec.startswith("runs:/") else None
