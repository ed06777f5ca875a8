"""The leaderboard: every trial of a study as one row, best first, written as CSV, markdown and a chart.

Its order is the sweep's one ranking rule (:func:`rank_order`): the winner, the progress lines, the parent run's
description and each trial run's ``rank_in_sweep`` in MLflow all read it from here.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from transferkit.core.fileio import atomic_path
from transferkit.sweep.study import SKIPPED
from transferkit.tasks import get_task
from transferkit.tracking.summary import TIE_BREAK

STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "FAIL": 3}


def rank_order(metric: str, task=None) -> tuple[list[str], list[bool]]:
    """``(columns, ascending)`` that rank trials: ``metric`` in the direction it improves, ties by the lower val
    loss (an equal accuracy on a small val split says little; the loss still tells the models apart), then the
    earlier trial. The experiment's ranking breaks ties the same way (:data:`~transferkit.tracking.summary.TIE_BREAK`)."""
    task = task or get_task()
    columns = [metric, *([TIE_BREAK] if TIE_BREAK != metric else []), "trial"]
    return columns, [task.direction(key) == "minimize" if key != "trial" else True for key in columns]


def leaderboard(study, metric: str, task=None) -> pd.DataFrame:
    """One row per trial run (skipped and queued ones left out): finished trials ranked by ``metric`` of their
    best checkpoint (in the direction ``task``, single-label by default, says it improves), then running and
    failed ones with their error."""
    from optuna.trial import TrialState

    task = task or get_task()
    trials = study.get_trials(deepcopy=False)
    retried_as = {t.system_attrs["retry_history"][-1]: t.number for t in trials if t.system_attrs.get("retry_history")}
    rows = []
    for trial in trials:
        attrs = trial.user_attrs
        if trial.state == TrialState.WAITING or attrs.get(SKIPPED):
            continue
        error = attrs.get("error")
        if trial.state == TrialState.FAIL and error is None:
            error = "its process was killed" + (f"; retried as trial {retried_as[trial.number]}"
                                                if trial.number in retried_as else "")
        best = attrs.get("best", {})
        rows.append({"trial": trial.number, "state": trial.state.name, **trial.params,
                     **{key: best.get(key) for key in task.checkpoint_columns}, "best_epoch": attrs.get("best_epoch"),
                     "seconds": attrs.get("seconds"), "params_m": attrs.get("params_m"),
                     "started_at": trial.datetime_start, "finished_at": trial.datetime_complete, "run_dir": attrs.get("run_dir"),
                     "mlflow_run_id": attrs.get("mlflow_run_id"), "worker": attrs.get("worker"),
                     "error": error})
    columns = ["rank", "trial", "state", *task.checkpoint_columns]
    if not rows:
        return pd.DataFrame(columns=columns)
    table = pd.DataFrame(rows)
    finished = table["state"].isin(["COMPLETE", "PRUNED"]) & table[metric].notna()
    columns, ascending = rank_order(metric, task)
    table = table.assign(_order=~finished).sort_values(
        ["_order", *columns], ascending=[True, *ascending], kind="stable", na_position="last",
    ).drop(columns="_order").reset_index(drop=True)
    ranked = table["state"].isin(["COMPLETE", "PRUNED"]) & table[metric].notna()
    table.insert(0, "rank", ranked.cumsum().where(ranked).astype("Int64"))
    return table


def markdown(table: pd.DataFrame, metric: str) -> str:
    """The leaderboard's readable columns as a GitHub-style table."""
    shown = [c for c in table.columns if c not in ("run_dir", "mlflow_run_id", "started_at", "finished_at", "worker")]
    return f"Trials ranked by {rule(metric)}.\n\n" + markdown_table(table[shown])


def rule(metric: str) -> str:
    """:func:`rank_order` in words."""
    tie = f", ties by the lower {TIE_BREAK}" if TIE_BREAK != metric else ""
    return f"{metric} of their best checkpoint{tie}, then trial order"


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
    from transferkit.reports.sweep_plot import sweep_png

    paths = []
    for name, text in (("leaderboard.csv", table.to_csv(index=False)), ("leaderboard.md", markdown(table, metric)),
                       ("ranking.csv", ranking.to_csv(index=False))):
        with atomic_path(folder / name) as tmp:
            tmp.write_text(text)
        paths.append(folder / name)
    finished = table[table["rank"].notna()]
    if len(finished):
        start = table["started_at"].min()
        points = [{"trial": row.trial, "label": row.backbone, "value": row[metric],
                   "minutes": (row.finished_at - start).total_seconds() / 60, "params_m": row.params_m,
                   "winner": row["rank"] == 1}
                  for _, row in finished.iterrows()]
        paths.append(sweep_png(points, metric, folder / "sweep.png"))
    return paths
