"""Where runs are kept: the tracking URI, its checks, the dashboard that shows it, and experiments in it.

The default store is MLflow 3's embedded one, ``sqlite:///mlflow.db`` in the working directory with
artifacts in ``mlruns/`` beside it; ``tracking_uri`` or ``MLFLOW_TRACKING_URI`` point elsewhere (a
shared server). Commands check the store before any work, so a bad URI fails in seconds, not after training;
the check also creates a new database store, one process at a time (MLflow's table migrations race when two
start together). A URL that reaches a message or a log goes through :func:`redact` first: no password in clear.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from transferkit.errors import TransferkitError
from transferkit.tracking.naming import clean_key

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ARTIFACTS_FOLDER = "mlruns"  # beside a local sqlite store, like MLflow's own default
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy stores (with a +driver)
STORE_ATTEMPTS = 3
# user:password@ in a URL's authority, and secrets passed as query parameters (?password=..., &token=...)
_USERINFO = re.compile(r"(?P<keep>[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^/\s]*@", re.IGNORECASE)
_QUERY_SECRET = re.compile(r"(?P<keep>[?&;](?:password|passwd|pwd|token|access_token|secret|api_key|apikey)=)[^&;#\s]*",
                           re.IGNORECASE)


def redact(text: str | None) -> str | None:
    """``text`` (a URL, or a message quoting URLs) with every password and token in a URL replaced by ``***``.

    ``postgresql://user:s3cret@db/optuna`` → ``postgresql://user:***@db/optuna``; the user name stays, so a
    message still says who connected where. Every URL a message, a log or a param shows passes through here.
    """
    if not text:
        return text
    return _QUERY_SECRET.sub(r"\g<keep>***", _USERINFO.sub(r"\g<keep>***@", text))


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
        raise TransferkitError(f"tracking URI {redact(uri)} is already a server; open it in a browser instead of "
                               "`transferkit ui`")
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
    elif parsed.scheme.split("+")[0] in DATABASE_SCHEMES:
        _create_store(uri)
        return uri
    else:
        return uri  # another backend (databricks...): MLflow reports its own errors
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
        raise TransferkitError(f"tracking store {redact(uri)} is not writable ({exc.strerror or exc}); pass a "
                               "writable --tracking-uri (or set MLFLOW_TRACKING_URI), or --no-track") from exc
    if db is not None:
        _create_store(f"sqlite:///{db}")  # the file itself: a relative URI names another file in another folder
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
        raise TransferkitError(f"MLflow tracking server {redact(tracking_uri)} is unreachable ({exc.strerror or exc}); "
                               "start it, fix --tracking-uri / MLFLOW_TRACKING_URI, or pass --no-track") from exc


def experiment_id(tracking_uri: str, name: str) -> str:
    """The id of experiment ``name``, created (artifacts beside a local sqlite store) if missing."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is None:
        db = sqlite_path(tracking_uri)
        location = (db.parent / ARTIFACTS_FOLDER / clean_key(name)).as_uri() if db else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:
            found = client.get_experiment_by_name(name)  # another process created it between our look and create
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise TransferkitError(f"MLflow experiment {name!r} was deleted; restore it in the UI or pass another --experiment")
    return found.experiment_id


@functools.cache
def _create_store(uri: str) -> None:
    """Open the database store of ``uri`` once per process, which creates (or migrates) its tables: one process
    at a time for a sqlite file (a lock beside it), a few tries for a server database another process is
    setting up. Two sweeps started together on a fresh store otherwise die in MLflow's migrations."""
    from mlflow import MlflowClient

    db = sqlite_path(uri)
    if db is not None:
        from filelock import FileLock

        lock = FileLock(db.parent / f".{db.name}.lock")
    else:
        lock = contextlib.nullcontext()
    for attempt in range(STORE_ATTEMPTS):
        try:
            with lock:
                MlflowClient(uri).search_experiments(max_results=1)
            return
        except Exception as exc:  # SQLAlchemy's errors of a half-made schema, or a database that is down
            if attempt + 1 == STORE_ATTEMPTS:
                raise TransferkitError(redact(f"cannot open tracking store {uri}: {str(exc).splitlines()[0]}; "
                                              "check --tracking-uri / MLFLOW_TRACKING_URI, or pass --no-track")) from exc
            time.sleep(1 + attempt)
