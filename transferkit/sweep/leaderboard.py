"""The leaderboard: every trial of a study as one row, best first, written as CSV, markdown and a chart."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from transferkit.core.fileio import atomic_path
from transferkit.sweep.study import SKIPPED
from transferkit.tasks import get_task

STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "FAIL": 3}


def leaderboard(study, metric: str, task=None) -> pd.DataFrame:
    """One row per trial run (skipped and queued ones left out): finished trials ranked by ``metric`` of their
    best checkpoint (in the direction ``task``, single-label by default, says it improves), then running and
    failed ones with their error."""
    from optuna.trial import TrialState

    task = task or get_task()
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if trial.state == TrialState.WAITING or attrs.get(SKIPPED):
            continue
        best = attrs.get("best", {})
        rows.append({"trial": trial.number, "state": trial.state.name, **trial.params,
                     **{key: best.get(key) for key in task.checkpoint_columns}, "best_epoch": attrs.get("best_epoch"),
                     "seconds": attrs.get("seconds"), "params_m": attrs.get("params_m"),
                     "started_at": trial.datetime_start, "finished_at": trial.datetime_complete, "run_dir": attrs.get("run_dir"),
                     "mlflow_run_id": attrs.get("mlflow_run_id"), "worker": attrs.get("worker"),
                     "error": attrs.get("error")})
    columns = ["rank", "trial", "state", *task.checkpoint_columns]
    if not rows:
        return pd.DataFrame(columns=columns)
    table = pd.DataFrame(rows)
    finished = table["state"].isin(["COMPLETE", "PRUNED"]) & table[metric].notna()
    table = table.assign(_order=~finished).sort_values(
        ["_order", metric, "trial"], ascending=[True, task.direction(metric) == "minimize", True], kind="stable",
    ).drop(columns="_order").reset_index(drop=True)
    ranked = table["state"].isin(["COMPLETE", "PRUNED"]) & table[metric].notna()
    table.insert(0, "rank", ranked.cumsum().where(ranked).astype("Int64"))
    return table


def markdown(table: pd.DataFrame, metric: str) -> str:
    """The leaderboard's readable columns as a GitHub-style table."""
    shown = [c for c in table.columns if c not in ("run_dir", "mlflow_run_id", "started_at", "finished_at", "worker")]
    return f"Trials ranked by {metric} of their best checkpoint.\n\n" + markdown_table(table[shown])


def markdown_table(table: pd.DataFrame) -> str:
    """Any DataFrame as a GitHub-style table (numbers to 4 significant digits)."""
    def cell(value) -> str:
        if value is None or (not isinstance(value, str) and pd.isna(value)):
            return ""
        return f"{value:.4g}" if isinstance(value, float) else str(value).replace("|", "/")

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_leaderboard(table: pd.DataFrame, ranking: pd.DataFrame, metric: str, folder: Path) -> list[Path]:
    """``leaderboard.csv``, ``leaderboard.md``, ``ranking.csv`` and ``sweep.png`` in ``folder`` (atomically)."""
    from transferkit.reports.plots import sweep_png

    paths = []
    for name, text in (("leaderboard.csv", table.to_csv(index=False)), ("leaderboard.md", markdown(table, metric)),
                       ("ranking.csv", ranking.to_csv(index=False))):
        with atomic_path(folder / name) as tmp:
            tmp.write_text(text)
        paths.append(folder / name)
    finished = table[table["rank"].notna()]
    if len(finished):
        start = table["started_at"].min()
        points = [{"label": f"{row.trial}: {row.backbone}", "value": row[metric],
                   "minutes": (row.finished_at - start).total_seconds() / 60, "params_m": row.params_m}
                  for _, row in finished.iterrows()]
        paths.append(sweep_png(points, metric, folder / "sweep.png"))
    return paths
