"""What ensembles and soups share: reading the members, checking they answer the same question, and scoring
each on the val split they were chosen on."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.errors import TransferkitError
from transferkit.models.saved_model import find_checkpoint, read_checkpoint_metadata
from transferkit.tasks import task_of


@dataclass(frozen=True)
class Member:
    spec: str
    checkpoint: Path
    metadata: dict


def read_members(specs: Sequence[str | os.PathLike], *, minimum: int = 2) -> list[Member]:
    """The members' checkpoints and metadata, refused unless they share class names (in order) and task."""
    if len(specs) < minimum:
        raise TransferkitError(f"give at least {minimum} models to combine; got {len(specs)}")
    members = []
    for spec in specs:
        checkpoint = find_checkpoint(spec)
        members.append(Member(str(spec), checkpoint, read_checkpoint_metadata(checkpoint)))
    first = members[0]
    for member in members[1:]:
        if member.metadata["class_names"] != first.metadata["class_names"]:
            raise TransferkitError(
                f"{member.spec} predicts classes {', '.join(member.metadata['class_names'])}, but {first.spec} "
                f"predicts {', '.join(first.metadata['class_names'])}; combine models of the same classes")
        if task_of(member.metadata).name != task_of(first.metadata).name:
            raise TransferkitError(f"{member.spec} is a {task_of(member.metadata).name} model and {first.spec} a "
                                   f"{task_of(first.metadata).name} one; combine models of the same task")
    return members


@dataclass(frozen=True)
class LabelledSplit:
    name: str
    paths: list
    labels: np.ndarray  # class indices in the members' class order


def labelled_split(predictor, data: str | os.PathLike, split: str) -> LabelledSplit:
    """``split`` of ``data`` as the model sees it (a split the model recorded is rebuilt from its records)."""
    from transferkit.data import discover
    from transferkit.use.evaluate import select_labelled_samples

    name, samples, labels = select_labelled_samples(predictor, discover(data, val_ratio=0, strict=False), split)
    return LabelledSplit(name, [s.path for s in samples], labels)


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped away from 0)."""
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def scores(probs: np.ndarray, labels: np.ndarray) -> dict:
    """The val numbers members and their combination are compared by."""
    from transferkit.reports.metrics import expected_calibration_error

    return {"accuracy": float((probs.argmax(axis=1) == labels).mean()), "nll": log_loss(probs, labels),
            "ece": float(expected_calibration_error(labels, probs))}
