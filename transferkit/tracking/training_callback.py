"""A finetune run in MLflow, as a listener of the trainer's events (:mod:`transferkit.train.callbacks`).

One MLflow run per run folder, in one experiment per dataset. Each epoch is logged as the ``epoch/<column>``
series (step = epoch); the best checkpoint's columns are logged under their own names at step = its epoch,
so the latest value of a summary key — what the runs table shows and sorts by — is always the best
checkpoint's, also while training runs and in a run that crashed. At the end: config, metrics, curves, the
review's report and files, the pyfunc model and the run page's description.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from transferkit.train.callbacks import Callback

EPOCH_SERIES_PREFIX = "epoch/"
UI_URL = "http://127.0.0.1:5000"  # where `transferkit ui` serves the dashboard by default


class MLflowCallback(Callback):
    def __init__(self, recipe: str | None = None):
        self.recipe = recipe
        self.tracker = None
        self.summary_epoch: int | None = None  # the epoch whose summary metrics this MLflow run holds
        self.where: list[str] = []  # :meth:`describe`'s lines, made while the run is open
        self._run = contextlib.ExitStack()

    def on_run_start(self, run) -> None:
        from transferkit.tracking.naming import display_run_name
        from transferkit.tracking.tracker import open_run

        config = run.config
        self.tracker = self._run.enter_context(open_run(
            "finetune", data=config.data, experiment=config.experiment, tracking_uri=config.tracking_uri,
            run_name=config.name or display_run_name(config.backbone, config.strategy, config.lr, config.seed),
            backbone=config.backbone, strategy=config.strategy,
            dataset_fingerprint=run.fingerprint, recipe=self.recipe, params=config.to_dict(), system_metrics=True))
        self.where = self._where()
        self.tracker.log_dataset(run.index, run.fingerprint, context="training")
        self.tracker.set_description(f"**{self._title(run)}**: training (summary when the run ends)\n")
        self.tracker.log_params({"data_config": run.preprocessing.data_config, "classes": run.index.classes,
                                 "counts": run.index.counts()})

    def on_measurement(self, run, metrics: dict, artifact: Path | None = None) -> None:
        self.tracker.log_metrics(metrics)
        if artifact is not None:
            self.tracker.log_artifact(artifact)

    def on_best_checkpoint(self, run, row: dict) -> None:
        if row["epoch"] == 0:  # LP-FT's probe is epoch 0 of every series, as it is a row of metrics.csv
            self._log_epoch(row)
        self._log_summary(run, row)

    def on_epoch_end(self, run, row: dict, improved: bool) -> bool:
        self._log_epoch(row)
        return False

    def describe(self, run) -> list[str]:
        return self.where

    def _where(self) -> list[str]:
        """Where the run is: its MLflow id, experiment and store, its page in `transferkit ui`, and the
        experiment's runs table best first."""
        import mlflow

        from transferkit.tracking.store import redact
        from transferkit.tracking.summary import BEST_VIEW_KEY

        if self.tracker.run_id is None:
            return []
        info = mlflow.get_run(self.tracker.run_id).info
        experiment = mlflow.get_experiment(info.experiment_id).name
        return [f"MLflow run {info.run_id} in experiment {experiment!r} ({redact(mlflow.get_tracking_uri())})",
                f"transferkit ui   then {UI_URL}/#/experiments/{info.experiment_id}/runs/{info.run_id}",
                f"best runs first: {UI_URL}/#/experiments/{info.experiment_id}/runs?viewStateShareKey={BEST_VIEW_KEY}"]

    def _log_epoch(self, row: dict) -> None:
        self.tracker.log_metrics({EPOCH_SERIES_PREFIX + k: v for k, v in row.items() if k != "epoch"},
                                 step=row["epoch"])

    def on_run_end(self, run, summary: dict) -> dict:
        config, best = run.config, run.checkpoints.best
        for path in (run.run_dir / "config.yaml", run.run_dir / "metrics.csv", run.run_dir / "curves.png"):
            self.tracker.log_artifact(path)
        checkpoint_columns = run.task.checkpoint_columns
        # the best epoch's val scores were logged with it; logged again they would be a second point
        self.tracker.log_evaluation({k: v for k, v in run.review.report.items() if k not in checkpoint_columns},
                                    artifacts_dir=run.review.folder, step=best["epoch"])
        for path in run.review.artifacts:
            self.tracker.log_artifact(path)
        if self.summary_epoch != best["epoch"]:  # a resumed run logs to a new MLflow run that missed its best epoch
            self._log_summary(run, best)
        self.tracker.log_metrics({"epochs_run": summary["epochs_run"]}, step=best["epoch"])
        model_uri = self.tracker.log_model(run.run_dir / "best.safetensors", register=config.register)
        self.tracker.describe(self._title(run), self._facts(run, summary, model_uri),
                              {k: summary[k] for k in run.task.headline_metrics if k in summary})
        added = {"mlflow_run_id": self.tracker.run_id, "model_uri": model_uri}
        self._run.close()
        return added

    def on_failure(self, run, error: BaseException) -> None:
        """The run is marked FAILED (KILLED for Ctrl-C) with the error as a tag."""
        self._run.__exit__(type(error), error, error.__traceback__)

    def _log_summary(self, run, row: dict) -> None:
        """The checkpoint's columns under their own names, plus ``best_epoch``, at step = its epoch."""
        epoch = row["epoch"]
        self.tracker.log_metrics({**{k: row[k] for k in run.task.checkpoint_columns}, "best_epoch": epoch},
                                 step=epoch)
        self.summary_epoch = epoch

    @staticmethod
    def _title(run) -> str:
        return f"{run.config.backbone} · {run.config.strategy} on {Path(run.index.root).name}"

    @staticmethod
    def _facts(run, summary: dict, model_uri: str | None) -> list[str]:
        """The run page's facts: what was trained on what, which epoch was kept, where to look."""
        config, index = run.config, run.index
        counts = index.counts()
        n_train, n_val = (sum(counts.get(split, {}).values()) for split in ("train", "val"))
        stop = f", stopped early (no `{config.monitor}` progress)" if summary["stopped_early"] else ""
        facts = [
            f"data: `{index.root}`: {n_train} train / {n_val} val images, {len(index.classes)} classes "
            f"(fingerprint `{run.fingerprint[:12]}`)",
            f"best checkpoint (by `{config.monitor}`): epoch {summary['best_epoch']} of {summary['epochs_run']}{stop}",
            "confusion matrix: artifacts `val/confusion_matrix.png` and `val/confusion_matrix_normalized.png`; "
            "per class: `val/per_class.txt`; worst errors: `val/errors.png`",
        ]
        if model_uri:
            facts.append(f"model: `{model_uri}`" + (f", registered as `{config.register}`" if config.register else ""))
        return facts
