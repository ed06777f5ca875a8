"""MLflow tracking: the one module (with :mod:`transferkit.tracking.pyfunc_model`) that talks to MLflow.

Commands open a run with :func:`start_run` and log through the tracker it yields; with tracking
switched off (``--no-track``) the tracker's methods do nothing, so callers never branch on it.
The default store is MLflow 3's embedded one, ``sqlite:///mlflow.db`` in the working directory with
artifacts in ``mlruns/`` beside it; ``tracking_uri`` or ``MLFLOW_TRACKING_URI`` point elsewhere (a
shared server). A run that raises is marked FAILED (KILLED on Ctrl-C) with the error as a tag, so
a reviewer sees broken runs in the UI instead of half-finished ones that look fine.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import warnings
from collections.abc import Iterator, Mapping
from numbers import Number
from pathlib import Path

from transferkit import __version__
from transferkit.errors import TransferkitError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ARTIFACTS_FOLDER = "mlruns"  # beside a local sqlite store, like MLflow's own default
LONG_PARAMS_ARTIFACT = "params/long_values.json"
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
MAX_TAG_VALUE = 8000
MAX_KEY = 250
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DIGEST_TAG = "model_sha256"
_INVALID_KEY_CHARS = re.compile(r"[^\w./\- :]")


@contextlib.contextmanager
def _tracking_uri_in_use(uri: str):
    """Point MLflow at ``uri`` for one run, then restore both its global URI and the environment variable.

    ``mlflow.set_tracking_uri`` also writes (and, given None, deletes) ``$MLFLOW_TRACKING_URI``; a caller's
    variable must survive a tracked command run in-process (a notebook, the test suite).
    """
    import mlflow

    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    # Restore None where the URI came from the environment (or nowhere), so MLflow keeps following the
    # variable and its default store instead of a pinned copy of what they said at this moment.
    current = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    saved_uri = None if current == saved_env else current
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """Explicit URI, else ``$MLFLOW_TRACKING_URI``, else the local sqlite store in the working directory."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the working directory), else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///"):]).expanduser().resolve()


def dashboard_command(backend_store_uri: str | None = None, *, host: str = "127.0.0.1",
                      port: int = 5000) -> tuple[list[str], dict]:
    """``(argv, env)`` of the ``mlflow server`` that shows a local store, its artifacts proxied from beside it.

    One worker and no GenAI job runner (seven extra processes): a review dashboard needs neither.
    """
    uri = resolve_tracking_uri(backend_store_uri)
    if uri.startswith(("http://", "https://", "databricks")):
        raise TransferkitError(f"tracking URI {uri} is already a server; open it in a browser instead of `transferkit ui`")
    db = sqlite_path(uri)
    artifacts = db.parent / ARTIFACTS_FOLDER if db else Path(ARTIFACTS_FOLDER).resolve()
    argv = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--artifacts-destination", str(artifacts),
        "--host", host, "--port", str(port), "--workers", "1",
    ]
    env = {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    return argv, env


def default_run_name(backbone: str, strategy: str) -> str:
    """``<backbone>-<strategy>-<YYYYmmdd-HHMMSS>``: sortable, says what was trained how, and is one folder name
    even for ``hf-hub:org/name`` backbones."""
    from transferkit.core.fileio import safe_name

    return safe_name(f"{backbone}-{strategy}-{time.strftime('%Y%m%d-%H%M%S')}")


def default_experiment_name(dataset_path: str | os.PathLike) -> str:
    """One experiment per dataset, named after its folder, so runs on the same data sit together."""
    return Path(dataset_path).expanduser().resolve().name


def recipe_git_commit(recipe_path: str | os.PathLike | None) -> str | None:
    """HEAD of the git repository holding the user's recipe file, if it is in one."""
    if not recipe_path:
        return None
    folder = Path(recipe_path).expanduser().resolve().parent
    try:
        result = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (result.stdout.strip() or None) if result.returncode == 0 else None


def run_tags(*, backbone: str | None = None, strategy: str | None = None, dataset_fingerprint: str | None = None,
             recipe: str | os.PathLike | None = None) -> dict:
    """The tags a reviewer filters runs by; ``None`` values are left out."""
    tags = {
        "backbone": backbone,
        "strategy": strategy,
        "dataset_fingerprint": dataset_fingerprint,
        "recipe": str(recipe) if recipe else None,
        "recipe_git_commit": recipe_git_commit(recipe),
    }
    return {key: value for key, value in tags.items() if value is not None}


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
            key = _clean_key(key)
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

        numeric = {_clean_key(k): float(v) for k, v in flatten_params(metrics).items() if _is_number(v)}
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
    def set_tags(self, tags: Mapping) -> None:
        import mlflow

        mlflow.set_tags({_clean_key(k): str(v)[:MAX_TAG_VALUE] for k, v in tags.items() if v is not None})

    @_active
    def log_dataset(self, index, context: str = "training") -> None:
        """Record the dataset (a :class:`~transferkit.data.DatasetIndex`) as the run's input.

        The UI then shows it in the runs table's Dataset column (name and fingerprint as digest), and the
        run page lists its rows (path, label, split), so runs on the same images are easy to pick out.
        """
        import mlflow
        import pandas as pd

        frame = pd.DataFrame(index.records(), columns=["path", "label", "split"])
        with warnings.catch_warnings():  # MLflow registers its local-path source twice and warns about it
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_pandas(frame, source=str(index.root), name=Path(index.root).name,
                                              digest=index.fingerprint())
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

        Scalars and per-class precision / recall / F1 become metrics (see
        :func:`transferkit.tracking.summary.evaluation_metrics`; the class-name → key mapping goes to
        ``class_metric_keys.json``); the whole dict and the per-class report (JSON and a readable table) go
        to ``<split>/``, with the files of ``artifacts_dir`` (confusion matrix, error gallery, reliability
        plot) if given. ``step``: the checkpoint's epoch, when the run has epochs.
        """
        from transferkit.tracking.summary import CLASS_KEYS_ARTIFACT, class_metric_keys, evaluation_metrics

        split = scores["split"]
        self.log_metrics(evaluation_metrics(scores), step=step)
        self.log_dict(dict(scores), f"{split}/metrics.json")
        if scores.get("per_class"):
            self.log_dict(class_metric_keys(list(scores["per_class"])), CLASS_KEYS_ARTIFACT)
            self.log_dict(scores["per_class"], f"{split}/per_class.json")
            self.log_text(per_class_table(scores), f"{split}/per_class.txt")
        if artifacts_dir is not None:
            self.log_artifact(artifacts_dir, split)

    @_active
    def set_description(self, markdown: str) -> None:
        """The run page's description (MLflow's note), e.g. from :func:`transferkit.tracking.summary.run_description`."""
        from transferkit.tracking.summary import NOTE_TAG

        self.set_tags({NOTE_TAG: markdown})

    @_active
    def add_evaluation_to_description(self, split: str, line: str) -> None:
        """Add (or replace) the description's line for an evaluation of ``split``."""
        import mlflow

        from transferkit.tracking.summary import NOTE_TAG, with_evaluation

        current = mlflow.get_run(self.run_id).data.tags.get(NOTE_TAG, "")
        self.set_description(with_evaluation(current, split, line))


def per_class_table(metrics: Mapping) -> str:
    """The per-class report as an aligned text table, with the headline numbers under it."""
    per_class = metrics["per_class"]
    width = max([len("class"), *(len(name) for name in per_class)])
    lines = [f"{'class':<{width}}  precision  recall      f1  support"]
    for name, row in per_class.items():
        lines.append(f"{name:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:6.4f}  {row['support']:7d}")
    lines.append("")
    for key, value in metrics.items():
        if _is_number(value):
            lines.append(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return "\n".join(lines) + "\n"


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
    its name, experiment, ``command`` tag and params stay, ``tags`` are added, and an exception leaves its
    status as it was, since the run's own work did not fail.
    """
    if not enabled:
        yield Tracker(None)
        return
    import mlflow

    uri = check_tracking_store(tracking_uri)
    with _tracking_uri_in_use(uri):
        try:
            owner = mlflow.MlflowClient().get_run(run_id) if run_id else None
            visiting = owner is not None and owner.data.tags.get("command") != command
            run = mlflow.start_run(
                run_id=run_id,
                experiment_id=_experiment_id(uri, experiment) if experiment and not run_id else None,
                run_name=None if run_id else run_name or f"{command}-{time.strftime('%Y%m%d-%H%M%S')}",
                nested=mlflow.active_run() is not None,
                tags=None if visiting else {"command": command, "transferkit_version": __version__},
                log_system_metrics=system_metrics and not visiting,
            )
        except mlflow.exceptions.MlflowException as exc:
            raise TransferkitError(f"cannot start an MLflow run in {uri}: {str(exc).splitlines()[0]}; "
                                   "check --tracking-uri / MLFLOW_TRACKING_URI or pass --no-track") from exc
        with run:
            _mark_model_training(run.info.experiment_id)
            tracker = Tracker(run.info.run_id)
            tracker.set_tags(tags or {})
            if params:
                tracker.log_params(params)
            try:
                yield tracker
            except BaseException as exc:
                if visiting:
                    mlflow.end_run(owner.info.status)
                    raise
                tracker.set_tags({"error": f"{type(exc).__name__}: {exc}"})
                if isinstance(exc, KeyboardInterrupt):
                    mlflow.end_run("KILLED")
                raise


def model_digest(checkpoint: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint file (``find_checkpoint`` resolves folders): the model's identity across copies."""
    from transferkit.core.fileio import sha256_file
    from transferkit.models.saved_model import find_checkpoint

    return sha256_file(find_checkpoint(checkpoint))


def find_model_run(digest: str, tracking_uri: str | None = None):
    """The latest MLflow run (``mlflow.entities.Run``) in the store that logged the model whose checkpoint has
    digest ``digest`` (see :meth:`Tracker.log_model`), or None."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    _check_reachable(uri)
    if sqlite_path(uri) is not None and not sqlite_path(uri).exists():
        return None  # no store yet: nothing to find, and MLflow would create one just to look
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    runs = client.search_runs(experiments, filter_string=f"tags.{MODEL_DIGEST_TAG} = '{digest}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def check_tracking_store(tracking_uri: str | None = None) -> str:
    """The resolved URI, once it is known runs can be logged there; commands call it before any work.

    A server must answer (in seconds, not after MLflow's minutes of retries); a local store (sqlite file or
    file-store folder) must be writable, with the ``mlruns/`` artifacts folder beside a sqlite file.
    """
    uri = resolve_tracking_uri(tracking_uri)
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        _check_reachable(uri)
        return uri
    db = sqlite_path(uri)
    if db is not None:
        folders, files = [db.parent, db.parent / ARTIFACTS_FOLDER], [db]
    elif parsed.scheme in ("", "file"):
        folders, files = [Path(urllib.parse.unquote(parsed.path)).expanduser()], []
    else:
        return uri  # another backend (databricks, postgres...): MLflow reports its own errors
    try:
        for folder in folders:
            if folder.exists():
                tempfile.TemporaryFile(dir=folder).close()
        if not folders[0].exists():
            folders[0].mkdir(parents=True)
        for path in files:
            if path.exists():
                os.close(os.open(path, os.O_RDWR))
    except OSError as exc:
        raise TransferkitError(f"tracking store {uri} is not writable ({exc.strerror or exc}); pass a writable "
                               "--tracking-uri (or set MLFLOW_TRACKING_URI), or --no-track") from exc
    return uri


def _check_reachable(tracking_uri: str) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when a tracking server is down."""
    parsed = urllib.parse.urlparse(tracking_uri)
    if parsed.scheme not in ("http", "https"):
        return
    try:
        socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)),
                                 timeout=5).close()
    except OSError as exc:
        raise TransferkitError(f"MLflow tracking server {tracking_uri} is unreachable ({exc.strerror or exc}); "
                               "start it, fix --tracking-uri / MLFLOW_TRACKING_URI, or pass --no-track") from exc


def _experiment_id(tracking_uri: str, name: str) -> str:
    """The id of experiment ``name``, created (artifacts beside a local sqlite store) if missing."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is None:
        db = sqlite_path(tracking_uri)
        location = (db.parent / ARTIFACTS_FOLDER / _clean_key(name)).as_uri() if db else None
        return client.create_experiment(name, artifact_location=location)
    if found.lifecycle_stage == "deleted":
        raise TransferkitError(f"MLflow experiment {name!r} was deleted; restore it in the UI or pass another --experiment")
    return found.experiment_id


def _mark_model_training(experiment_id: str) -> None:
    """Tell the MLflow 3 UI this is a model-training experiment (else it may open in its GenAI layout)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")


def _param_text(value) -> str:
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), default=str)
    return str(value)


def _is_number(value) -> bool:
    return isinstance(value, Number) and not isinstance(value, complex)


def _clean_key(key) -> str:
    """MLflow keys allow letters, digits, ``_ . / - :`` and spaces; anything else (class names!) becomes ``_``."""
    return _INVALID_KEY_CHARS.sub("_", str(key))[:MAX_KEY]
