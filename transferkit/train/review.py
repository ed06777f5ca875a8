"""The review of a finished run: what a reviewer judges it by, written into the run folder.

``val/`` is the best checkpoint's evaluation report on the val split it trained with (from the run's own
validation pass, so it scores the model the way training did), ``augment_preview.png`` shows what the
augmentation did to train images, ``data_check.json`` is ``transferkit data check`` of the run's data (made
before training, where its errors are shown and leakage stops the run). The tracking callback logs them; this
module only writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.core.fileio import ensure_writable_dir, write_json


@dataclass
class Review:
    report: dict  # the val report (split_scores form: val_accuracy, per_class...)
    folder: Path  # val/: confusion matrices, per-class table, error gallery
    artifacts: list[Path] = field(default_factory=list)  # the other files of the review


def write_review(run_dir: Path, index, labels: np.ndarray, probabilities: np.ndarray, *, best_epoch: int,
                 preprocessing, aug: str, seed: int, check) -> Review:
    """Write ``val/``, the augmentation preview and the dataset ``check`` (a CheckReport) of the run in ``run_dir``."""
    from transferkit.reports.evaluation_report import score_probabilities
    from transferkit.reports.plots import augmentation_preview_png

    val = index.split("val")
    folder = ensure_writable_dir(run_dir / "val")
    report = score_probabilities(
        [s.path for s in val], labels, probabilities, [""] * len(val), index.classes, split="val", folder=folder,
        info={"model": str(run_dir / "best.safetensors"), "best_epoch": best_epoch})
    preview = augmentation_preview_png(index, aug, preprocessing, run_dir / "augment_preview.png", n=16, seed=seed)
    write_json(run_dir / "data_check.json", check.to_dict())
    return Review(report, folder, [preview, run_dir / "data_check.json"])
