"""Stage 2: the trials, as an Optuna study that several processes (on several machines) can share.

The study lives in Optuna storage: in memory by default, or any RDB URL (``sqlite:///study.db``,
``postgresql://...``), where every process pointed at the same storage and study name takes its own trials:

* grid (every searched key a list of choices): the process that creates the study enqueues each grid point
  once; every process then pops waiting trials, which the storage hands out atomically, so no point is run twice.
* ``trials=N``: Optuna's TPE sampler proposes each new trial from all finished ones, and its median pruner
  stops a trial whose per-epoch val metric falls below the median of earlier trials at the same epoch;
  processes stop once the study holds N trials.

An interrupted sweep resumes when run again with the same storage and study: finished trials stay done; a trial
stopped by Ctrl-C is queued again before the process exits, and a trial left RUNNING by a killed process is
marked failed and queued again once its heartbeat is older than ``2 * HEARTBEAT_SECONDS`` (RDB storage).
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from transferkit.errors import TransferkitError
from transferkit.sweep.space import SearchSpace
from transferkit.tasks import get_task
from transferkit.train.callbacks import Callback

HEARTBEAT_SECONDS = 30
GRID_ATTR = "grid"  # user attr of an enqueued grid point (and study attr: the grid, set once it is enqueued)
SPACE_ATTR = "space"
RETRY_OF = "retry_of"
SKIPPED = "skipped"  # a trial created after another process took the last grid point: nothing ran
GRID_WAIT_SECONDS = 60
STORAGE_ATTEMPTS = 3


def open_storage(url: str | None):
    """Optuna storage for ``url``: None → in memory; an RDB URL → a database with heartbeats (killed trials retried)."""
    import optuna

    if url is None:
        return optuna.storages.InMemoryStorage()
    if "://" not in url:
        raise TransferkitError(f"study storage {url!r} is not a database URL; use e.g. sqlite:///study.db "
                               "or postgresql://user@host/db")
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.8; they are what we need
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=HEARTBEAT_SECONDS,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
        except Exception as exc:  # SQLAlchemy raises many kinds for a bad URL, driver or path
            if attempt + 1 == STORAGE_ATTEMPTS:
                raise TransferkitError(f"cannot open study storage {url}: {str(exc).splitlines()[0]}; check the URL "
                                       "(e.g. sqlite:///study.db in an existing, writable folder)") from exc
            time.sleep(1)  # processes started together race to create the tables of a new database: try again


def open_study(storage, name: str, metric: str, space: SearchSpace, *, trials: int | None, seed: int, task=None):
    """Create the study ``name`` (enqueuing the grid) or join it; refuses a study started with another space.
    The study optimises ``metric`` in the direction ``task`` (single-label by default) says it improves."""
    import optuna

    sampler = optuna.samplers.TPESampler(seed=seed) if trials else optuna.samplers.RandomSampler(seed=seed)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2) if trials
              else optuna.pruners.NopPruner())
    description = json.dumps({"metric": metric, "space": space.describe(), "fixed": space.fixed,
                              "mode": f"tpe:{trials}" if trials else "grid"}, sort_keys=True, default=str)
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction=(task or get_task()).direction(metric),
                                    sampler=sampler, pruner=pruner)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner)
        created = False
    if created:
        study.set_user_attr(SPACE_ATTR, description)
        if not trials:
            for point in _grid_points(space):
                study.enqueue_trial(point, user_attrs={GRID_ATTR: True})
            study.set_user_attr(GRID_ATTR, True)
    else:
        _wait_for_setup(study, name, trials)
        if study.user_attrs.get(SPACE_ATTR) != description:
            raise TransferkitError(f"study {name!r} in this storage was started with another search space, metric "
                                   "or trial count; pass a new --study NAME (or repeat the first sweep's settings)")
    return study


def _grid_points(space: SearchSpace) -> list[dict]:
    import itertools

    grid = space.grid()
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def _wait_for_setup(study, name: str, trials: int | None) -> None:
    """A process joining a study just created by another waits until its grid is enqueued."""
    deadline = time.monotonic() + GRID_WAIT_SECONDS
    while SPACE_ATTR not in study.user_attrs or (not trials and GRID_ATTR not in study.user_attrs):
        if time.monotonic() > deadline:
            raise TransferkitError(f"study {name!r} was never set up (its creator stopped first); "
                                   "pass a new --study NAME")
        time.sleep(1)


def _is_retry(trial) -> bool:
    return RETRY_OF in trial.user_attrs or "failed_trial" in trial.system_attrs


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


@dataclass
class TrialRunner:
    """The objective: one trial = one finetune run with the trial's keys, reported to Optuna epoch by epoch.

    ``make_config(params, number)`` turns the trial's parameters into a TrainConfig (raising on a bad
    combination, which fails only that trial); ``features_for(config)`` names an extracted features file
    for a linear probe to reuse, or None.
    """

    space: SearchSpace
    metric: str
    make_config: Callable
    features_for: Callable
    after_run: Callable  # (trial, RunResult, seconds) -> None: tags and records of a finished run
    verbose: bool = False

    def __call__(self, trial):
        import optuna

        from transferkit.train import finetune

        if trial.study.user_attrs.get(GRID_ATTR) and not trial.user_attrs.get(GRID_ATTR):
            trial.set_user_attr(SKIPPED, True)  # the queue ran dry between our check and ask(): no grid point left
            raise optuna.TrialPruned("no grid point left")
        params = self.space.suggest(trial)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # which process ran it
        pruning = PruneTrial(trial, self.metric)
        started = time.perf_counter()
        try:
            config = self.make_config(params, trial.number)
            result = finetune(config, progress=self.verbose, callbacks=[pruning], features=self.features_for(config))
        except KeyboardInterrupt:
            trial.study.enqueue_trial(trial.params, user_attrs={**trial.user_attrs, RETRY_OF: trial.number})
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


class PruneTrial(Callback):
    """Reports each epoch's ``metric`` to the trial; stops the run once Optuna's pruner says so."""

    def __init__(self, trial, metric: str):
        self.trial, self.metric = trial, metric
        self.pruned = False

    def on_epoch_end(self, run, row: dict, improved: bool) -> bool:
        self.trial.report(row[self.metric], row["epoch"])
        self.pruned = self.trial.should_prune()
        return self.pruned


def run_trials(study, runner: TrialRunner, *, trials: int | None, on_trial: Callable) -> None:
    """Take trials from the study until none is left for this process; Ctrl-C propagates after the trial is recorded."""
    def stop_when_done(study, _trial):
        on_trial(study, _trial)
        if not work_left(study, trials):
            study.stop()

    if work_left(study, trials):
        study.optimize(runner, callbacks=[stop_when_done], catch=(Exception,), gc_after_trial=True)
