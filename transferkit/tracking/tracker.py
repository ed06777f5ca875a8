"""Logging into an MLflow run: the one module (with :mod:`transferkit.tracking.pyfunc_model`) that logs to MLflow.

Commands open their run with :func:`open_run` and log through the :class:`Tracker` it yields; with tracking
switched off (``--no-track``) the tracker's methods do nothing, so callers never branch on it. A run that
raises is marked FAILED (KILLED on Ctrl-C) with the error as a tag, so a reviewer sees broken runs in the UI
instead of half-finished ones that look fine.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from transferkit.errors import TransferkitError
from transferkit.reports.metrics import is_number
from transferkit.tracking.lookup import MODEL_DIGEST_TAG, model_digest
from transferkit.tracking.naming import clean_key, default_experiment_name, default_run_name, run_tags
from transferkit.tracking.store import check_tracking_store, experiment_id, redact, tracking_uri_in_use
from transferkit.version import __version__

LONG_PARAMS_ARTIFACT = "params/long_values.json"
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
MAX_TAG_VALUE = 8000
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_COMMANDS = ("finetune", "svm")  # the runs that trained a model, ranked in the experiment's description


def flatten_params(nested: Mapping, prefix: str = "") -> dict:
    """Nested mappings → ``{"a.b.c": value}``; lists stay whole values (JSON text when logged)."""
    flat = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def _active(method):
    """Tracker methods are no-ops when tracking is off."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.run_id is None:
            return None
        return method(self, *args, **kwargs)

    return wrapper


class Tracker:
    """Logs into one MLflow run; ``run_id is None`` means tracking is off and every method does nothing."""

    def __init__(self, run_id: str | None = None):
        self.run_id = run_id
        self._long_params: dict[str, str] = {}

    @_active
    def log_params(self, params: Mapping) -> None:
        """Log params (nested mappings are flattened); values over MLflow's length limit go to an artifact."""
        import mlflow

        short = {}
        for key, value in flatten_params(params).items():
            text = _param_text(value)
            key = clean_key(key)
            if len(text) > MAX_PARAM_VALUE:
                self._long_params[key] = text
                text = f"<{len(text)} characters, see {LONG_PARAMS_ARTIFACT}>"
            short[key] = text
        if self._long_params:
            mlflow.log_dict(self._long_params, LONG_PARAMS_ARTIFACT)
        mlflow.log_params(short)

    @_active
    def log_metrics(self, metrics: Mapping, step: int | None = None) -> None:
        """Log the numeric scalars of ``metrics`` (nested mappings flattened, anything else skipped)."""
        import mlflow

        numeric = {clean_key(k): float(v) for k, v in flatten_params(metrics).items() if is_number(v)}
        if numeric:
            mlflow.log_metrics(numeric, step=step)

    @_active
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Log a file, or a folder's contents, under ``artifact_path`` in the run."""
        import mlflow

        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path)
        elif path.is_file():
            mlflow.log_artifact(str(path), artifact_path)
        else:
            raise TransferkitError(f"cannot log artifact {path}: it does not exist")

    @_active
    def log_dict(self, obj, filename: str) -> None:
        """Log ``obj`` as JSON or YAML (chosen by ``filename``'s extension) without a local file."""
        import mlflow

        mlflow.log_dict(obj, filename)

    @_active
    def log_text(self, text: str, filename: str) -> None:
        import mlflow

        mlflow.log_text(text, filename)

    @_active
    def log_table(self, columns: Mapping[str, Sequence], filename: str) -> None:
        """A table the UI shows as a grid (and compares across runs), replaced if logged again.

        The file and tag ``mlflow.log_table`` writes, without its append: a re-evaluation of a split replaces its
        table instead of adding a second copy of every row.
        """
        import mlflow
        from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

        mlflow.log_dict({"columns": list(columns), "data": [list(row) for row in zip(*columns.values())]}, filename)
        logged = json.loads(mlflow.get_run(self.run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
        if {"path": filename, "type": "table"} not in logged:
            mlflow.set_tag(MLFLOW_LOGGED_ARTIFACTS, json.dumps([*logged, {"path": filename, "type": "table"}]))

    @_active
    def set_tags(self, tags: Mapping) -> None:
        import mlflow

        mlflow.set_tags({clean_key(k): str(v)[:MAX_TAG_VALUE] for k, v in tags.items() if v is not None})

    @_active
    def tag(self, name: str) -> str | None:
        """The run's tag ``name`` as the store has it now (another process may have set it)."""
        import mlflow

        return mlflow.MlflowClient().get_run(self.run_id).data.tags.get(clean_key(name))

    @_active
    def log_dataset(self, index, fingerprint: str, context: str = "training") -> None:
        """Record the dataset (a :class:`~transferkit.data.DatasetIndex`) as the run's input.

        The UI then shows it in the runs table's Dataset column (name and ``fingerprint`` as digest), and the
        run page lists its rows (path, label, split), so runs on the same images are easy to pick out. The
        caller passes the fingerprint it already has: computing one stats every file.
        """
        import mlflow
        import pandas as pd

        frame = pd.DataFrame(index.records(), columns=["path", "label", "split"])
        with warnings.catch_warnings():  # MLflow registers its local-path source twice and warns about it
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_pandas(frame, source=str(index.root), name=Path(index.root).name,
                                              digest=fingerprint)
        mlflow.log_input(dataset, context=context)

    @_active
    def log_model(self, checkpoint_path: str | os.PathLike, register: str | None = None) -> str:
        """Log a checkpoint as the run's pyfunc model (see :mod:`transferkit.tracking.pyfunc_model`); returns its URI.

        The URI is ``runs:/<run_id>/model``, which ``transferkit predict/evaluate`` and ``mlflow models
        serve`` accept. ``register`` also registers the model under that name. The run is tagged with the
        checkpoint's digest, so ``evaluate`` finds the run of a model wherever its file was copied to.
        """
        from transferkit.tracking.pyfunc_model import MODEL_ARTIFACT, log_model

        log_model(checkpoint_path, name=MODEL_ARTIFACT, register=register)
        self.set_tags({MODEL_DIGEST_TAG: model_digest(checkpoint_path)})
        return f"runs:/{self.run_id}/{MODEL_ARTIFACT}"

    @_active
    def log_evaluation(self, scores: Mapping, artifacts_dir: str | os.PathLike | None = None,
                       step: int | None = None) -> None:
        """An evaluation (:func:`transferkit.reports.metrics.split_scores` form: ``val_accuracy``...) on the run.

        Its scalars become metrics (:func:`transferkit.tracking.summary.evaluation_metrics`); the whole dict goes
        to ``<split>/metrics.json`` and the per-class report to ``<split>/per_class.json`` (an MLflow table, which
        the UI shows as a grid and compares across runs) and ``<split>/per_class.txt`` (readable), with the files
        of ``artifacts_dir`` (confusion matrix, error gallery, reliability plot) if given. ``step``: the
        checkpoint's epoch, when the run has epochs.
        """
        from transferkit.reports.evaluation_report import per_class_table
        from transferkit.tracking.summary import evaluation_metrics, per_class_columns

        split = scores["split"]
        self.log_metrics(evaluation_metrics(scores), step=step)
        self.log_dict(dict(scores), f"{split}/metrics.json")
        if scores.get("per_class"):
            self.log_table(per_class_columns(scores["per_class"]), f"{split}/per_class.json")
            self.log_text(per_class_table(scores), f"{split}/per_class.txt")
        if artifacts_dir is not None:
            self.log_artifact(artifacts_dir, split)

    @_active
    def set_description(self, markdown: str) -> None:
        """The run page's description (MLflow's note) as given; :meth:`describe` composes the usual one."""
        from transferkit.tracking.summary import NOTE_TAG

        self.set_tags({NOTE_TAG: markdown})

    @_active
    def describe(self, title: str, facts: Sequence[str] = (), headline: Mapping[str, float] | None = None) -> None:
        """The run page's description in the one layout every command uses (see
        :func:`transferkit.tracking.summary.run_description`): a title, facts, the headline metrics. Written as
        a command's run ends, it also refreshes the experiment's (:meth:`describe_experiment`)."""
        from transferkit.tracking.summary import run_description

        self.set_description(run_description(title, facts, headline))
        self.describe_experiment()

    @_active
    def describe_experiment(self) -> None:
        """Name the experiment's best finished run (this one counts while still open) in its description, and
        give each ranked run its place as the metric ``rank_in_experiment`` (the best-first view sorts by it).

        Recomputed from the store each time (a finetune's end, an evaluation of a run's model), so it names the
        better run whichever process finished last. Runs rank by the headline metric, ties by lower val loss,
        then the earlier run; only runs that trained a model count (not a sweep's parent, a copy of its winner's
        scores, nor an evaluation of a model from elsewhere).
        """
        import mlflow

        from transferkit.tasks import get_task
        from transferkit.tracking.summary import NOTE_TAG, RANK_METRIC, TIE_BREAK, experiment_description

        headline = get_task().headline
        client = mlflow.MlflowClient()
        experiment = client.get_run(self.run_id).info.experiment_id
        runs = [run for run in client.search_runs(
            [experiment], f"metrics.`{headline}` >= 0", max_results=1000,
            order_by=[f"metrics.`{headline}` DESC", f"metrics.`{TIE_BREAK}` ASC", "attributes.start_time ASC"])
            if run.data.tags.get("command") in MODEL_COMMANDS
            and (run.info.status == "FINISHED" or run.info.run_id == self.run_id)]
        if not runs:
            return
        for place, run in enumerate(runs, 1):
            if run.data.metrics.get(RANK_METRIC) != place:
                client.log_metric(run.info.run_id, RANK_METRIC, place)
        best = runs[0]
        client.set_experiment_tag(experiment, NOTE_TAG, experiment_description(headline, {
            "name": best.info.run_name, "run_id": best.info.run_id, "experiment_id": experiment,
            "metrics": best.data.metrics, "settings": best.data.params, "backbone": best.data.tags.get("backbone", "?"),
        }, len(runs)))

    @_active
    def end_child_runs(self, run_name: str, status: str, error: str) -> list[str]:
        """End this run's nested runs named ``run_name`` still RUNNING (left by a killed process) with
        ``status`` and an ``error`` tag; returns their ids."""
        import mlflow

        client = mlflow.MlflowClient()
        experiment = client.get_run(self.run_id).info.experiment_id
        runs = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{self.run_id}' and "
                                                f"attributes.run_name = '{run_name}' and attributes.status = 'RUNNING'")
        for run in runs:
            client.set_tag(run.info.run_id, "error", error)
            client.set_terminated(run.info.run_id, status)
        return [run.info.run_id for run in runs]

    @_active
    def add_evaluation_to_description(self, split: str, line: str) -> None:
        """Add (or replace) the description's line for an evaluation of ``split``."""
        import mlflow

        from transferkit.tracking.summary import NOTE_TAG, with_evaluation

        current = mlflow.get_run(self.run_id).data.tags.get(NOTE_TAG, "")
        self.set_description(with_evaluation(current, split, line))
        self.describe_experiment()  # its test score is part of the experiment's "best run" lines


@contextlib.contextmanager
def open_run(command: str, *, data: str | os.PathLike | None = None, backbone: str | None = None,
             strategy: str | None = None, dataset_fingerprint: str | None = None,
             recipe: str | os.PathLike | None = None, params: Mapping | None = None, tags: Mapping | None = None,
             tracking_uri: str | None = None, experiment: str | None = None, run_name: str | None = None,
             enabled: bool = True, run_id: str | None = None, system_metrics: bool = False) -> Iterator[Tracker]:
    """The run of ``command``, named and tagged the same way by every command; yields its :class:`Tracker`.

    ``experiment`` defaults to the dataset's (:func:`~transferkit.tracking.naming.default_experiment_name` of
    ``data``), ``run_name`` to ``<backbone>-<strategy>-<time>`` when both are given; the tags a reviewer
    filters by (:func:`~transferkit.tracking.naming.run_tags`) are set with ``tags``, and ``params`` logged.
    ``system_metrics`` (CPU/GPU sampling) is worth its thread only for long training. ``run_id`` reopens a
    run, as in :func:`start_run`.
    """
    if not enabled:
        yield Tracker(None)
        return
    with start_run(
        command, tracking_uri=tracking_uri, run_id=run_id, params=params, system_metrics=system_metrics,
        experiment=experiment or (default_experiment_name(data) if data is not None else None),
        run_name=run_name or (default_run_name(backbone, strategy) if backbone and strategy else None),
        tags={**run_tags(backbone=backbone, strategy=strategy, dataset_fingerprint=dataset_fingerprint, recipe=recipe),
              **(tags or {})},
    ) as tracker:
        yield tracker


@contextlib.contextmanager
def start_run(command: str, *, enabled: bool = True, tracking_uri: str | None = None, experiment: str | None = None,
              run_name: str | None = None, tags: Mapping | None = None, params: Mapping | None = None,
              system_metrics: bool = True, run_id: str | None = None) -> Iterator[Tracker]:
    """Open an MLflow run for ``command`` and yield its :class:`Tracker` (a no-op one when not ``enabled``).

    ``experiment`` is created if missing (MLflow's default experiment when None); ``run_name`` defaults to
    ``<command>-<timestamp>`` rather than MLflow's random words. Tags ``command`` and
    ``transferkit_version`` are always set. ``system_metrics`` samples CPU/RAM (and GPU when
    ``nvidia-ml-py`` is installed) in the background. An exception inside the block marks the run
    FAILED (KILLED for Ctrl-C) and is re-raised. Opened while another run is active (a sweep's parent), the
    run is its nested child.

    ``run_id`` reopens that existing run instead of starting a new one. Reopened by the command that created
    it (several processes of one sweep share its parent run), it is that command's run as above. Reopened by
    another command (``evaluate`` adding a test score to the run that trained the model), it is visited:
    its name, experiment, ``command`` tag and params stay, ``tags`` are added, and its status and end time stay
    as they were: an exception in the visit is no failure of the run's own work, and its Duration stays the
    training's.
    """
    if not enabled:
        yield Tracker(None)
        return
    import mlflow

    uri = check_tracking_store(tracking_uri)
    with tracking_uri_in_use(uri):
        try:
            owner = mlflow.MlflowClient().get_run(run_id) if run_id else None
            visiting = owner is not None and owner.data.tags.get("command") != command
            run = mlflow.start_run(
                run_id=run_id,
                experiment_id=experiment_id(uri, experiment) if experiment and not run_id else None,
                run_name=None if run_id else run_name or f"{command}-{time.strftime('%Y%m%d-%H%M%S')}",
                nested=mlflow.active_run() is not None,
                tags=None if visiting else {"command": command, "transferkit_version": __version__},
                log_system_metrics=system_metrics and not visiting,
            )
        except mlflow.exceptions.MlflowException as exc:
            raise TransferkitError(redact(f"cannot start an MLflow run in {uri}: {str(exc).splitlines()[0]}; "
                                          "check --tracking-uri / MLFLOW_TRACKING_URI or pass --no-track")) from exc
        try:
            with run:
                _prepare_experiment(run.info.experiment_id)
                tracker = Tracker(run.info.run_id)
                tracker.set_tags(tags or {})
                if params:
                    tracker.log_params(params)
                try:
                    yield tracker
                except BaseException as exc:
                    if not visiting:
                        tracker.set_tags({"error": f"{type(exc).__name__}: {exc}"})
                        if isinstance(exc, KeyboardInterrupt):
                            mlflow.end_run("KILLED")
                    raise
        finally:
            if visiting:  # its status and end time as they were: its Duration is its training's, not the visit's
                mlflow.MlflowClient().set_terminated(run_id, owner.info.status, end_time=owner.info.end_time)


def _prepare_experiment(experiment: str) -> None:
    """Tell the MLflow 3 UI this is a model-training experiment (else it may open in its GenAI layout), and give
    it the "best first" saved view (:func:`transferkit.tracking.summary.best_view`) that `transferkit ui` links to."""
    from mlflow import MlflowClient

    from transferkit.tasks import get_task
    from transferkit.tracking.summary import BEST_VIEW_TAG, best_view

    client = MlflowClient()
    tags = client.get_experiment(experiment).tags
    if EXPERIMENT_KIND_TAG not in tags:
        client.set_experiment_tag(experiment, EXPERIMENT_KIND_TAG, "custom_model_development")
    if BEST_VIEW_TAG not in tags:
        client.set_experiment_tag(experiment, BEST_VIEW_TAG, best_view(get_task().headline, int(time.time() * 1000)))


def _param_text(value) -> str:
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), default=str)
    return str(value)


def log_metric_on_runs(key: str, values: Mapping[str, float], tracking_uri: str | None = None) -> None:
    """``key`` logged on each of several finished runs (``{run_id: value}``), e.g. their place in a ranking."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    for run_id, value in values.items():
        client.log_metric(run_id, key, value)
