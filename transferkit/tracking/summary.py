"""What a reviewer reads first about a run: its evaluation metrics as MLflow keys, and its description.

Shared by every command that logs a run (finetune, svm, evaluate, sweep), so their runs read alike in the UI.
Names follow :mod:`transferkit.reports.metrics` (``val_accuracy``, ``test_macro_f1``). Only split-level scalars
are metrics: per-class precision / recall / F1 are one table artifact per split (:func:`per_class_columns`), since
three metrics per class per split buried the headline in the runs table's column list and the chart grid.

The description (MLflow's ``mlflow.note.content`` tag, shown at the top of the run page) is short markdown:
a title line, a few facts, the headline metrics, and one line per later evaluation of the run's model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Number

from transferkit.reports.metrics import PER_CLASS_STATS

NOTE_TAG = "mlflow.note.content"
EVALUATIONS_HEADING = "**Evaluations**"


def evaluation_metrics(scores: Mapping) -> dict[str, float]:
    """An evaluation (:func:`transferkit.reports.metrics.split_scores` form) → its split-prefixed scalars as
    MLflow metrics (``test_accuracy``, ``test_ece``, ``test_n``)."""
    split = scores["split"]
    return {key: float(value) for key, value in scores.items()
            if key.startswith(f"{split}_") and isinstance(value, Number) and not isinstance(value, bool)}


def per_class_columns(per_class: Mapping[str, Mapping]) -> dict[str, list]:
    """The per-class report as ``mlflow.log_table`` columns: class, precision, recall, f1, support."""
    names = list(per_class)
    return {"class": [str(name) for name in names],
            **{stat: [float(per_class[name][stat]) for name in names] for stat in PER_CLASS_STATS},
            "support": [int(per_class[name]["support"]) for name in names]}


def run_description(title: str, facts: Sequence[str] = (), metrics: Mapping[str, float] | None = None) -> str:
    """Markdown for the top of a run page: a bold title, facts as a list, then a metric | value table."""
    lines = [f"**{title}**", ""]
    lines += [f"- {fact}" for fact in facts]
    if metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| `{key}` | {_number(value)} |" for key, value in metrics.items()]
    return "\n".join(lines) + "\n"


def evaluation_line(scores: Mapping, *, data: str | None = None, tta: str = "none", artifacts: str | None = None) -> str:
    """One markdown line for an evaluation: split, images, data, accuracy and macro-F1, where its plots are."""
    split = scores["split"]
    where = f" of `{data}`" if data else ""
    with_tta = f", TTA {tta}" if tta and tta != "none" else ""
    plots = f"; confusion matrix: `{artifacts}/confusion_matrix.png`" if artifacts else ""
    return (f"- **{split}**: {scores[f'{split}_n']} images{where}{with_tta}: "
            f"`{split}_accuracy` {_number(scores[f'{split}_accuracy'])}, "
            f"`{split}_macro_f1` {_number(scores[f'{split}_macro_f1'])}{plots}")


def with_evaluation(description: str, split: str, line: str) -> str:
    """``description`` with ``line`` as its evaluation of ``split`` (replacing an earlier one of that split)."""
    marker = f"- **{split}**:"
    lines = [old for old in description.rstrip("\n").splitlines() if not old.startswith(marker)]
    if EVALUATIONS_HEADING not in lines:
        lines += ["", EVALUATIONS_HEADING, ""]
    lines.append(line)
    return "\n".join(lines) + "\n"


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


# --- the experiment's "best first" view and description (issue 25) ---
BEST_VIEW_KEY = "transferkit-best"  # the experiment's saved view: ``#/experiments/<id>/runs?viewStateShareKey=<key>``
BEST_VIEW_TAG = f"mlflow.sharedViewState.{BEST_VIEW_KEY}"  # where MLflow 3's UI keeps a saved view
TIE_BREAK = "val_loss"  # equal headline scores: the lower val loss ranks first
# A run's place in its experiment by that rule (1 = best), kept up to date as runs land: MLflow's table sorts by
# one key only, and sorted by val_accuracy alone it shows a tied, worse run on top.
RANK_METRIC = "rank_in_experiment"
VIEW_COLUMNS = (("metrics", RANK_METRIC), ("metrics", "val_accuracy"), ("metrics", "val_macro_f1"), ("metrics", "val_loss"),
                ("metrics", "test_accuracy"), ("metrics", "best_epoch"), ("tags", "backbone"), ("tags", "strategy"))
SETTINGS_SHOWN = ("strategy", "lr", "epochs", "batch_size", "img_size", "aug", "seed")


def column_key(kind: str, name: str) -> str:
    """A runs-table column as MLflow's UI names it (``metrics.`val_accuracy```), in a view or a sort."""
    return f"{kind}.`{name}`"


def best_view(headline: str, created_ms: int) -> str:
    """The saved view (MLflow 3's ``{name, createdAt, state}`` envelope) that opens the runs table with the
    headline columns shown and the best run first (by :data:`RANK_METRIC`), instead of MLflow's default
    Source / Models / Dataset columns in start-time order."""
    import json

    state = {"orderByKey": column_key("metrics", RANK_METRIC), "orderByAsc": True,
             "selectedColumns": [column_key(kind, name) for kind, name in VIEW_COLUMNS]}
    return json.dumps({"name": f"Best first (by {headline}, then {TIE_BREAK})", "createdAt": created_ms,
                       "updatedAt": created_ms, "state": json.dumps(state)})


def view_link(ui_url: str, experiment_id: str, has_view: bool, headline: str) -> str:
    """The experiment's runs table, best first: its saved view, else (a store from before it) a sort link."""
    base = f"{ui_url}/#/experiments/{experiment_id}/runs"
    if has_view:
        return f"{base}?viewStateShareKey={BEST_VIEW_KEY}"
    return f"{base}?orderByKey=metrics.%60{headline}%60&orderByAsc=false"  # ties in start order


def experiment_description(headline: str, best: Mapping, n_runs: int) -> str:
    """Markdown for the experiment page: which run is best, by what, with which settings.

    ``best``: ``name``, ``run_id``, ``metrics``, ``settings`` (param name → value) and ``backbone``.
    """
    metrics = best["metrics"]
    tie = f", ties broken by lower `{TIE_BREAK}`" if TIE_BREAK != headline else ""
    scores = ", ".join(f"`{key}` {_number(metrics[key])}" for key in (headline, "val_macro_f1", TIE_BREAK, "test_accuracy")
                       if key in metrics)
    settings = ", ".join(f"{key} {best['settings'][key]}" for key in SETTINGS_SHOWN if key in best["settings"])
    epoch = f"; kept epoch {int(metrics['best_epoch'])}" if "best_epoch" in metrics else ""
    return (f"**Best run: `{best['name']}`** (`{best['run_id']}`), ranked first of {n_runs} finished runs by "
            f"`{headline}`{tie}.\n\n"
            f"- scores: {scores}\n"
            f"- model: `{best['backbone']}`; {settings}{epoch}\n"
            f"- [runs table, best first](#/experiments/{best['experiment_id']}/runs?viewStateShareKey={BEST_VIEW_KEY}); "
            f"[best run](#/experiments/{best['experiment_id']}/runs/{best['run_id']})\n\n"
            "_Updated by transferkit when a run finishes or is evaluated._\n")
