"""What a sweep searches: the sweep YAML, and a search space over any finetune key, checked before training.

A sweep file (shipped ones: ``recipes/sweeps/``, usable by name) is a mapping::

    backbones: [tf_efficientnet_lite0, mobilenetv2_100]   # ranked in stage 1
    top_k: 2                                              # how many go on to stage 2
    metric: val_accuracy                                  # what ranks: val_loss, val_accuracy or val_macro_f1
    trials: null                                          # null: grid over the choices; N: Optuna TPE, N trials
    fixed: {epochs: 3, batch_size: 32}                    # finetune keys every trial shares (a recipe)
    space:                                                # finetune keys searched
      strategy: [linear-probe, freeze-unfreeze]           # a list: choices
      lr: {low: 1.0e-4, high: 1.0e-2}                     # a range: log-uniform (log: false for uniform)

Every key and value goes through the same validation as ``transferkit finetune`` (:mod:`transferkit.train.config`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from transferkit import params
from transferkit.choices import MONITORS
from transferkit.errors import TransferkitError, did_you_mean
from transferkit.train.config import KEYS, read_recipe, resolve_config, value_type

SWEEP_FILE_KEYS = ("backbones", "top_k", "metric", "trials", "fixed", "space")
# Set by the sweep itself for every trial: searching them makes no sense.
NOT_SEARCHED = ("backbone", "data", "out", "name", "track", "tracking_uri", "experiment", "register")


@dataclass
class Dimension:
    """One searched key: a list of ``choices``, or a ``low``..``high`` range (log-uniform unless ``log`` is False)."""

    key: str
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    log: bool = True

    @property
    def is_int(self) -> bool:
        return value_type(self.key) is int

    def suggest(self, trial):
        """The value an Optuna trial takes for this key."""
        if self.choices is not None:
            return trial.suggest_categorical(self.key, self.choices)
        if self.is_int:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.key} in {self.choices}"
        return f"{self.key} {'log-' if self.log else ''}uniform in [{self.low:g}, {self.high:g}]"


@dataclass
class SearchSpace:
    """The searched keys (backbone included) and the finetune keys every trial shares."""

    dimensions: dict[str, Dimension] = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)

    @property
    def is_grid(self) -> bool:
        return all(d.choices is not None for d in self.dimensions.values())

    def grid(self) -> dict[str, list]:
        return {key: list(d.choices) for key, d in self.dimensions.items()}

    def grid_size(self) -> int:
        return math.prod(len(choices) for choices in self.grid().values()) if self.is_grid else 0

    def suggest(self, trial) -> dict:
        return {key: d.suggest(trial) for key, d in self.dimensions.items()}

    def describe(self) -> str:
        return "; ".join(d.describe() for d in self.dimensions.values())


def read_sweep_file(path: str | os.PathLike) -> dict:
    """The sweep YAML as a dict, its top-level keys checked."""
    data = read_recipe(path, kind="recipes/sweeps")
    unknown = [key for key in data if key not in SWEEP_FILE_KEYS]
    if unknown:
        raise TransferkitError(f"unknown key {unknown[0]!r} in sweep file {path}; a sweep file has "
                               f"{', '.join(SWEEP_FILE_KEYS)} (finetune keys go under fixed: or space:)")
    for key in ("fixed", "space"):
        if not isinstance(data.get(key) or {}, Mapping):
            raise TransferkitError(f"{key}: in sweep file {path} must be a mapping of finetune key: value")
    for key, constraint in (("top_k", params.TOPK), ("trials", params.TRIALS), ("metric", params.MONITOR)):
        if data.get(key) is not None:
            try:
                data[key] = constraint.check(key, data[key])
            except TransferkitError as exc:
                raise TransferkitError(f"{exc} (in sweep file {path})") from None
    backbones = data.get("backbones")
    if isinstance(backbones, str):
        data["backbones"] = [name.strip() for name in backbones.split(",") if name.strip()]
    elif backbones is not None and not (isinstance(backbones, list) and all(isinstance(b, str) for b in backbones)):
        raise TransferkitError(f"backbones: in sweep file {path} must be a list of timm names, got {backbones!r}")
    if "space" in data and not data["space"]:
        raise TransferkitError(f"the space: in sweep file {path} is empty; give at least one key to search, "
                               "or drop space: to compare backbones only")
    return data


def build_space(space: Mapping | None, fixed: Mapping | None = None, *, backbones: list[str] | None = None,
                strategies: list[str] | None = None) -> SearchSpace:
    """Check ``space`` (key: list of choices | {low, high, log}) and ``fixed`` as finetune would; backbones and
    strategies become choice dimensions."""
    fixed = dict(fixed or {})
    for key in fixed:
        _check_key(key, "the fixed settings")
    _validate(fixed, "the fixed settings")
    dimensions = {}
    if backbones:
        dimensions["backbone"] = Dimension("backbone", choices=list(backbones))
    if strategies:
        space = {**(space or {}), "strategy": list(strategies)}
    for key, value in (space or {}).items():
        _check_key(key, "the sweep space")
        if key in fixed:
            raise TransferkitError(f"{key!r} is both fixed ({key}={fixed[key]!r}) and searched; drop one of them")
        dimensions[key] = _dimension(key, value, fixed)
    return SearchSpace(dimensions, fixed)


def check_metric(metric: str) -> str:
    if metric not in MONITORS:
        raise TransferkitError(f"unknown metric {metric!r}; use one of {', '.join(MONITORS)}")
    return metric


def _check_key(key: str, where: str) -> None:
    if key not in KEYS:
        hint = did_you_mean(key, KEYS) or "; every finetune key is a flag of `transferkit finetune --help`"
        raise TransferkitError(f"unknown finetune key {key!r} in {where}{hint}")
    if key in NOT_SEARCHED:
        raise TransferkitError(f"{key!r} cannot be set in {where}: the sweep sets it "
                               "(backbones come from --backbones, outputs from --out and the tracking options)")


def _dimension(key: str, value, fixed: Mapping) -> Dimension:
    if isinstance(value, list):
        if not value:
            raise TransferkitError(f"the choices for {key!r} in the sweep space are empty; list at least one value")
        for choice in value:
            _validate({**fixed, key: choice}, f"the sweep space ({key})")
        return Dimension(key, choices=list(value))
    if isinstance(value, Mapping) and {"low", "high"} <= set(value) and set(value) <= {"low", "high", "log"}:
        low, high, log = value["low"], value["high"], bool(value.get("log", True))
        for bound in (low, high):
            _validate({**fixed, key: bound}, f"the sweep space ({key})")
        low, high = float(low), float(high)
        if not low < high or (log and low <= 0):
            raise TransferkitError(f"bad range for {key!r} in the sweep space: need low < high"
                                   f"{' and low > 0 for a log range' if log else ''}, got {low:g}..{high:g}")
        return Dimension(key, low=low, high=high, log=log)
    raise TransferkitError(f"bad search space entry for {key!r}: {value!r}; give a list of choices "
                           "or a range {low: A, high: B, log: true}")


def _validate(values: Mapping, where: str) -> None:
    """finetune's own checks (types, allowed values, consistency), with the place named."""
    try:
        resolve_config(None, {key: value for key, value in values.items() if key not in NOT_SEARCHED})
    except TransferkitError as exc:
        raise TransferkitError(f"{exc} (in {where})") from exc
