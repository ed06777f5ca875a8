"""What a reviewer reads first about a run: its evaluation metrics as chartable MLflow keys, and its description.

Shared by every command that logs a run (finetune, svm, evaluate, sweep), so their runs read alike in the UI.
Names follow :mod:`transferkit.reports.metrics` (``val_accuracy``, ``test_macro_f1``); per class they are
``<split>_<stat>/<class key>`` (``val_recall/paved``): the ``/`` groups them into one chart section per
statistic, and the compare view plots any of them across runs. A class key is the class name made safe for
every MLflow store and for MLflow's search syntax (see :func:`class_metric_keys`); the mapping from class
name to key is logged with the metrics as :data:`CLASS_KEYS_ARTIFACT`.

The description (MLflow's ``mlflow.note.content`` tag, shown at the top of the run page) is short markdown:
a title line, a few facts, the headline metrics, and one line per later evaluation of the run's model.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from numbers import Number

from transferkit.reports.metrics import PER_CLASS_STATS

NOTE_TAG = "mlflow.note.content"
CLASS_KEYS_ARTIFACT = "class_metric_keys.json"
EVALUATIONS_HEADING = "**Evaluations**"
MAX_CLASS_KEY = 100
_UNSAFE_IN_KEY = re.compile(r"[^\w.\-]+")  # \w: unicode letters and digits, and _


def class_metric_keys(class_names: Sequence[str]) -> dict[str, str]:
    """Class name → its part of a metric key: unique, never empty, no spaces, ``/`` or ``:``.

    Unicode letters and digits, ``.``, ``-`` and ``_`` are kept (``café`` stays ``café``); any run of other
    characters becomes one ``_`` (``"dirt road"`` → ``dirt_road``). MLflow accepts spaces and ``:`` too, but
    a key with a space needs backquotes in a search and ``:`` is refused on Windows; ``/`` would nest.
    A name with nothing left (``"."``, ``"?"``) becomes ``class_<index>``; a clash gets ``_2``, ``_3``.
    """
    keys: dict[str, str] = {}
    used: set[str] = set()
    for index, name in enumerate(class_names):
        key = _UNSAFE_IN_KEY.sub("_", unicodedata.normalize("NFC", str(name))).strip("_.")[:MAX_CLASS_KEY]
        key = key or f"class_{index}"
        candidate, n = key, 1
        while candidate in used:
            n += 1
            candidate = f"{key}_{n}"
        used.add(candidate)
        keys[name] = candidate
    return keys


def evaluation_metrics(scores: Mapping) -> dict[str, float]:
    """An evaluation (:func:`transferkit.reports.metrics.split_scores` form) → flat MLflow metrics.

    The split-prefixed scalars as they are (``test_accuracy``, ``test_ece``, ``test_n``), and per class
    ``<split>_precision/<key>``, ``<split>_recall/<key>``, ``<split>_f1/<key>``.
    """
    split = scores["split"]
    flat = {key: float(value) for key, value in scores.items()
            if key.startswith(f"{split}_") and isinstance(value, Number) and not isinstance(value, bool)}
    per_class = scores.get("per_class") or {}
    for name, key in class_metric_keys(list(per_class)).items():
        for stat in PER_CLASS_STATS:
            flat[f"{split}_{stat}/{key}"] = float(per_class[name][stat])
    return flat


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
