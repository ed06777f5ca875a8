"""Classical heads on frozen features: SVM / logistic regression, chosen by cross-validation, saved as a model.

The head is a scikit-learn ``Pipeline(StandardScaler, estimator)``; its hyper-parameters come from a
stratified cross-validated grid search on the train split only (:func:`grid_search`), and it is scored on val/test with
:func:`transferkit.reports.metrics.classification_metrics`. Probabilities: ``logistic`` uses its own
``predict_proba``; ``linear-svm`` (LinearSVC) and ``rbf-svm`` (SVC) are wrapped, after the search, in
``CalibratedClassifierCV(method='sigmoid', ensemble=False)`` (Platt scaling) — what scikit-learn 1.9
recommends instead of the deprecated ``SVC(probability=True)`` — so predictions are the argmax of
calibrated probabilities.

A saved SVM model is a folder: ``model.safetensors``/``model.json`` (the frozen backbone, kind ``svm``,
with pooling and data config in its metadata) and ``head.skops``, stored with skops, never pickle; the
model predicts as :class:`transferkit.models.predictors.SVMPredictor`, whose loader refuses any type a head
is not made of (:mod:`transferkit.models.svm_head`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.core.fileio import atomic_path, ensure_writable_dir, write_json
from transferkit.errors import TransferkitError
from transferkit.features.feature_file import (
    FeatureTable,
    check_same_features,
    feature_identity,
    read_features,
)
from transferkit.models.embedding import build_feature_model
from transferkit.models.preprocessing import Preprocessing
from transferkit.models.saved_model import checkpoint_metadata, save_checkpoint
from transferkit.models.svm_head import HEAD_FILE, head_probabilities
from transferkit.params import CV_FOLDS, HEAD_MODEL

DEFAULT_GRIDS = {
    "linear-svm": {"C": [0.01, 0.1, 1.0]},
    "rbf-svm": {"C": [0.1, 1.0, 10.0], "gamma": ["scale"]},
    "logistic": {"C": [0.01, 0.1, 1.0, 10.0]},
}
# Fits inside the search stop at this tolerance (scikit-learn's default for liblinear/lbfgs is 1e-4): it ranks
# the candidates alike in about half the iterations; the one final fit keeps the estimator's own tolerance.
SEARCH_TOL = 1e-3
MODEL_STEM = "model"
EVAL_SPLITS = ("val", "test")
CALIBRATION_FOLDS = 5


@dataclass
class HeadResult:
    """A fitted head: the pipeline, what the search chose, and its scores per evaluated split."""

    model: str
    pipeline: object
    best_params: dict
    cv_folds: int
    cv_accuracy: float
    metrics: dict = field(default_factory=dict)
    out: Path | None = None
    mlflow_run_id: str | None = None  # set when the model was logged to MLflow
    model_uri: str | None = None


def parse_grid(text: str | None, model: str) -> dict[str, list]:
    """``"C=0.01,0.1,1;gamma=scale,0.01"`` → ``{"C": [0.01, 0.1, 1.0], "gamma": ["scale", 0.01]}``."""
    if not text:
        return dict(DEFAULT_GRIDS[model])
    allowed = set(make_estimator(model).get_params())
    grid = {}
    for part in filter(None, (p.strip() for p in text.replace(" ", "").split(";"))):
        name, _, values = part.partition("=")
        if not values or name not in allowed:
            raise TransferkitError(
                f"bad grid entry {part!r} for {model}; write NAME=v1,v2[;NAME=...] with NAME one of {', '.join(sorted(allowed))}"
            )
        grid[name] = [_number_or_text(v) for v in values.split(",") if v]
        for value in grid[name]:
            _check_param(model, name, value)
    return grid


def _check_param(model: str, name: str, value) -> None:
    """scikit-learn validates parameters when fitting: fit on four points so a bad value fails now, in one line."""
    try:
        make_estimator(model, **{name: value}).fit(np.array([[0.0], [1.0], [0.1], [0.9]]), np.array([0, 1, 0, 1]))
    except (ValueError, TypeError) as exc:  # sklearn's InvalidParameterError is both
        raise TransferkitError(f"bad grid value {name}={value} for {model}: {str(exc).splitlines()[0]}") from exc


def make_estimator(model: str, **params):
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC, LinearSVC

    HEAD_MODEL.check("head model", model)
    if model == "linear-svm":
        # the primal solver converges in a few Newton steps at any C; the dual one needs thousands of
        # passes at C >= 1 when images are near-duplicates (video frames), 100x slower
        return LinearSVC(dual=False, max_iter=5000, **params)
    if model == "rbf-svm":
        return SVC(kernel="rbf", **params)
    return LogisticRegression(max_iter=5000, **params)


def fit_head(features, model: str = "logistic", *, cv: int = 5, grid: str | Mapping | None = None,
             out: str | os.PathLike | None = None, weights=None, seed: int = 0, n_jobs: int | None = -1,
             progress: bool | None = None) -> HeadResult:
    """Fit a head on the train rows of ``features`` (a features file, or ``(FeatureTable, metadata)``).

    The grid search runs its folds in parallel (``n_jobs``, joblib's convention) behind a progress bar
    (``progress=None``: only on a terminal). With ``out`` the model folder is written; the backbone comes from
    ``weights`` or the file the features were extracted from, and must be the same weights (checked by hash).
    """
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    table, metadata = read_features(features) if isinstance(features, (str, os.PathLike)) else features
    grid = parse_grid(grid, model) if not isinstance(grid, Mapping) else dict(grid)
    CV_FOLDS.check("cv", cv)
    class_names = metadata["class_names"]
    train = table.subset("train")
    smallest = _smallest_class_count(train, class_names)
    folds = int(min(cv, smallest))
    # One BLAS thread per fit: the matrices are small, and BLAS threads spinning against the search's own
    # threads (or anything else on the machine) made the search 8x slower on a 2-core box.
    with threadpool_limits(1):
        best, score = grid_search(model, grid, train.vectors, train.label_index, folds=folds, seed=seed,
                                  n_jobs=n_jobs, progress=progress)
        pipeline = Pipeline([("scale", StandardScaler()), ("clf", _final_estimator(model, best, smallest, n_jobs))])
        pipeline.fit(train.vectors, train.label_index)  # the one fit on all train rows
    result = HeadResult(model, pipeline, best, folds, score)
    for split in EVAL_SPLITS:
        rows = table.subset(split)
        if len(rows):
            result.metrics[split] = _metrics(pipeline, rows, class_names)
    if out is not None:
        result.out = save_head_model(out, result, metadata, weights=weights)
    return result


def grid_search(model: str, grid: Mapping, vectors: np.ndarray, labels: np.ndarray, *, folds: int, seed: int = 0,
                n_jobs: int | None = -1, progress: bool | None = None) -> tuple[dict, float]:
    """Stratified cross-validated accuracy of every grid point; returns ``(best params, best mean accuracy)``.

    What it does not redo: the features are standardised once (not per fold and candidate: the scaler's
    statistics of all train rows differ from a fold's by little, and the final pipeline refits it anyway); each
    fold fits its candidates in order of increasing ``C`` with warm starts where the estimator supports them, so
    a weakly regularised logistic regression starts from the strongly regularised solution; folds run in
    parallel threads (liblinear, libsvm and BLAS release the GIL; no process start-up or data copies); and
    nothing is refitted on all rows here.
    """
    from joblib import Parallel, delayed
    from sklearn.model_selection import ParameterGrid, StratifiedKFold
    from sklearn.preprocessing import StandardScaler
    from tqdm import tqdm

    scaled = StandardScaler().fit_transform(vectors)
    candidates = sorted(ParameterGrid(grid), key=lambda params: _sort_key(params.get("C")))
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(scaled, labels))
    jobs = (delayed(_fold_scores)(i, model, candidates, scaled, labels, train, test)
            for i, (train, test) in enumerate(splits))
    scores = np.zeros((len(splits), len(candidates)))
    with tqdm(total=len(splits), desc=f"{model} grid search ({len(candidates)} candidates)", unit="fold",
              disable=None if progress is None else not progress, leave=False) as bar:
        for i, fold_scores in Parallel(n_jobs=n_jobs, prefer="threads", return_as="generator_unordered")(jobs):
            scores[i] = fold_scores
            bar.update()
    mean = scores.mean(axis=0)
    best = int(np.flatnonzero(np.isclose(mean, mean.max(), rtol=0, atol=1e-9))[0])  # a tie: the smallest C
    return dict(candidates[best]), float(mean[best])


def _fold_scores(index: int, model: str, candidates: list[dict], vectors, labels, train, test):
    estimator = make_estimator(model)
    if "warm_start" in estimator.get_params():
        estimator.set_params(warm_start=True)
    if estimator.get_params().get("tol", SEARCH_TOL) < SEARCH_TOL:
        estimator.set_params(tol=SEARCH_TOL)  # a grid value of tol still wins: set_params(**params) comes after
    scores = []
    for params in candidates:
        estimator.set_params(**params).fit(vectors[train], labels[train])
        scores.append(estimator.score(vectors[test], labels[test]))
    return index, scores


def _sort_key(value):
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def _smallest_class_count(train: FeatureTable, class_names) -> int:
    """Caps the folds; a clear error where cross-validation is impossible."""
    if not len(train):
        raise TransferkitError("the features have no train rows; extract with --split all (or train)")
    counts = np.bincount(train.label_index, minlength=len(class_names))
    present = [name for name, n in zip(class_names, counts) if n]
    if len(present) < 2:
        raise TransferkitError(
            f"the train split holds a single class ({', '.join(present)}); a classifier needs at least 2"
        )
    smallest = min(counts[counts > 0])
    if smallest < 2:
        rare = [name for name, n in zip(class_names, counts) if n == 1]
        raise TransferkitError(
            f"class {rare[0]!r} has 1 train image; cross-validation needs at least 2 per class — add images"
        )
    return int(smallest)


def _final_estimator(model: str, best: Mapping, smallest_class: int, n_jobs: int | None):
    """The estimator with the best parameters; SVMs gain Platt-scaled probabilities (folds fitted in parallel)."""
    from sklearn.calibration import CalibratedClassifierCV

    estimator = make_estimator(model, **best)
    if model != "logistic":
        folds = min(CALIBRATION_FOLDS, smallest_class)
        estimator = CalibratedClassifierCV(estimator, method="sigmoid", cv=folds, ensemble=False, n_jobs=n_jobs)
    return estimator


def _metrics(pipeline, rows: FeatureTable, class_names) -> dict:
    from transferkit.reports.metrics import classification_metrics

    return classification_metrics(rows.label_index, head_probabilities(pipeline, rows.vectors, len(class_names)),
                                  class_names)


def save_head_model(out, result: HeadResult, feature_metadata: Mapping, *, weights=None) -> Path:
    """Write the model folder (backbone checkpoint + ``head.skops`` + ``metrics.json``); returns the folder."""
    import skops.io

    from transferkit.models.backbones import backbone_identity

    if feature_metadata["weights"] == "random-init":
        raise TransferkitError("these features come from a randomly initialised backbone, which cannot be saved "
                               "with the head; extract with pretrained --weights to get a usable model")
    out = ensure_writable_dir(out)
    weights = weights or feature_metadata.get("weights_file")
    model, _ = build_feature_model(feature_metadata["backbone"], weights=weights, **feature_metadata["model_kwargs"])
    found = backbone_identity(model)["weights"]
    if found != feature_metadata["weights"]:
        raise TransferkitError(
            f"the features were extracted with weights {feature_metadata['weights']}, but the backbone loaded from "
            f"{weights or 'the hub'} is {found}; pass the same --weights as for extract"
        )
    with atomic_path(out / HEAD_FILE) as tmp:
        skops.io.dump(result.pipeline, tmp)
    summary = {"head_model": result.model, "head_params": result.best_params, "cv_folds": result.cv_folds,
               "cv_accuracy": result.cv_accuracy}
    split_scores = {split: {k: m[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1")}
                    for split, m in result.metrics.items()}
    write_json(out / "metrics.json", {**summary, "metrics": result.metrics})  # plots: `transferkit evaluate`
    metadata = checkpoint_metadata(
        model, kind="svm", class_names=feature_metadata["class_names"],
        preprocessing=Preprocessing.from_metadata(feature_metadata), pool=feature_metadata["pool"], layer=feature_metadata["layer"],
        tta=feature_metadata["tta"], feature_dim=feature_metadata["feature_dim"], head_file=HEAD_FILE,
        head_metrics=split_scores, features=feature_identity(feature_metadata),
        dataset_fingerprint=feature_metadata["dataset"]["fingerprint"], **summary,
    )
    save_checkpoint(out / MODEL_STEM, model, metadata)  # last: its presence marks a complete folder
    return out


def predict_proba_features(predictor, features) -> np.ndarray:
    """An SVM model's probabilities for the rows of a features file (or ``(FeatureTable, metadata)``), without
    the backbone; refused if another model made the vectors."""
    is_file = isinstance(features, (str, os.PathLike))
    table, metadata = read_features(features) if is_file else features
    check_same_features(predictor.metadata["features"], metadata, str(features) if is_file else "the features")
    return head_probabilities(predictor.head, table.vectors, len(predictor.class_names))


def _number_or_text(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
