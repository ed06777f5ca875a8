"""The evaluation report of class probabilities: metrics, skipped files, predictions and figures in a folder.

One report for `transferkit evaluate` and for the val report a finetune ends with, so both give the same
numbers and files; :func:`per_class_table` is its readable text form, printed by the CLI and logged to MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from transferkit.core.fileio import write_json, write_rows
from transferkit.errors import TransferkitError
from transferkit.reports.metrics import is_number

GALLERY_SIZE = 16


def score_probabilities(paths: Sequence, y_true: np.ndarray, probs: np.ndarray, errors: Sequence[str],
                        class_names: Sequence[str], *, split: str, folder: Path | None = None,
                        info: Mapping | None = None, tta: str = "none", topk: Sequence[int] = (1, 3)) -> dict:
    """The evaluation report of class probabilities already computed (``errors[i]`` non-empty: path i was
    skipped): metrics, skipped files, and the files in ``folder``. The end-of-run val report of a finetune
    calls it with the probabilities of its own validation pass."""
    from transferkit.reports.metrics import classification_metrics, split_scores

    ok = np.array([not e for e in errors], dtype=bool)
    if not ok.any():
        raise TransferkitError(f"none of the {len(paths)} images in split {split} could be decoded (e.g. {errors[0]})")
    result = {
        **(info or {}),
        "tta": tta,
        **split_scores(split, classification_metrics(y_true[ok], probs[ok], class_names, topk=topk)),
        "skipped": [{"path": str(p), "error": e} for p, e in zip(paths, errors) if e],
    }
    if folder is not None:
        write_report(folder, result, [p for p, good in zip(paths, ok) if good], y_true[ok], probs[ok], class_names)
    return result


def write_report(folder: Path, result: dict, paths: Sequence, y_true: np.ndarray, probs: np.ndarray,
                 class_names: Sequence[str]) -> None:
    """metrics.json, predictions.csv and the four figures of an evaluation."""
    from transferkit.reports import plots
    from transferkit.reports.metrics import worst_errors

    write_json(folder / "metrics.json", result)
    y_pred = probs.argmax(axis=1)
    write_rows([{"path": str(p), "true": class_names[t], "pred": class_names[y], "prob": float(row[y]),
                 "correct": bool(t == y), **{f"prob_{name}": float(v) for name, v in zip(class_names, row)}}
                for p, t, y, row in zip(paths, y_true, y_pred, probs)], folder / "predictions.csv")
    subject = plots.evaluation_subject(result.get("model"), result["split"], len(y_true))  # in every title
    plots.confusion_matrix_png(result["confusion_matrix"], class_names, folder / "confusion_matrix.png", normalize=False,
                               subject=subject)
    plots.confusion_matrix_png(result["confusion_matrix"], class_names, folder / "confusion_matrix_normalized.png",
                               subject=subject)
    plots.reliability_png(y_true, probs, folder / "reliability.png", subject=subject)
    plots.error_gallery_png(worst_errors(paths, y_true, probs, GALLERY_SIZE), folder / "errors.png", class_names,
                            subject=subject)


def per_class_table(metrics: Mapping) -> str:
    """The per-class report as an aligned text table, with the headline numbers under it."""
    per_class = metrics["per_class"]
    width = max([len("class"), *(len(name) for name in per_class)])
    lines = [f"{'class':<{width}}  precision  recall      f1  support"]
    for name, row in per_class.items():
        lines.append(f"{name:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:6.4f}  {row['support']:7d}")
    lines.append("")
    for key, value in metrics.items():
        if is_number(value):
            lines.append(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return "\n".join(lines) + "\n"
