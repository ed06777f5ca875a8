"""Where runs are kept: the tracking URI, its checks, the dashboard that shows it, and experiments in it.

The default store is MLflow 3's embedded one, ``sqlite:///mlflow.db`` in the working directory with
artifacts in ``mlruns/`` beside it; ``tracking_uri`` or ``MLFLOW_TRACKING_URI`` point elsewhere (a
shared server). Commands check the store before any work, so a bad URI fails in seconds, not after training.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import urllib.parse
from pathlib import Path

from transferkit.errors import TransferkitError
from transferkit.tracking.naming import clean_key

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ARTIFACTS_FOLDER = "mlruns"  # beside a local sqlite store, like MLflow's own default


@contextlib.contextmanager
def tracking_uri_in_use(uri: str):
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


def check_tracking_store(tracking_uri: str | None = None) -> str:
    """The resolved URI, once it is known runs can be logged there; commands call it before any work.

    A server must answer (in seconds, not after MLflow's minutes of retries); a local store (sqlite file or
    file-store folder) must be writable, with the ``mlruns/`` artifacts folder beside a sqlite file.
    """
    uri = resolve_tracking_uri(tracking_uri)
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        check_reachable(uri)
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


def check_reachable(tracking_uri: str) -> None:
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


def experiment_id(tracking_uri: str, name: str) -> str:
    """The id of experiment ``name``, created (artifacts beside a local sqlite store) if missing."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is None:
        db = sqlite_path(tracking_uri)
        location = (db.parent / ARTIFACTS_FOLDER / clean_key(name)).as_uri() if db else None
        return client.create_experiment(name, artifact_location=location)
    if found.lifecycle_stage == "deleted":
        raise TransferkitError(f"MLflow experiment {name!r} was deleted; restore it in the UI or pass another --experiment")
    return found.experiment_id
