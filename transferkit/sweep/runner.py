"""The two-stage sweep behind :func:`transferkit.sweep.sweep`: rank, search, report, in one MLflow parent run."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from transferkit import params
from transferkit.errors import TransferkitError
from transferkit.sweep.leaderboard import leaderboard, rule, write_leaderboard
from transferkit.sweep.ranking import check_backbones, features_path, rank_backbones, ranking_table
from transferkit.sweep.space import build_space, check_metric, read_sweep_file
from transferkit.sweep.study import (
    SKIPPED,
    TrialRunner,
    check_made_for,
    existing_study,
    open_storage,
    open_study,
    run_trials,
    trials_spent,
    unfinished,
)
from transferkit.tasks import get_task

DEFAULT_TOP_K = 2
DEFAULT_METRIC = "val_accuracy"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
WINNER_LOGGED_ATTR = "winner_model_logged"  # the trial whose model the parent run holds
LOCK_FILE = ".sweep.lock"  # in the study's folder: processes of one machine report one at a time
SWEEP_RANK_METRIC = "rank_in_sweep"  # each trial run's leaderboard place: MLflow sorts the children by it
DESCRIBED_ROWS = 5  # leaderboard rows in the parent run's description
ENSEMBLE_FOLDER = "ensemble"  # in the study's folder: the best trials' models, averaged (``ensemble=K``)


@dataclass
class SweepResult:
    """The stage-1 ranking, the stage-2 leaderboard (best first) and where everything is.

    ``pending``: trials still queued or running in other processes when this one stopped; the process that
    finishes last logs the winner's model (and registers it).
    """

    ranking: pd.DataFrame
    leaderboard: pd.DataFrame
    metric: str
    study_name: str
    folder: Path
    parent_run_id: str | None = None
    pending: list[int] = field(default_factory=list)
    ensemble: Path | None = None  # with ``ensemble=K``: the model folder averaging the best K trials
    ensemble_scores: dict | None = None  # its val scores and its best member's, as build_ensemble measured them

    @property
    def winner(self) -> pd.Series | None:
        """The best finished trial's leaderboard row (``run_dir``, ``mlflow_run_id``, metrics), or None."""
        ranked = self.leaderboard[self.leaderboard["rank"].notna()]
        return ranked.iloc[0] if len(ranked) else None


def sweep(data: str, backbones: list[str] | None = None, *, sweep_file: str | None = None,
          strategies: list[str] | None = None, space: Mapping | None = None, fixed: Mapping | None = None,
          epochs: int | None = None, top_k: int | None = None, trials: int | None = None, metric: str | None = None,
          out: str = "runs/sweeps", storage: str | None = None, study: str | None = None,
          register: str | None = None, track: bool = True, tracking_uri: str | None = None,
          experiment: str | None = None, seed: int = 0, allow_data_change: bool = False,
          ensemble: int | None = None, verbose: bool = False) -> SweepResult:
    """Rank ``backbones`` on ``data``, finetune the ``top_k`` best over the search space, return the leaderboard.

    Arguments override the sweep file's (``backbones``, ``top_k``, ``metric``, ``trials``, ``fixed``, ``space``);
    ``strategies`` and ``epochs`` are shorthands for a ``strategy`` choice and a fixed ``epochs``. ``storage``
    (an RDB URL) and ``study`` (a name: its folder is ``out/<study>``) name a shared Optuna study to join or
    resume; one made for other data is refused unless ``allow_data_change``. Everything is checked before any
    training; a trial that fails is recorded as failed and the sweep goes on. ``ensemble`` K: once every trial
    is done, the best K trials' models are averaged with weights chosen on val (``<folder>/ensemble``).
    """
    settings = read_sweep_file(sweep_file) if sweep_file else {}
    top_k = params.TOPK.check("top_k", top_k if top_k is not None else settings.get("top_k", DEFAULT_TOP_K))
    metric = check_metric(metric or settings.get("metric") or DEFAULT_METRIC)
    trials = trials if trials is not None else settings.get("trials")
    trials = None if trials is None else params.TRIALS.check("trials", trials)
    fixed = _fixed_settings(settings.get("fixed") or {}, {**(fixed or {}), **({"epochs": epochs} if epochs is not None
                                                                               else {})},
                            sweep_file, searched=("strategy",) if strategies else ())
    space = space if space is not None else settings.get("space")
    if study is not None:
        params.STUDY_NAME.check("study", study)
    if ensemble is not None:
        params.SWEEP_ENSEMBLE.check("ensemble", ensemble)
    if register and not track:
        raise TransferkitError("--register needs tracking; drop --no-track")
    if not Path(data).expanduser().exists():
        raise TransferkitError(f"data {data} does not exist; pass an image folder or labels CSV")
    search = build_space(space, fixed, strategies=strategies)  # settings first: checking names imports timm
    if not search.is_grid and not trials:
        raise TransferkitError(f"the search space has ranges ({search.describe()}); pass --trials N for an "
                               "Optuna search, or give every key a list of choices for a grid")
    backbones = check_backbones(list(backbones or settings.get("backbones") or []))
    if track:
        from transferkit.tracking.store import check_tracking_store

        check_tracking_store(tracking_uri)
    made_for, index = _made_for(data, fixed, search, backbones, top_k, metric, trials)
    storage_handle = open_storage(storage)
    out = Path(out).expanduser()
    study_name, folder, joined = _study_folder(out, study, storage_handle, storage is not None, data)
    if joined is not None:
        change = check_made_for(joined, made_for, allow_data_change=allow_data_change,
                                describe_change=lambda study: _data_change(study, index))
        if change:
            _say(f"warning: study {study_name!r} continues on changed data ({change}), as --allow-data-change "
                 "asks: its earlier trials trained on the data before")
    from transferkit.core.fileio import ensure_writable_dir

    ensure_writable_dir(folder)
    return _Sweep(data, backbones, search, fixed, space, strategies, top_k=top_k, trials=trials, metric=metric,
                  out=out, folder=folder, storage=storage_handle, storage_url=storage, study_name=study_name,
                  made_for=made_for, index=index, allow_data_change=allow_data_change, register=register, track=track,
                  tracking_uri=tracking_uri, experiment=experiment, seed=seed, ensemble=ensemble,
                  verbose=verbose).run()


def _fixed_settings(from_file: Mapping, given: Mapping, sweep_file: str | None, searched=()) -> dict:
    """The settings every trial shares: the sweep file's ``fixed:``, then the arguments (command-line flags and
    key=value settings), which win, as a ``searched`` key (``--strategies``) wins over the file fixing it; the keys
    replaced are said once. Values as finetune reads them (``"3e-4"`` → 0.0003), so a study records one
    spelling whichever way they came."""
    from transferkit.train.config import CONSTRAINTS

    from_file, given = ({key: CONSTRAINTS[key].check(key, value) if key in CONSTRAINTS else value
                         for key, value in values.items()} for values in (from_file, given))
    replaced = [f"{key}={given[key]!r} (file: {from_file[key]!r})" for key in given
                if key in from_file and from_file[key] != given[key]]
    replaced += [f"{key} searched (file: {from_file.pop(key)!r})" for key in searched if key in from_file]
    if replaced:
        _say(f"settings given on the command line replace the fixed: ones of sweep file {sweep_file}: "
             + ", ".join(replaced))
    return {**from_file, **given}


def _made_for(data: str, fixed: dict, search, backbones: list[str], top_k: int, metric: str,
              trials: int | None) -> tuple[dict, object]:
    """What a study is for, as it records it: the data (fingerprint and classes, as the trials split it), the
    candidates and the cut, the searched keys, the fixed settings, the metric and the mode; and the data's index."""
    from transferkit.data import discover
    from transferkit.train.config import resolve_config

    base = resolve_config(None, fixed)
    index = discover(data, val_ratio=base.val_ratio, seed=base.seed)
    searched = "; ".join(d.describe() for key, d in search.dimensions.items() if key != "backbone")
    record = {"fingerprint": index.fingerprint(), "classes": index.classes, "backbones": backbones, "top_k": top_k,
              "space": searched, "fixed": fixed, "metric": metric, "mode": f"tpe:{trials}" if trials else "grid"}
    return json.loads(json.dumps(record, default=str)), index  # the record as the storage keeps it


def _data_change(study, index) -> str | None:
    """Which files changed since the study's trials ran, from the split one of their run folders saved."""
    from transferkit.train.preflight import describe_change

    for trial in study.get_trials(deepcopy=False):
        split = Path(trial.user_attrs.get("run_dir") or "") / "split.csv"
        if trial.user_attrs.get("run_dir") and split.is_file():
            return describe_change(split, index)
    return None


def _study_folder(out: Path, study: str | None, storage, shared: bool, data: str) -> tuple[str, Path, object]:
    """The study's name, its folder ``out/<study>`` and the study if it exists: an existing study's folder, or one
    that holds no other sweep's files (a new study there would collide with its trial folders and leaderboard)."""
    from transferkit.core.fileio import free_name

    if study is None and not shared:  # in memory, a new study each time: a fresh folder
        study = free_name(out, f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    study = study or f"sweep-{Path(data).expanduser().resolve().name}"
    folder = out / study
    used = folder.is_dir() and any(folder.iterdir())  # looked at before the study: its creator makes it first
    joined = existing_study(storage, study)
    if used and joined is None:
        where = "a new study in memory" if not shared else f"this storage has no study {study!r}"
        raise TransferkitError(f"sweep folder {folder} already holds another sweep's files ({where}); pass another "
                               "--study NAME or --out" + ("" if shared else ", or --storage URL to resume a study"))
    return study, folder, joined


@dataclass
class _Sweep:
    data: str
    backbones: list[str]
    search: object
    fixed: dict
    space: Mapping | None
    strategies: list[str] | None
    top_k: int
    trials: int | None
    metric: str
    out: Path
    folder: Path
    storage: object
    storage_url: str | None
    study_name: str
    made_for: dict
    index: object  # the data's DatasetIndex
    allow_data_change: bool
    register: str | None
    track: bool
    tracking_uri: str | None
    experiment: str | None
    seed: int
    ensemble: int | None
    verbose: bool

    def run(self) -> SweepResult:
        self.ranking = self._rank()
        selected = list(self.ranking.loc[self.ranking["finetuned"], "backbone"])
        self.search = build_space(self.space, self.fixed, backbones=selected, strategies=self.strategies)
        with contextlib.ExitStack() as self.runs:
            study, created = open_study(self.storage, self.study_name, self.metric, self.search, trials=self.trials,
                                        seed=self.seed, made_for=self.made_for,
                                        allow_data_change=self.allow_data_change, on_create=self._open_parent,
                                        describe_change=lambda study: _data_change(study, self.index))
            if not created:
                self._join_parent(study)
            try:
                self._search(study)
            finally:
                result = self._report(study)
            if self.ensemble and result.winner is not None and not result.pending:
                from filelock import FileLock

                with FileLock(self.folder / LOCK_FILE):  # two processes finishing together build it once
                    self._build_ensemble(result)
        return result

    def _build_ensemble(self, result: SweepResult) -> None:
        """The best ``ensemble`` trials' models averaged, weights chosen greedily on their val split; skipped
        (said why) with fewer than two finished trials or an ensemble already built by an earlier run."""
        from transferkit.combine.ensemble import build_ensemble
        from transferkit.models.saved_model import read_checkpoint_metadata
        from transferkit.train.config import resolve_config

        out = self.folder / ENSEMBLE_FOLDER
        ranked = result.leaderboard[result.leaderboard["rank"].notna()].head(self.ensemble)
        if len(ranked) < 2 or out.exists():
            _say(f"ensemble: skipped, {out} already exists" if out.exists() else
                 f"ensemble: skipped, only {len(ranked)} trial finished (it needs two)")
            return
        base = resolve_config(None, self.fixed)
        _say(f"ensemble of trials {', '.join(map(str, ranked['trial']))}: scoring them on val …")
        result.ensemble = build_ensemble(list(ranked["run_dir"]), out, data=self.data, selection="greedy",
                                         device=base.device, workers=base.workers)
        chosen = read_checkpoint_metadata(result.ensemble / "model.safetensors")["chosen_on"]
        result.ensemble_scores = {"ensemble": chosen["ensemble"], "winner": chosen["members"][0]}
        self.parent.log_artifact(result.ensemble / "model.json", ENSEMBLE_FOLDER)
        self.parent.log_metrics({f"ensemble_val_{key}": value for key, value in chosen["ensemble"].items()})

    def _open_parent(self, study, run_id: str | None = None) -> None:
        """The study's one MLflow parent run: opened by its creator (and recorded in the study), reopened by
        every process that joins it; trials resolve the same default experiment from the same data."""
        from transferkit.tracking.tracker import open_run

        self.parent = self.runs.enter_context(open_run(
            "sweep", data=self.data, enabled=self.track, tracking_uri=self.tracking_uri, experiment=self.experiment,
            run_name=self.study_name, run_id=run_id, tags={"sweep_study": self.study_name},
            params=None if run_id else self._params()))
        if run_id is None:
            study.set_user_attr(PARENT_RUN_ATTR, self.parent.run_id)
            self.parent.log_text(self.ranking.to_csv(index=False), "ranking.csv")
            self.parent.log_metrics({f"probe_cv_accuracy/{row.backbone}": row.probe_cv_accuracy
                                     for row in self.ranking.itertuples()})

    def _join_parent(self, study) -> None:
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        if self.track and run_id is None:
            _say(f"study {self.study_name!r} has no MLflow parent run (its creator ran with --no-track); "
                 "this process starts it")
        self._open_parent(study, run_id if self.track else None)

    def _params(self) -> dict:
        from transferkit.tracking.store import redact

        return {"data": self.data, "backbones": self.backbones, "top_k": self.top_k, "metric": self.metric,
                "trials": self.trials or "grid", "space": self.search.describe(), "fixed": self.fixed,
                "study": self.study_name, "storage": redact(self.storage_url) or "in-memory",
                "data_fingerprint": self.made_for["fingerprint"]}

    def _rank(self) -> pd.DataFrame:
        from transferkit.train.config import resolve_config

        base = resolve_config(None, self.fixed)
        ranking = rank_backbones(self.backbones, self.data, self.out, top_k=self.top_k, img_size=base.img_size,
                                 resize_mode=base.resize_mode, val_ratio=base.val_ratio, seed=base.seed,
                                 device=base.device, workers=base.workers, pretrained=base.pretrained,
                                 say=_say)
        self.params_m = dict(zip(ranking["backbone"], ranking["params_m"]))
        _say("stage 1: backbones ranked by a cross-validated linear probe on frozen features\n"
             + ranking_table(ranking))
        return ranking

    def _search(self, study) -> None:
        from tqdm import tqdm

        total = self.trials or self.search.grid_size()
        self.bar = tqdm(total=total, initial=min(trials_spent(study), total), desc="trials", unit="trial",
                        disable=not sys.stderr.isatty(), leave=False)
        _say(f"stage 2: {'grid of ' + str(total) if not self.trials else str(total) + ' TPE'} trials over "
             f"{self.search.describe()}; study {self.study_name!r}, runs in {self.folder}")
        runner = TrialRunner(self.search, self.metric, self._config, self._features, self._record,
                             before_retry=self._close_lost_run, verbose=self.verbose)
        try:
            run_trials(study, runner, trials=self.trials, on_trial=self._trial_done, on_lost=self._lost)
        finally:
            self.bar.close()

    def _config(self, params: dict, number: int):
        from transferkit.train.config import resolve_config

        values = {"monitor": self.metric, **self.fixed, **params}
        values.update(data=self.data, out=str(self.folder), name=f"trial-{number:03d}-{params['backbone']}",
                      track=self.track, tracking_uri=self.tracking_uri, experiment=self.experiment, register=None)
        return resolve_config(None, values)

    def _features(self, config) -> Path | None:
        """The stage-1 features, for trials whose head trains on frozen features (linear probe, LP-FT); the
        trial reuses them only if they are its own backbone's (never for a random init)."""
        path = features_path(self.out, config.backbone)
        return path if path.is_file() else None

    def _close_lost_run(self, config) -> None:
        """The MLflow run a killed trial left RUNNING in this run folder is closed as KILLED before its retry."""
        closed = self.parent.end_child_runs(config.name, "KILLED", "the process running this trial was killed; "
                                                                   "the sweep retried the trial")
        if closed:
            _say(f"{config.name}: MLflow run {', '.join(closed)} of the killed trial closed as KILLED")

    def _lost(self, numbers: list[int]) -> None:
        _say(f"trial{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))} lost (process killed): "
             "queued again, to continue from its last completed epoch")

    def _record(self, trial, result, seconds: float) -> None:
        from transferkit.train.resume_state import COMPLETE_FILE

        finished = json.loads((result.run_dir / COMPLETE_FILE).read_text())
        for key, value in {"best": {k: result.best[k] for k in get_task().checkpoint_columns}, "best_epoch": result.best_epoch,
                           "seconds": round(seconds, 1), "run_dir": str(result.run_dir),
                           "mlflow_run_id": finished.get("mlflow_run_id"),
                           "params_m": self.params_m.get(trial.params["backbone"])}.items():
            trial.set_user_attr(key, value)

    def _trial_done(self, study, trial) -> None:
        attrs = trial.user_attrs
        if attrs.get(SKIPPED):
            return
        self.bar.update(1)
        params = " ".join(f"{k}={v}" for k, v in trial.params.items())
        if "best" in attrs:
            board = leaderboard(study, self.metric)
            best = board.iloc[0]
            line = (f"trial {trial.number} {trial.state.name.lower()}: {params}: {self.metric} "
                    f"{attrs['best'][self.metric]:.4f} [{attrs['seconds']:.0f} s]; best so far "
                    f"{best[self.metric]:.4f} (trial {best['trial']})")
        else:
            line = f"trial {trial.number} failed: {params}: {attrs.get('error', 'unknown error')}"
        self.bar.write(line, file=sys.stderr)

    def _report(self, study) -> SweepResult:
        """The leaderboard (files and parent run) from every process; the winner's model from the one that sees
        no trial left, once per winner (processes of one machine take turns)."""
        from filelock import FileLock

        table = leaderboard(study, self.metric)
        pending = [t.number for t in unfinished(study)]
        result = SweepResult(self.ranking, table, self.metric, self.study_name, self.folder, self.parent.run_id,
                             pending)
        with FileLock(self.folder / LOCK_FILE):
            for path in write_leaderboard(table, self.ranking, self.metric, self.folder):
                self.parent.log_artifact(path)
            winner = result.winner
            # the study's mark, and the parent run's own tag (what the store holds now, whatever Optuna caches)
            logged = (study.user_attrs.get(WINNER_LOGGED_ATTR) == int(winner["trial"])
                      or self.parent.tag("winner_trial") == str(int(winner["trial"]))) if winner is not None else True
            if not pending and not logged:
                self.parent.log_metrics({key: winner[key] for key in get_task().checkpoint_columns})
                self.parent.set_tags({"winner_run_id": winner["mlflow_run_id"], "winner_run_dir": winner["run_dir"],
                                      "winner_trial": winner["trial"]})
                self.parent.log_model(Path(winner["run_dir"]) / "best.safetensors", register=self.register)
                if self.parent.run_id is not None:
                    study.set_user_attr(WINNER_LOGGED_ATTR, int(winner["trial"]))
            self.parent.log_metrics({"trials_finished": int(table["rank"].notna().sum())})
            if winner is not None:
                self._describe(table, winner, pending)
                self._rank_children(table)
        return result

    def _describe(self, table: pd.DataFrame, winner: pd.Series, pending: list[int]) -> None:
        """The parent run's description: the winner, its scores and settings, and the leaderboard's top rows."""
        columns = get_task().checkpoint_columns
        searched = [key for key in self.search.dimensions if key != "backbone"]

        def settings(row) -> str:
            return ", ".join(f"{key}={row[key]}" for key in searched)

        def scores(row) -> str:
            return ", ".join(f"{key} {row[key]:.4g}" for key in dict.fromkeys((self.metric, *columns)))

        ranked = table[table["rank"].notna()]
        state = f"best so far, trials {', '.join(map(str, pending))} still to run" if pending else "winner"
        fixed = ", ".join(f"{key}={value}" for key, value in self.fixed.items()) or "finetune's defaults"
        facts = [f"{state}: trial {winner['trial']}, `{winner['backbone']}`"
                 + (f" with {settings(winner)}" if searched else "")
                 + f"; run `{winner['mlflow_run_id']}`, folder `{winner['run_dir']}`",
                 f"every trial: {fixed}",
                 f"{len(ranked)} trials ranked by {rule(self.metric)}; leaderboard.md holds them all:",
                 *(f"#{row['rank']} trial {row['trial']} `{row['backbone']}`"
                   + (f" ({settings(row)})" if searched else "") + f": {scores(row)}"
                   for _, row in ranked.head(DESCRIBED_ROWS).iterrows())]
        self.parent.describe(f"Sweep {self.study_name}: {self.metric} {winner[self.metric]:.4f} by trial "
                             f"{winner['trial']} ({winner['backbone']})", facts,
                             {key: winner[key] for key in columns})

    def _rank_children(self, table: pd.DataFrame) -> None:
        """Each trial run's leaderboard place as its ``rank_in_sweep`` metric, so MLflow lists them in the same order."""
        if self.parent.run_id is None:
            return
        from transferkit.tracking.tracker import log_metric_on_runs

        ranked = table[table["rank"].notna() & table["mlflow_run_id"].notna()]
        log_metric_on_runs(SWEEP_RANK_METRIC, {row.mlflow_run_id: int(row.rank) for row in ranked.itertuples()})


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
