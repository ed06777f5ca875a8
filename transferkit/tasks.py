"""Tasks: what kind of answer a model gives, and every rule that follows from it, in one object per task.

Training asks its task for the loss, the train-batch score, the val scores and which of two is better; the
sweep and the leaderboard ask which metrics exist and in which direction they improve; predictors, export and
the MLflow model ask how logits become probabilities and how probabilities become a decision. A new task
(multi-label: sigmoid outputs, mAP) is a new class registered here, not an edit of every module that trains
or uses a model.

Pure Python at import time (torch and sklearn are imported inside methods), so the CLI reads the metric names
for its flags without loading torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transferkit.errors import TransferkitError

# A val loss counts as progress (new best, early-stopping patience reset) only if it beats the best by this
# fraction: torch's ReduceLROnPlateau default, so the plateau schedule and early stopping agree on a stall.
MIN_REL_IMPROVEMENT = 1e-4
DEFAULT_TASK = "single-label"  # what a checkpoint written without a ``task`` key holds
TIMING_COLUMNS = ("epoch_seconds", "images_per_s")  # metrics.csv's last columns, whatever the task


class SingleLabel:
    """One class per image: softmax over the classes, cross-entropy, accuracy and macro-F1, argmax decides."""

    name = "single-label"
    # the val metrics of a checkpoint, each with the direction in which it improves
    directions: Mapping[str, str] = {"val_loss": "minimize", "val_accuracy": "maximize", "val_macro_f1": "maximize"}
    train_metric = "train_accuracy"
    headline_metrics = ("val_accuracy", "val_macro_f1", "val_loss", "val_ece")  # what a reviewer reads first
    output_meaning = "logits; softmax(logits / temperature) gives class probabilities"

    @property
    def headline(self) -> str:
        """What a reviewer sorts runs by."""
        return self.headline_metrics[0]

    @property
    def checkpoint_columns(self) -> tuple[str, ...]:
        """The epoch columns that score the saved model; a run's summary is the best checkpoint's values of these,
        under the same names (plus ``best_epoch``). The train columns are running averages over the epoch's
        augmented batches, not a score of the checkpoint."""
        return tuple(self.directions)

    @property
    def epoch_columns(self) -> tuple[str, ...]:
        """``metrics.csv``'s header, one row per epoch."""
        return ("epoch", "train_loss", self.train_metric, *self.checkpoint_columns, "lr", *TIMING_COLUMNS)

    def direction(self, metric: str) -> str:
        if metric not in self.directions:
            raise TransferkitError(f"unknown metric {metric!r} for a {self.name} model; use one of "
                                   f"{', '.join(self.directions)}")
        return self.directions[metric]

    def better(self, a: Mapping, b: Mapping, monitor: str) -> bool:
        """Whether val scores ``a`` beat ``b`` on ``monitor`` (a loss by the margin that counts as progress)."""
        if self.direction(monitor) == "minimize":
            return a[monitor] < b[monitor] * (1 - MIN_REL_IMPROVEMENT)
        return a[monitor] > b[monitor]

    def training_loss(self, *, num_classes: int, train_labels, label_smoothing: float, mixup: float, cutmix: float,
                      balance: str, device):
        """``(criterion, mixup)``: soft-target cross-entropy behind timm's Mixup/CutMix, else cross-entropy
        (class-weighted under ``balance: weights``)."""
        import numpy as np
        import torch
        from torch import nn

        if mixup or cutmix:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy

            return SoftTargetCrossEntropy(), Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix,
                                                   label_smoothing=label_smoothing, num_classes=num_classes)
        weight = None
        if balance == "weights":
            counts = np.bincount(train_labels, minlength=num_classes)
            weight = torch.tensor(len(train_labels) / (num_classes * counts), dtype=torch.float32, device=device)
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing), None

    def head_loss(self, logits, labels, label_smoothing: float):
        """The loss of LP-FT's head phase on cached features."""
        import torch.nn.functional as F

        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)

    def val_loss(self, logits, labels) -> float:
        """The plain (unsmoothed, unweighted) loss every val score and early stopping use."""
        import torch.nn.functional as F

        return F.cross_entropy(logits, labels).item()

    def count_correct(self, logits, labels) -> int:
        """Right answers in a training batch (``labels`` as given, before mixing)."""
        return (logits.argmax(1) == labels).sum().item()

    def val_scores(self, labels, logits, class_names: Sequence[str]) -> dict:
        """The checkpoint columns of ``logits`` against ``labels`` (tensors of the whole val split)."""
        from transferkit.reports.metrics import classification_metrics

        metrics = classification_metrics(labels.numpy(), logits.softmax(1).numpy(), class_names, topk=(1,))
        return {"val_loss": self.val_loss(logits, labels), "val_accuracy": metrics["accuracy"],
                "val_macro_f1": metrics["macro_f1"]}

    def probabilities(self, logits, temperature: float = 1.0, dim: int = -1):
        """Logits → probabilities, calibrated by the model's fitted temperature."""
        return (logits.float() / temperature).softmax(dim)

    def decide(self, probabilities):
        """The predicted class index of each row of ``probabilities`` (``[N, C]`` array)."""
        return probabilities.argmax(axis=-1)

    # what a served model returns per image: column → MLflow type ("x[]": a list of x)
    output_columns: Mapping[str, str] = {"class": "string", "probability": "double", "top_classes": "string[]",
                                         "top_probabilities": "double[]"}

    def prediction_columns(self, probabilities, class_names: Sequence[str], top_k: int) -> dict[str, list]:
        """:attr:`output_columns` of ``[N, C]`` probabilities: the decided class, its probability, the top k."""
        import numpy as np

        k = max(1, min(int(top_k), len(class_names)))
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return {
            "class": [class_names[row[0]] for row in order],
            "probability": [float(p[row[0]]) for p, row in zip(probabilities, order)],
            "top_classes": [[class_names[i] for i in row] for row in order],
            "top_probabilities": [[float(p[i]) for i in row] for p, row in zip(probabilities, order)],
        }

    def calibrate(self, logits, labels):
        """Temperature scaling on val (see :mod:`transferkit.train.calibration`)."""
        from transferkit.train.calibration import calibrate

        return calibrate(logits, labels)


TASKS = {task.name: task for task in (SingleLabel(),)}


def get_task(name: str = DEFAULT_TASK):
    """The task registered under ``name``; one-line error naming the known ones."""
    if name not in TASKS:
        raise TransferkitError(f"unknown task {name!r}; use one of {', '.join(TASKS)}")
    return TASKS[name]


def task_of(metadata: Mapping):
    """The task of a saved model (checkpoint metadata; models saved before tasks existed are single-label)."""
    return get_task(metadata.get("task", DEFAULT_TASK))


def monitor_names() -> tuple[str, ...]:
    """Every metric some task can monitor, for flag choices."""
    return tuple(dict.fromkeys(name for task in TASKS.values() for name in task.directions))
