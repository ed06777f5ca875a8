"""Ensembles: saved models (finetuned, SVM, any mix) averaged on their calibrated probabilities.

The result is a model folder like any other (``model.safetensors`` + ``model.json``), of kind ``ensemble``: it
holds no weights, only the members (paths relative to the folder, and the sha256 each had) and their weight in
the average, so `evaluate` and `predict` take it as they take one model, each member seeing the images through
its own preprocessing. Weights are uniform, or chosen on the val split by greedy forward selection with
replacement (Caruana et al. 2004, "Ensemble selection from libraries of models"): start from every member
once, and each round add the member that most lowers the average's val log loss; the weights are how often
each was added, taken at the round where the loss was lowest (never worse on val than uniform). With a val
split the average gets a temperature of its own (an average of confident members is under-confident).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from transferkit import params
from transferkit.combine.members import LabelledSplit, Member, labelled_split, log_loss, read_members, scores
from transferkit.core.fileio import atomic_dir, refuse_non_empty
from transferkit.errors import TransferkitError
from transferkit.models.saved_model import FORMAT, save_checkpoint
from transferkit.tasks import task_of
from transferkit.version import __version__

DEFAULT_ROUNDS = 20


def build_ensemble(models: Sequence[str | os.PathLike], out: str | os.PathLike, *, data=None, split: str = "val",
                   selection: str = "uniform", rounds: int = DEFAULT_ROUNDS, batch_size: int = 32,
                   workers: int | None = None, device: str = "auto") -> Path:
    """Write the ensemble of ``models`` to the folder ``out`` and return it.

    With ``data``, every member and the ensemble are scored on ``split`` (recorded in the metadata); greedy
    ``selection`` needs it, as the weights are chosen there.
    """
    params.ENSEMBLE_SELECTION.check("selection", selection)
    params.ENSEMBLE_ROUNDS.check("rounds", rounds)
    params.BATCH_SIZE.check("batch_size", batch_size)
    if selection == "greedy" and data is None:
        raise TransferkitError("--selection greedy chooses the weights on a val split: pass --data")
    out = Path(out)
    refuse_non_empty(out)  # before minutes of scoring
    members = read_members(models)
    nested = [m.spec for m in members if m.metadata.get("kind") == "ensemble"]
    if nested:
        raise TransferkitError(f"{nested[0]} is an ensemble itself; list its members instead")
    counts = np.ones(len(members))
    chosen_on, calibration = None, None
    if data is not None:
        val, member_probs = _member_probabilities(members, data, split, batch_size, workers, device)
        if selection == "greedy":
            counts = greedy_selection(member_probs, val.labels, rounds)
        calibration = _calibrate(member_probs, counts, val.labels)
        chosen_on = _selection_report(val, member_probs, counts, data, calibration.temperature)
    metadata = _metadata(members, counts, out, selection, chosen_on)
    if calibration is not None:
        metadata.update(temperature=calibration.temperature, calibration=calibration.metrics())
    with atomic_dir(out) as tmp:
        save_checkpoint(tmp / "model", torch.nn.Module(), metadata)
    return out


def greedy_selection(member_probs: Sequence[np.ndarray], labels: np.ndarray, rounds: int) -> np.ndarray:
    """How many times each member enters the average: Caruana's selection with replacement by val log loss,
    started from every member once (his "sorted initialisation", which keeps a small val split from handing
    all the weight to one member), keeping the round with the lowest loss (round 0: the uniform average)."""
    counts = np.ones(len(member_probs))
    total = np.sum(member_probs, axis=0, dtype=np.float64)
    best_loss, best_counts = log_loss(total / counts.sum(), labels), counts.copy()
    for _ in range(rounds):
        losses = [log_loss((total + probs) / (counts.sum() + 1), labels) for probs in member_probs]
        pick = int(np.argmin(losses))  # ties: the earlier member
        counts[pick] += 1
        total += member_probs[pick]
        if losses[pick] < best_loss:
            best_loss, best_counts = losses[pick], counts.copy()
    return best_counts


def _member_probabilities(members: list[Member], data, split: str, batch_size: int, workers, device):
    from transferkit.core.runtime import select_device
    from transferkit.models.predictors import load_predictor
    from transferkit.use.predict import predict_paths

    predictors = [load_predictor(m.checkpoint, select_device(device)) for m in members]
    val = labelled_split(predictors[0], data, split)
    runs = [predict_paths(p, val.paths, batch_size=batch_size, workers=workers) for p in predictors]
    readable = np.array([not any(errors[i] for _, errors in runs) for i in range(len(val.paths))], dtype=bool)
    if not readable.any():
        raise TransferkitError(f"none of the {len(val.paths)} images of the {val.name} split could be decoded")
    kept = LabelledSplit(val.name, [p for p, ok in zip(val.paths, readable) if ok], val.labels[readable])
    return kept, [probs[readable].astype(np.float64) for probs, _ in runs]


def _average(member_probs, counts: np.ndarray) -> np.ndarray:
    return np.tensordot(counts / counts.sum(), np.stack(member_probs), axes=1)


def _calibrate(member_probs, counts: np.ndarray, labels: np.ndarray):
    """A temperature for the average itself: averaging sure members makes a less sure ensemble (ECE rises
    as accuracy does), so the combination is re-scaled on val, under the same rules as a run's calibration."""
    from transferkit.train.calibration import calibrate

    log_probs = np.log(np.clip(_average(member_probs, counts), 1e-12, None))
    return calibrate(torch.from_numpy(log_probs), torch.from_numpy(labels))


def _selection_report(val: LabelledSplit, member_probs, counts: np.ndarray, data, temperature: float) -> dict:
    from transferkit.models.predictors import rescale

    combined = _average(member_probs, counts)
    return {"data": str(data), "split": val.name, "images": len(val.paths),
            "members": [scores(probs, val.labels) for probs in member_probs],
            "ensemble": scores(rescale(combined, temperature), val.labels),
            "ensemble_uncalibrated": scores(combined, val.labels)}


def _metadata(members: list[Member], counts: np.ndarray, out: Path, selection: str, chosen_on) -> dict:
    from transferkit.models.predictors import member_fingerprint

    used = [(m, c) for m, c in zip(members, counts) if c > 0]
    first = members[0].metadata
    return {
        "format": FORMAT,
        "kind": "ensemble",
        "task": task_of(first).name,
        "class_names": list(first["class_names"]),
        "combine": "weighted mean of the members' calibrated probabilities",
        "selection": selection,
        "members": [{"path": os.path.relpath(m.checkpoint.resolve(), out.resolve()),
                     "sha256": member_fingerprint(m.checkpoint), "weight": float(c / counts.sum()),
                     "kind": m.metadata.get("kind"), "backbone": m.metadata.get("backbone")} for m, c in used],
        "chosen_on": chosen_on,
        "transferkit_version": __version__,
    }
