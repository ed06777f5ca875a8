"""The checkpoint policy of a run: which epoch is best, what is written after each epoch, and in which order.

After every epoch ``last.*`` is written, ``best.*`` when the epoch beats the best on ``monitor`` (see the task's
``better``), then ``metrics.csv`` and, last, ``resume.pt``: the commit point (see :mod:`.resume_state`). Only the
main process writes; every process keeps the same history, best row and early-stopping count, so all of them
stop at the same epoch.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch
from torch import nn

from transferkit.core import distributed
from transferkit.core.fileio import atomic_path
from transferkit.models.saved_model import checkpoint_metadata, read_checkpoint_metadata, save_checkpoint
from transferkit.train import resume_state, run_folder


class CheckpointSaver:
    """Best / last checkpoints, the metrics history and the resume state of the run in ``run_dir``."""

    def __init__(self, run_dir: Path | None, *, task, monitor: str, metadata: dict):
        self.run_dir = run_dir
        self.task = task
        self.monitor = monitor
        self.metadata = metadata  # what every checkpoint of the run states (classes, preprocessing, recipe, split...)
        self.history: list[dict] = []
        self.probe: dict | None = None  # epoch 0, LP-FT's probe: a row of metrics.csv, not an epoch run
        self.best: dict | None = None
        self.best_extra: dict = {}  # metadata of the best checkpoint beyond its epoch row (calibration, weights)
        self.bad_epochs = 0

    def record(self, row: dict) -> bool:
        """Append the epoch ``row``; True when it is the new best on ``monitor``."""
        self.history.append(row)
        improved = self.best is None or self.task.better(row, self.best, self.monitor)
        if improved:
            self.best = row
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return improved

    def propose(self, row: dict, model: nn.Module) -> None:
        """A candidate scored before any epoch (LP-FT's probe, epoch 0): the best until an epoch beats it."""
        self.best, self.probe, self.bad_epochs = row, row, 0
        if distributed.is_main():
            self.save("best", row, model, **self.best_extra)

    def commit(self, model: nn.Module, ema, improved: bool, training_state: dict) -> None:
        """Write the epoch just recorded; ``training_state`` (epoch, phase, optimizer...) goes into ``resume.pt``."""
        if distributed.is_main():
            self.save("last", self.history[-1], model)
            if improved:
                if ema is not None:
                    self.best_extra["weights"] = "ema" if self.best["val_weights_ema"] else "raw"
                averaged = ema.full_model(model) if self.best_extra.get("weights") == "ema" else None
                self.save("best", self.best, model if averaged is None else averaged, **self.best_extra)
            self._write_metrics()
            resume_state.save_state(self.run_dir, {
                **training_state, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "history": self.history, "probe": self.probe, "best": self.best, "bad_epochs": self.bad_epochs,
                "best_extra": self.best_extra, "ema": ema.state_dict() if ema is not None else {},
            })
            run_folder.committed(self.run_dir)
        distributed.barrier()

    def restore(self, state: dict) -> None:
        """History, best row and counters of the run being resumed."""
        self.history = list(state["history"])
        self.probe = state.get("probe")
        self.best = dict(state["best"])
        self.bad_epochs = int(state["bad_epochs"])
        self.best_extra = dict(state.get("best_extra", {}))

    @property
    def table(self) -> list[dict]:
        """``metrics.csv``'s rows: the probe (epoch 0) when there is one, then every epoch run."""
        return [self.probe, *self.history] if self.probe is not None else list(self.history)

    def save(self, stem: str, row: dict, model: nn.Module, **extra) -> None:
        """Checkpoint ``stem`` of the epoch ``row`` with the run's metadata and ``extra``."""
        metadata = checkpoint_metadata(model, **self.metadata, epoch=row["epoch"], metrics=row, **extra)
        save_checkpoint(self.run_dir / stem, model, metadata)

    def add_to_best(self, model: nn.Module, **extra) -> None:
        """Rewrite ``best.*`` with more metadata (the calibration's temperature) around the same weights."""
        self.save("best", self.best, model, **self.best_extra, **extra)

    def load_best(self, model: nn.Module, device: torch.device) -> float:
        """Put the best checkpoint's weights into ``model``; returns its temperature (1 when uncalibrated)."""
        from safetensors.torch import load_file

        best = self.run_dir / "best.safetensors"
        model.load_state_dict(load_file(str(best), device=str(device)))
        return float(read_checkpoint_metadata(best).get("temperature", 1.0))

    def write_split(self, records: list[dict]) -> None:
        with atomic_path(self.run_dir / "split.csv") as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["path", "label", "split"])
            writer.writeheader()
            writer.writerows(records)

    def _write_metrics(self) -> None:
        columns = self.task.epoch_columns
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in columns} for row in self.table)  # the probe has val columns only
        with atomic_path(self.run_dir / "metrics.csv") as tmp:
            tmp.write_text(buffer.getvalue())
