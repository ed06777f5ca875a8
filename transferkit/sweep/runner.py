"""The two-stage sweep behind :func:`transferkit.sweep.sweep`: rank, search, report, in one MLflow parent run."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from transferkit.errors import TransferkitError
from transferkit.sweep.leaderboard import leaderboard, write_leaderboard
from transferkit.sweep.ranking import check_backbones, features_path, rank_backbones, ranking_table
from transferkit.sweep.space import build_space, check_metric, read_sweep_file
from transferkit.sweep.study import SKIPPED, TrialRunner, open_storage, open_study, run_trials, trials_spent
from transferkit.tasks import get_task

DEFAULT_TOP_K = 2
DEFAULT_METRIC = "val_accuracy"
PARENT_RUN_ATTR = "mlflow_parent_run_id"


@dataclass
class SweepResult:
    """The stage-1 ranking, the stage-2 leaderboard (best first) and where everything is."""

    ranking: pd.DataFrame
    leaderboard: pd.DataFrame
    metric: str
    study_name: str
    folder: Path
    parent_run_id: str | None = None

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
          experiment: str | None = None, seed: int = 0, verbose: bool = False) -> SweepResult:
    """Rank ``backbones`` on ``data``, finetune the ``top_k`` best over the search space, return the leaderboard.

    Arguments override the sweep file's (``backbones``, ``top_k``, ``metric``, ``trials``, ``fixed``, ``space``);
    ``strategies`` and ``epochs`` are shorthands for a ``strategy`` choice and a fixed ``epochs``. ``storage``
    (an RDB URL) and ``study`` name a shared Optuna study to join or resume. Everything is checked before any
    training; a trial that fails is recorded as failed and the sweep goes on.
    """
    settings = read_sweep_file(sweep_file) if sweep_file else {}
    backbones = check_backbones(list(backbones or settings.get("backbones") or []))
    top_k = int(top_k or settings.get("top_k") or DEFAULT_TOP_K)
    metric = check_metric(metric or settings.get("metric") or DEFAULT_METRIC)
    trials = trials if trials is not None else settings.get("trials")
    fixed = {**(settings.get("fixed") or {}), **(fixed or {}), **({"epochs": epochs} if epochs else {})}
    space = space if space is not None else settings.get("space")
    if trials is not None and int(trials) < 1:
        raise TransferkitError(f"--trials must be at least 1, got {trials}")
    if top_k < 1:
        raise TransferkitError(f"--top-k must be at least 1, got {top_k}")
    if register and not track:
        raise TransferkitError("--register needs tracking; drop --no-track")
    if not Path(data).expanduser().exists():
        raise TransferkitError(f"data {data} does not exist; pass an image folder or labels CSV")
    search = build_space(space, fixed, backbones=backbones, strategies=strategies)
    if not search.is_grid and not trials:
        raise TransferkitError(f"the search space has ranges ({search.describe()}); pass --trials N for an "
                               "Optuna search, or give every key a list of choices for a grid")
    storage_handle = open_storage(storage)
    study_name = study or (f"sweep-{Path(data).expanduser().resolve().name}" if storage
                           else f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    return _Sweep(data, backbones, search, fixed, space, strategies, top_k=top_k, trials=trials and int(trials),
                  metric=metric, out=Path(out).expanduser(), storage=storage_handle, storage_url=storage,
                  study_name=study_name, register=register, track=track, tracking_uri=tracking_uri,
                  experiment=experiment, seed=seed, verbose=verbose).run()


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
    storage: object
    storage_url: str | None
    study_name: str
    register: str | None
    track: bool
    tracking_uri: str | None
    experiment: str | None
    seed: int
    verbose: bool

    def run(self) -> SweepResult:
        from transferkit.core.fileio import ensure_writable_dir
        from transferkit.tracking.tracker import open_run

        self.folder = ensure_writable_dir(self.out / self.study_name)
        parent_id = self._existing_parent_run()
        # trials resolve the same default experiment from the same data, so they sit beside their parent
        with open_run("sweep", data=self.data, enabled=self.track, tracking_uri=self.tracking_uri,
                      experiment=self.experiment, run_name=self.study_name, run_id=parent_id,
                      tags={"sweep_study": self.study_name}, params=None if parent_id else self._params()) as parent:
            self.parent = parent
            self.ranking = self._rank()
            study = self._study()
            if parent.run_id and PARENT_RUN_ATTR not in study.user_attrs:
                study.set_user_attr(PARENT_RUN_ATTR, parent.run_id)
            try:
                self._search(study)
            finally:
                result = self._report(study)
        return result

    def _existing_parent_run(self) -> str | None:
        """The parent run of the study being joined or resumed (None for a new study)."""
        import optuna

        if not self.track or self.storage_url is None or self.study_name not in optuna.get_all_study_names(self.storage):
            return None
        return optuna.load_study(study_name=self.study_name, storage=self.storage).user_attrs.get(PARENT_RUN_ATTR)

    def _params(self) -> dict:
        return {"data": self.data, "backbones": self.backbones, "top_k": self.top_k, "metric": self.metric,
                "trials": self.trials or "grid", "space": self.search.describe(), "fixed": self.fixed,
                "study": self.study_name, "storage": _without_password(self.storage_url) or "in-memory"}

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
        self.parent.log_text(ranking.to_csv(index=False), "ranking.csv")
        self.parent.log_metrics({f"probe_cv_accuracy/{row.backbone}": row.probe_cv_accuracy
                                 for row in ranking.itertuples()})
        return ranking

    def _study(self):
        selected = list(self.ranking.loc[self.ranking["finetuned"], "backbone"])
        self.search = build_space(self.space, self.fixed, backbones=selected, strategies=self.strategies)
        return open_study(self.storage, self.study_name, self.metric, self.search, trials=self.trials, seed=self.seed)

    def _search(self, study) -> None:
        from tqdm import tqdm

        total = self.trials or self.search.grid_size()
        self.bar = tqdm(total=total, initial=min(trials_spent(study), total), desc="trials", unit="trial",
                        disable=not sys.stderr.isatty(), leave=False)
        _say(f"stage 2: {'grid of ' + str(total) if not self.trials else str(total) + ' TPE'} trials over "
             f"{self.search.describe()}; study {self.study_name!r}, runs in {self.folder}")
        runner = TrialRunner(self.search, self.metric, self._config, self._features, self._record, self.verbose)
        try:
            run_trials(study, runner, trials=self.trials, on_trial=self._trial_done)
        finally:
            self.bar.close()

    def _config(self, params: dict, number: int):
        from transferkit.train.config import resolve_config

        values = {"monitor": self.metric, **self.fixed, **params}
        values.update(data=self.data, out=str(self.folder), name=f"trial-{number:03d}-{params['backbone']}",
                      track=self.track, tracking_uri=self.tracking_uri, experiment=self.experiment, register=None)
        return resolve_config(None, values)

    def _features(self, config) -> Path | None:
        """The stage-1 features, for trials whose head trains on frozen features (linear probe, LP-FT)."""
        path = features_path(self.out, config.backbone)
        return path if path.is_file() else None

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
        table = leaderboard(study, self.metric)
        result = SweepResult(self.ranking, table, self.metric, self.study_name, self.folder, self.parent.run_id)
        for path in write_leaderboard(table, self.ranking, self.metric, self.folder):
            self.parent.log_artifact(path)
        winner = result.winner
        if winner is not None:
            self.parent.log_metrics({key: winner[key] for key in get_task().checkpoint_columns})
            self.parent.set_tags({"winner_run_id": winner["mlflow_run_id"], "winner_run_dir": winner["run_dir"],
                                  "winner_trial": winner["trial"]})
            self.parent.log_model(Path(winner["run_dir"]) / "best.safetensors", register=self.register)
        self.parent.log_metrics({"trials_finished": int(table["rank"].notna().sum())})
        return result


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _without_password(url: str | None) -> str | None:
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url) if url else url
