"""`transferkit svm` as a function: features (given or extracted), a fitted head, its model folder and MLflow run."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from transferkit.errors import TransferkitError
from transferkit.features.classical_heads import HeadResult, fit_head, parse_grid

EXTRACTED_FEATURES = "features.parquet"  # inside the model folder, when svm extracts


def train_svm(features: str | os.PathLike | None = None, *, backbone: str | None = None, data=None,
              model: str = "logistic", cv: int = 5, grid: str | None = None, n_jobs: int | None = -1,
              out: str | os.PathLike | None = None, weights=None, seed: int = 0, track: bool = True,
              tracking_uri: str | None = None, experiment: str | None = None, **extraction) -> HeadResult:
    """Fit a ``model`` head on ``features``, or on the features of ``backbone`` on ``data`` (``extraction``:
    :func:`~transferkit.features.extract.extract_features`'s options), and save it as the model folder ``out``.

    ``out`` defaults to ``runs/svm-<backbone>-<model>-<dataset>``, numbered when taken, so a second svm never
    replaces the first; the folder appears complete or not at all. The tracking store and the grid are checked
    before minutes of extraction and fitting; with ``track`` the model is then logged as an MLflow run.
    """
    from transferkit.core.fileio import atomic_dir
    from transferkit.features.extract import extract_features
    from transferkit.features.feature_file import read_metadata

    if features and (backbone or data):
        raise TransferkitError("pass either --features FILE or --backbone/--data, not both")
    missing = [f"--{name}" for name, value in (("backbone", backbone), ("data", data)) if not (features or value)]
    if missing:
        raise TransferkitError(f"missing {' and '.join(missing)}")
    if track:
        from transferkit.tracking.store import check_tracking_store

        check_tracking_store(tracking_uri)
    parse_grid(grid, model)
    if out is None:
        described = read_metadata(features) if features else None
        out = _new_model_folder(backbone or described["backbone"], model, data or described["dataset"]["root"])
    out = Path(out)
    with atomic_dir(out) as folder:
        if not features:
            features = extract_features(backbone, data, folder / EXTRACTED_FEATURES, weights=weights, seed=seed,
                                        **extraction)
        feature_metadata = read_metadata(features)
        result = fit_head(features, model, cv=cv, grid=grid, out=folder, weights=weights, seed=seed, n_jobs=n_jobs)
    result.out = out
    if track:
        _track(result, feature_metadata, tracking_uri=tracking_uri, experiment=experiment)
    return result


def _new_model_folder(backbone: str, model: str, dataset) -> Path:
    """``runs/svm-<backbone>-<model>-<dataset>``, numbered when taken."""
    from transferkit.core.fileio import free_name, safe_name
    from transferkit.tracking.naming import default_experiment_name

    parent = Path("runs")
    return parent / free_name(parent, safe_name(f"svm-{backbone}-{model}-{default_experiment_name(dataset)}"))


def _track(result: HeadResult, feature_metadata: Mapping, *, tracking_uri, experiment) -> None:
    """The fitted head as an MLflow run: search space and choice, val/test metrics and confusion matrices,
    a description, the model itself; sets the result's run id and model URI."""
    import tempfile

    from transferkit.reports.metrics import split_scores
    from transferkit.reports.plots import confusion_matrix_png
    from transferkit.tracking.summary import evaluation_line
    from transferkit.tracking.tracker import open_run

    dataset = feature_metadata["dataset"]
    backbone, class_names = feature_metadata["backbone"], feature_metadata["class_names"]
    params = {"backbone": backbone, "weights": feature_metadata["weights"],
              "pool": feature_metadata["pool"], "layer": feature_metadata["layer"], "tta": feature_metadata["tta"],
              "head_model": result.model, "cv_folds": result.cv_folds,
              **{f"head_{k}": v for k, v in result.best_params.items()}}
    with open_run("svm", data=dataset["root"], backbone=backbone, strategy=f"svm-{result.model}",
                  dataset_fingerprint=dataset["fingerprint"], params=params, tracking_uri=tracking_uri,
                  experiment=experiment) as tracker, tempfile.TemporaryDirectory() as tmp:
        tracker.log_metrics({"cv_accuracy": result.cv_accuracy})
        lines, headline = [], {"cv_accuracy": result.cv_accuracy}
        for split, scores in result.metrics.items():
            plots = Path(tmp) / split
            confusion_matrix_png(scores["confusion_matrix"], class_names, plots / "confusion_matrix.png", normalize=False)
            confusion_matrix_png(scores["confusion_matrix"], class_names, plots / "confusion_matrix_normalized.png")
            named = split_scores(split, scores)
            tracker.log_evaluation(named, artifacts_dir=plots)
            lines.append(evaluation_line(named, artifacts=split)[2:])
            headline.update({k: named[k] for k in (f"{split}_accuracy", f"{split}_macro_f1")})
        uri = tracker.log_model(result.out / "model.safetensors")
        chosen = ", ".join(f"{k}={v}" for k, v in result.best_params.items())
        tracker.describe(
            f"{backbone} · svm-{result.model} on {Path(dataset['root']).name}",
            [f"head: {result.model} ({chosen}), chosen by {result.cv_folds}-fold cross-validation on train",
             f"features: `{feature_metadata['pool']}` pooling of frozen `{backbone}` on `{dataset['root']}`, "
             f"{len(class_names)} classes", *lines, f"model: `{uri}`"],
            headline)
    result.mlflow_run_id, result.model_uri = tracker.run_id, uri
