"""What runs are called and tagged with, so a reviewer finds and filters them in the MLflow UI."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

MAX_KEY = 250
_INVALID_KEY_CHARS = re.compile(r"[^\w./\- :]")


def default_run_name(backbone: str, strategy: str) -> str:
    """``<backbone>-<strategy>-<YYYYmmdd-HHMMSS>``: sortable, says what was trained how, and is one folder name
    even for ``hf-hub:org/name`` backbones."""
    from transferkit.core.fileio import safe_name

    return safe_name(f"{backbone}-{strategy}-{time.strftime('%Y%m%d-%H%M%S')}")


def display_run_name(backbone: str, strategy: str, lr, seed: int) -> str:
    """The MLflow run name of an unnamed finetune: what tells runs of one experiment (one dataset) apart comes
    first, so a narrow Run Name column still shows it: ``full lr=0.0003 s1 effnet_lite0``. The run folder keeps
    :func:`default_run_name` (sortable by time); a run named by the user (``--name``, a sweep's trial) keeps it.
    """
    rate = lr if isinstance(lr, str) else _short_number(lr)
    return f"{strategy} lr={rate} s{seed} {short_backbone(backbone)}"


def short_backbone(backbone: str) -> str:
    """``tf_efficientnet_lite0`` → ``effnet_lite0``; ``hf-hub:org/vit_base.augreg`` → ``vit_base``."""
    name = backbone.rsplit("/", 1)[-1].split(".")[0].removeprefix("hf-hub:")
    return name.removeprefix("tf_").replace("efficientnet", "effnet")


def _short_number(value: float) -> str:
    mantissa, _, exponent = f"{value:.3g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def default_experiment_name(dataset_path: str | os.PathLike) -> str:
    """One experiment per dataset, named after its folder, so runs on the same data sit together."""
    return Path(dataset_path).expanduser().resolve().name


def recipe_git_commit(recipe_path: str | os.PathLike | None) -> str | None:
    """HEAD of the git repository holding the user's recipe file, if it is in one."""
    if not recipe_path:
        return None
    folder = Path(recipe_path).expanduser().resolve().parent
    try:
        result = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (result.stdout.strip() or None) if result.returncode == 0 else None


def run_tags(*, backbone: str | None = None, strategy: str | None = None, dataset_fingerprint: str | None = None,
             recipe: str | os.PathLike | None = None) -> dict:
    """The tags a reviewer filters runs by; ``None`` values are left out."""
    tags = {
        "backbone": backbone,
        "strategy": strategy,
        "dataset_fingerprint": dataset_fingerprint,
        "recipe": str(recipe) if recipe else None,
        "recipe_git_commit": recipe_git_commit(recipe),
    }
    return {key: value for key, value in tags.items() if value is not None}


def clean_key(key) -> str:
    """MLflow keys allow letters, digits, ``_ . / - :`` and spaces; anything else (class names!) becomes ``_``."""
    return _INVALID_KEY_CHARS.sub("_", str(key))[:MAX_KEY]
