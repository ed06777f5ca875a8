"""Classification metrics from predicted probabilities: the one place evaluate, training and tracking get them.

Every number comes from :mod:`sklearn.metrics` on ``y_pred = argmax(probs)``, so a user can reproduce it
with sklearn on the same predictions. Expected calibration error (not in sklearn) uses the usual 15
equal-width confidence bins (Guo et al., 2017).

It also fixes the metric names (docs/ui.md, "Metric names"): one name per quantity, the same in
``metrics.csv``, ``result.json``, ``evaluate --json`` and MLflow. A model's score on a split is
``<split>_<metric>`` (``val_accuracy``, ``test_macro_f1``); per class, ``<split>_<stat>/<class>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Number

import numpy as np
from sklearn import metrics

from transferkit.errors import TransferkitError

ECE_BINS = 15
PER_CLASS_STATS = ("precision", "recall", "f1")
_NOT_PREFIXED = ("per_class", "confusion_matrix", "confusion_matrix_normalized")


def classification_metrics(y_true, probs, class_names: Sequence[str], topk: Sequence[int] = (1, 3)) -> dict:
    """Accuracy, balanced accuracy, macro-F1, top-k, per-class report, confusion matrices and ECE.

    ``y_true`` are class indices into ``class_names``; ``probs`` is ``[N, len(class_names)]``. Top-k keys
    (``top3_accuracy``) appear only for ``k < len(class_names)``, where they say something. The per-class
    report and confusion matrices cover every class in ``class_names`` (absent ones have support 0);
    macro-F1 and balanced accuracy, like sklearn's defaults, average over the classes that occur.
    """
    y_true, probs = _check_inputs(y_true, probs, class_names)
    labels = list(range(len(class_names)))
    y_pred = probs.argmax(axis=1)
    report = metrics.classification_report(
        y_true, y_pred, labels=labels, target_names=list(class_names), output_dict=True, zero_division=0
    )
    result = {
        "n": int(len(y_true)),
        "accuracy": float(metrics.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(_quiet(metrics.balanced_accuracy_score, y_true, y_pred)),
        "macro_f1": float(metrics.f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }
    for k in sorted(set(topk)):
        if 1 <= k < len(class_names):
            result[f"top{k}_accuracy"] = top_k_accuracy(y_true, probs, k)
    result["ece"] = expected_calibration_error(y_true, probs)
    result["per_class"] = {
        name: {
            "precision": float(report[name]["precision"]),
            "recall": float(report[name]["recall"]),
            "f1": float(report[name]["f1-score"]),
            "support": int(report[name]["support"]),
        }
        for name in class_names
    }
    result["confusion_matrix"] = metrics.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    result["confusion_matrix_normalized"] = metrics.confusion_matrix(
        y_true, y_pred, labels=labels, normalize="true"
    ).tolist()
    return result


def split_scores(split: str, metrics: Mapping) -> dict:
    """:func:`classification_metrics` with its scalar names prefixed by ``split`` (``test_accuracy``, ``test_n``).

    The per-class report and confusion matrices keep their names; the ``split`` key says which split they are.
    """
    return {"split": split, **{key if key in _NOT_PREFIXED else f"{split}_{key}": value for key, value in metrics.items()}}


def is_number(value) -> bool:
    """A real scalar (a metric), not a list, text or complex number."""
    return isinstance(value, Number) and not isinstance(value, complex)


def top_k_accuracy(y_true, probs, k: int) -> float:
    """sklearn's top-k accuracy; for two classes it wants the positive-class score, not both columns."""
    probs = np.asarray(probs)
    scores = probs[:, 1] if probs.shape[1] == 2 else probs
    return float(metrics.top_k_accuracy_score(y_true, scores, k=k, labels=list(range(probs.shape[1]))))


def calibration_bins(y_true, probs, n_bins: int = ECE_BINS) -> dict:
    """Per confidence bin (``(lo, hi]``, the first also holding 0): count, mean confidence and accuracy.

    Shared by :func:`expected_calibration_error` and the reliability diagram so both use the same bins.
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(which, weights=correct, minlength=n_bins) / count
    return {"edges": edges, "count": count, "confidence": mean_conf, "accuracy": accuracy}


def expected_calibration_error(y_true, probs, n_bins: int = ECE_BINS) -> float:
    """Sum over bins of (bin share of samples) x |accuracy - mean confidence|."""
    bins = calibration_bins(y_true, probs, n_bins)
    used = bins["count"] > 0
    if not used.any():
        return 0.0
    gaps = np.abs(bins["accuracy"][used] - bins["confidence"][used])
    return float(np.sum(bins["count"][used] / bins["count"].sum() * gaps))


def worst_errors(paths: Sequence, y_true, probs, k: int = 16) -> list[dict]:
    """The ``k`` misclassified samples the model was most sure about: ``{path, true, pred, prob, true_prob}``.

    ``true``/``pred`` are class indices; ``prob`` is the confidence in the wrong prediction.
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs)
    y_pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    order = wrong[np.argsort(-probs[wrong, y_pred[wrong]], kind="stable")][: max(int(k), 0)]
    return [
        {
            "path": str(paths[i]),
            "true": int(y_true[i]),
            "pred": int(y_pred[i]),
            "prob": float(probs[i, y_pred[i]]),
            "true_prob": float(probs[i, y_true[i]]),
        }
        for i in order
    ]


def _check_inputs(y_true, probs, class_names) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(class_names):
        raise TransferkitError(f"probabilities must be [N, {len(class_names)}] for {len(class_names)} classes, got {list(probs.shape)}")
    if len(y_true) != len(probs):
        raise TransferkitError(f"{len(y_true)} labels but {len(probs)} rows of probabilities")
    if len(y_true) == 0:
        raise TransferkitError("no samples to evaluate")
    if y_true.ndim != 1 or not np.issubdtype(y_true.dtype, np.integer) or y_true.min() < 0 or y_true.max() >= len(class_names):
        raise TransferkitError(f"labels must be class indices in [0, {len(class_names)})")
    return y_true, probs


def _quiet(fn, *args, **kwargs):
    """sklearn warns when a predicted class is absent from y_true; the number is still the defined one."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)
