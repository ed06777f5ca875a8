"""Stage 2: the trials, as an Optuna study that several processes (on several machines) can share.

The study lives in Optuna storage: in memory by default, or any RDB URL (``sqlite:///study.db``,
``postgresql://...``), where every process pointed at the same storage and study name takes its own trials:

* grid (every searched key a list of choices): the process that creates the study enqueues each grid point
  once; every process then pops waiting trials, which the storage hands out atomically, so no point is run twice.
* ``trials=N``: Optuna's TPE sampler proposes each new trial from all finished ones, and its median pruner
  stops a trial whose per-epoch val metric falls below the median of earlier trials at the same epoch;
  processes stop once the study holds N trials.

A study records what it was made for (:data:`MADE_FOR_ATTR`: data fingerprint and classes, candidate backbones,
top-k, search space, fixed settings, metric, mode); a sweep with anything else is refused before it trains.
The process that creates a study is the only one that sets it up (grid, MLflow parent run); the others wait
until it is :data:`READY_ATTR`.

An interrupted sweep resumes when run again with the same storage and study: finished trials stay done; a trial
stopped by Ctrl-C is queued again before the process exits, and a trial left RUNNING by a killed process is
marked failed and queued again (:data:`MAX_RETRIES` times) — at once by any sweep on the same machine (its
process is gone), else once its heartbeat is ``2 * HEARTBEAT_SECONDS`` old (Optuna's ``heartbeat_interval``
and stale-trial callback, RDB storage). The retry continues the killed trial's run folder from its last
completed epoch (or restarts it when no epoch was committed).
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transferkit.errors import TransferkitError
from transferkit.sweep.space import SearchSpace
from transferkit.tasks import get_task
from transferkit.train.callbacks import Callback

HEARTBEAT_SECONDS = 10
MAX_RETRIES = 2  # a trial that kills its process every time (out of memory) is not retried for ever
GRID_ATTR = "grid"  # user attr of an enqueued grid point (and study attr: the study searches a grid)
SPACE_ATTR = "space"
MADE_FOR_ATTR = "made_for"
READY_ATTR = "ready"  # set last by the study's creator: grid enqueued, parent run recorded
RETRY_OF = "retry_of"
WORKER_ATTR = "worker"
SKIPPED = "skipped"  # a trial created after another process took the last grid point: nothing ran
SETUP_WAIT_SECONDS = 120
MADE_FOR_WAIT_SECONDS = 10
STORAGE_ATTEMPTS = 3
SQLITE_BUSY_SECONDS = 60  # how long a sqlite study waits for another process's transaction
DATA_KEYS = ("fingerprint", "classes")  # the part of MADE_FOR_ATTR that --allow-data-change lets differ


def open_storage(url: str | None):
    """Optuna storage for ``url``: None → in memory; an RDB URL → a database with heartbeats (killed trials retried)."""
    import optuna

    from transferkit.tracking.store import redact

    if url is None:
        return optuna.storages.InMemoryStorage()
    if "://" not in url:
        raise TransferkitError(f"study storage {redact(url)!r} is not a database URL; use e.g. sqlite:///study.db "
                               "or postgresql://user@host/db")
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            sqlite = url.startswith("sqlite")
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.8; they are what we need
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url, heartbeat_interval=HEARTBEAT_SECONDS, heartbeat_stale_trial_callback=_retry_callback(),
                    engine_kwargs={"connect_args": {"timeout": SQLITE_BUSY_SECONDS}} if sqlite else None)
            if sqlite:
                _immediate_transactions(storage.engine)
            return storage
        except Exception as exc:  # SQLAlchemy raises many kinds for a bad URL, driver or path
            if attempt + 1 == STORAGE_ATTEMPTS:
                raise TransferkitError(redact(
                    f"cannot open study storage {url}: {str(exc).splitlines()[0]}; check the URL "
                    "(e.g. sqlite:///study.db in an existing, writable folder)")) from exc
            time.sleep(1)  # processes started together race to create the tables of a new database: try again


def _immediate_transactions(engine) -> None:
    """Every sqlite transaction takes the write lock when it begins (SQLAlchemy's recipe for pysqlite).

    pysqlite begins a transaction only at the first write, so Optuna's "read a WAITING trial, set it RUNNING"
    is no atomic step there, and two workers could pop the same grid point; with ``BEGIN IMMEDIATE`` the
    second waits for the first and then sees the trial RUNNING.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _driver_begins_nothing(dbapi_connection, _record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while the storage set up its tables begin the old way


def _retry_callback():
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)


def existing_study(storage, name: str):
    """The study ``name`` in ``storage``, or None."""
    import optuna

    if name not in optuna.get_all_study_names(storage):
        return None
    return optuna.load_study(study_name=name, storage=storage)


def check_made_for(study, made_for: dict, *, allow_data_change: bool,
                   describe_change: Callable = lambda study: None) -> str | None:
    """Refuse to join ``study`` with other settings or other data; returns what changed in the data when
    ``allow_data_change`` lets it go on (the study then records the data now). ``describe_change(study)`` says
    which files changed, in a few words (None: unknown)."""
    recorded = _attr_soon(study, MADE_FOR_ATTR, MADE_FOR_WAIT_SECONDS)  # its creator records it at once
    name = study.study_name
    if recorded is None:
        raise TransferkitError(f"study {name!r} in this storage records nothing of what it was made for (an older "
                               "transferkit, or not a sweep); pass a new --study NAME")
    now = json.loads(json.dumps(made_for, default=str))  # as stored: tuples are lists
    settings = [key for key in now if key not in DATA_KEYS and recorded.get(key) != now[key]]
    if settings:
        key = settings[0]
        raise TransferkitError(f"study {name!r} was made with other settings ({key}: {recorded.get(key)!r}, now "
                               f"{now[key]!r}); pass a new --study NAME, or repeat the first sweep's settings")
    data = [key for key in DATA_KEYS if recorded.get(key) != now[key]]
    if not data:
        return None
    change = ("classes " + ", ".join(recorded.get("classes") or []) + " -> " + ", ".join(now["classes"])
              if "classes" in data else describe_change(study) or "the data fingerprint differs")
    if not allow_data_change:
        raise TransferkitError(f"study {name!r} was made for other data ({change}); its trials did not train on "
                               "this data: pass a new --study NAME, or --allow-data-change to continue it knowingly")
    study.set_user_attr(MADE_FOR_ATTR, {**recorded, **{key: now[key] for key in DATA_KEYS}})
    return change


def open_study(storage, name: str, metric: str, space: SearchSpace, *, trials: int | None, seed: int,
               made_for: dict, allow_data_change: bool = False, describe_change: Callable = lambda study: None,
               on_create: Callable | None = None, task=None):
    """Create the study ``name`` (enqueuing the grid, then ``on_create(study)``) or join it once its creator has
    set it up; refuses a study made for other data or settings, or started with another space. The study
    optimises ``metric`` in the direction ``task`` (single-label by default) says it improves. Returns
    ``(study, created)``."""
    import optuna

    sampler = optuna.samplers.TPESampler(seed=seed) if trials else optuna.samplers.RandomSampler(seed=seed)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2) if trials
              else optuna.pruners.NopPruner())
    description = json.dumps({"metric": metric, "space": space.describe(), "fixed": space.fixed,
                              "mode": f"tpe:{trials}" if trials else "grid"}, sort_keys=True, default=str)
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction=(task or get_task()).direction(metric),
                                    sampler=sampler, pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        study = None
    if study is None:
        study = optuna.load_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner)
        check_made_for(study, made_for, allow_data_change=allow_data_change, describe_change=describe_change)
        _wait_for(study, READY_ATTR)
        if study.user_attrs.get(SPACE_ATTR) != description:
            raise TransferkitError(f"study {name!r} in this storage was started with another search space (its "
                                   "stage 1 selected other backbones?); pass a new --study NAME")
        return study, False
    study.set_user_attr(MADE_FOR_ATTR, made_for)
    study.set_user_attr(SPACE_ATTR, description)
    if not trials:
        for point in _grid_points(space):
            study.enqueue_trial(point, user_attrs={GRID_ATTR: True})
        study.set_user_attr(GRID_ATTR, True)
    if on_create is not None:
        on_create(study)
    study.set_user_attr(READY_ATTR, True)
    return study, True


def _grid_points(space: SearchSpace) -> list[dict]:
    import itertools

    grid = space.grid()
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def _wait_for(study, attr: str) -> None:
    """A process joining a study just created by another waits until its creator has set ``attr``."""
    if _attr_soon(study, attr, SETUP_WAIT_SECONDS) is None:
        raise TransferkitError(f"study {study.study_name!r} was never set up (its creator stopped first); "
                               "pass a new --study NAME")


def _attr_soon(study, attr: str, seconds: float):
    """The study's user attr ``attr``, waiting up to ``seconds`` for it to be set; None if it never is."""
    deadline = time.monotonic() + seconds
    while attr not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.5)
    return study.user_attrs.get(attr)


def origin(trial) -> int:
    """The number of the trial that ``trial`` repeats (itself when it is no retry): whose run folder it continues."""
    if RETRY_OF in trial.user_attrs:
        return int(trial.user_attrs[RETRY_OF])
    return int(_frozen(trial).system_attrs.get("failed_trial", trial.number))


def _is_retry(trial) -> bool:
    return RETRY_OF in trial.user_attrs or "failed_trial" in _frozen(trial).system_attrs


def _frozen(trial):
    """The stored record of a trial (a running ``Trial`` shows no system attrs, where Optuna notes a retry)."""
    if hasattr(trial, "system_attrs"):
        return trial
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def trials_spent(study) -> int:
    """Trials started or done, each retry counted with the trial it repeats."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state != TrialState.WAITING and not _is_retry(t) and not t.user_attrs.get(SKIPPED))


def work_left(study, trials: int | None) -> bool:
    """Queued trials (grid points, retries) remain, or the TPE budget is not spent."""
    from optuna.trial import TrialState

    if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return True
    return bool(trials) and trials_spent(study) < trials


def unfinished(study) -> list:
    """Trials still to run or running (in this or other processes)."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
            if not t.user_attrs.get(SKIPPED)]


def retry_lost_trials(study) -> list[int]:
    """Fail and queue again the RUNNING trials whose process is gone: on this machine at once (its process
    id no longer exists), elsewhere once their heartbeat is stale. Returns the numbers of those failed here."""
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        optuna.storages.fail_stale_trials(study)  # no-op in memory: a study there dies with its only process
        lost = []
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not _process_gone(trial.user_attrs.get(WORKER_ATTR, "")):
                continue
            try:
                frozen = study.tell(trial.number, state=TrialState.FAIL)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # another process failed it first, and queued its retry
            _retry_callback()(study, frozen)
            lost.append(trial.number)
    stale = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))} & before
    return sorted(stale | set(lost))


def _process_gone(worker: str) -> bool:
    """``host:pid`` names a process of this machine that no longer exists."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class TrialRunner:
    """The objective: one trial = one finetune run with the trial's keys, reported to Optuna epoch by epoch.

    ``make_config(params, number)`` turns the trial's parameters into a TrainConfig for the run folder of
    trial ``number`` (raising on a bad combination, which fails only that trial); ``features_for(config)`` names
    an extracted features file for a linear probe to reuse, or None. A retry continues the folder of the trial it
    repeats; ``before_retry(config)`` closes what the lost trial left open (its MLflow run).
    """

    space: SearchSpace
    metric: str
    make_config: Callable
    features_for: Callable
    after_run: Callable  # (trial, RunResult, seconds) -> None: tags and records of a finished run
    before_retry: Callable = lambda config: None
    verbose: bool = False

    def __call__(self, trial):
        import optuna

        if trial.study.user_attrs.get(GRID_ATTR) and not trial.user_attrs.get(GRID_ATTR):
            trial.set_user_attr(SKIPPED, True)  # the queue ran dry between our check and ask(): no grid point left
            raise optuna.TrialPruned("no grid point left")
        params = self.space.suggest(trial)
        trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")  # which process ran it
        pruning = PruneTrial(trial, self.metric)
        started = time.perf_counter()
        try:
            config = self.make_config(params, origin(trial))
            if _is_retry(trial):
                self.before_retry(config)
            result = self._run(config, pruning)
        except KeyboardInterrupt:
            trial.study.enqueue_trial(trial.params, user_attrs={**trial.user_attrs, RETRY_OF: origin(trial)})
            trial.set_user_attr("error", "interrupted (Ctrl-C); queued again for the next run")
            raise
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:1000])
            raise
        self.after_run(trial, result, time.perf_counter() - started)
        if pruning.pruned:
            raise optuna.TrialPruned(f"{self.metric} {result.history[-1][self.metric]:.4f} at epoch "
                                     f"{result.history[-1]['epoch']} is below the median of earlier trials")
        return float(result.best[self.metric])

    def _run(self, config, pruning):
        """A new run; or, for the run folder a lost trial left, the run continued from its last committed epoch
        (a folder with no committed epoch is replaced; a finished one is taken as it is)."""
        from transferkit.train import finetune
        from transferkit.train.config import resume_config
        from transferkit.train.engine import RunResult
        from transferkit.train.resume_state import COMPLETE_FILE, STATE_FILE

        run_dir = Path(config.out) / config.name
        if (run_dir / COMPLETE_FILE).is_file():  # killed after the run finished, before the trial was told
            done = json.loads((run_dir / COMPLETE_FILE).read_text())
            return RunResult(run_dir, done["best_epoch"], done["best"], model_uri=done.get("model_uri"))
        resume = run_dir if (run_dir / STATE_FILE).is_file() else None
        if resume is not None:
            config = resume_config(resume, {"track": config.track, "tracking_uri": config.tracking_uri,
                                            "experiment": config.experiment})
        return finetune(config, resume=resume, progress=self.verbose, callbacks=[pruning],
                        features=self.features_for(config))


class PruneTrial(Callback):
    """Reports each epoch's ``metric`` to the trial; stops the run once Optuna's pruner says so."""

    def __init__(self, trial, metric: str):
        self.trial, self.metric = trial, metric
        self.pruned = False

    def on_epoch_end(self, run, row: dict, improved: bool) -> bool:
        self.trial.report(row[self.metric], row["epoch"])
        self.pruned = self.trial.should_prune()
        return self.pruned


def run_trials(study, runner: TrialRunner, *, trials: int | None, on_trial: Callable,
               on_lost: Callable = lambda numbers: None) -> None:
    """Take trials from the study until none is left for this process (lost trials of killed processes queued
    again first, ``on_lost`` told their numbers); Ctrl-C propagates after the trial is recorded."""
    def stop_when_done(study, _trial):
        on_trial(study, _trial)
        lost = retry_lost_trials(study)
        if lost:
            on_lost(lost)
        if not work_left(study, trials):
            study.stop()

    lost = retry_lost_trials(study)
    if lost:
        on_lost(lost)
    if work_left(study, trials):
        study.optimize(runner, callbacks=[stop_when_done], catch=(Exception,), gc_after_trial=True)
