"""Listeners of a finetune run, called on named events: how tracking (and a sweep's pruner) joins a run.

The trainer knows nothing of MLflow or Optuna: it calls each attached :class:`Callback` at the events below, in
the order the callbacks were given. Only the main process calls them (under torchrun the other ranks train
the same steps silently). ``run`` is the trainer itself (:class:`transferkit.train.engine.Trainer`): its
``config``, ``index``, ``fingerprint``, ``preprocessing``, ``run_dir``, ``task`` and ``checkpoints`` (best row,
history) are what a listener reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class Callback:
    """Every hook does nothing; a listener overrides the ones it needs."""

    def on_run_start(self, run) -> None:
        """The run folder holds ``config.yaml`` and ``split.csv``; no epoch has run."""

    def on_measurement(self, run, metrics: dict, artifact: Path | None = None) -> None:
        """A step outside the epochs measured something (LP-FT head fit, LR range test, calibration)."""

    def on_best_checkpoint(self, run, row: dict) -> None:
        """``best.*`` now holds the epoch ``row`` (epoch 0: LP-FT's probe)."""

    def on_epoch_end(self, run, row: dict, improved: bool) -> bool:
        """The epoch ``row`` is committed (``resume.pt`` written). True stops the run, finished like an early stop."""
        return False

    def on_run_end(self, run, summary: dict) -> dict:
        """The review is written; what this returns is added to ``result.json`` (e.g. the MLflow run id)."""
        return {}

    def on_failure(self, run, error: BaseException) -> None:
        """The run raised ``error`` after :meth:`on_run_start`; it is re-raised once every listener heard it."""

    def describe(self, run) -> list[str]:
        """Lines for the run's header and footer (where a tracked run can be seen); asked after
        :meth:`on_run_start` and after :meth:`on_run_end`."""
        return []


class CallbackList:
    """The attached callbacks, called as one."""

    def __init__(self, callbacks: Sequence[Callback] = ()):
        self.callbacks = list(callbacks)

    def on_run_start(self, run) -> None:
        for callback in self.callbacks:
            callback.on_run_start(run)

    def on_measurement(self, run, metrics: dict, artifact: Path | None = None) -> None:
        for callback in self.callbacks:
            callback.on_measurement(run, metrics, artifact)

    def on_best_checkpoint(self, run, row: dict) -> None:
        for callback in self.callbacks:
            callback.on_best_checkpoint(run, row)

    def on_epoch_end(self, run, row: dict, improved: bool) -> bool:
        """True when any listener asks to stop (every listener still hears the epoch)."""
        stops = [callback.on_epoch_end(run, row, improved) for callback in self.callbacks]
        return any(stops)

    def on_run_end(self, run, summary: dict) -> dict:
        added: dict = {}
        for callback in self.callbacks:
            added.update(callback.on_run_end(run, summary) or {})
        return added

    def on_failure(self, run, error: BaseException) -> None:
        for callback in self.callbacks:
            callback.on_failure(run, error)

    def describe(self, run) -> list[str]:
        return [line for callback in self.callbacks for line in callback.describe(run)]
