"""The training configuration: built-in defaults < recipe YAML < command-line flags.

A recipe is a flat YAML mapping of the same keys as :class:`TrainConfig` (see ``recipes/``). Every key and
value is checked before anything runs, and a bad one is named in a one-line error. The resolved config is
saved as ``config.yaml`` in the run folder, so a run can be repeated with ``--recipe runs/<name>/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from transferkit import choices
from transferkit.data.augment import preset_path
from transferkit.errors import TransferkitError

# What may differ when a run is resumed: where and how it runs, and how long; never what it learns.
RESUME_OVERRIDABLE = ("device", "workers", "cache", "track", "tracking_uri", "experiment", "register")


@dataclass
class TrainConfig:
    """Everything a finetune run depends on. Defaults follow timm / fastai fine-tuning practice."""

    backbone: str = ""
    data: str = ""
    weights: str | None = None
    weights_config: str | None = None
    pretrained: bool = True
    img_size: int | None = None
    val_ratio: float = 0.2
    # what trains
    strategy: str = "freeze-unfreeze"
    freeze_epochs: int = 1  # freeze-unfreeze: head-only epochs before the whole model trains
    unfreeze_lr_scale: float = 0.5  # freeze-unfreeze: head LR multiplier once everything trains
    layer_decay: float = 0.75  # discriminative and freeze-unfreeze's 2nd phase: LR × this per layer from head to stem
    train_bn: bool = False  # let BatchNorm in frozen parts update its statistics and affine params
    # optimisation
    epochs: int = 10
    batch_size: int = 16
    accum_steps: int = 1
    lr: float = 1e-3
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.01
    scheduler: str = "cosine"
    warmup_epochs: int = 0
    min_lr: float = 1e-6
    plateau_patience: int = 2  # plateau: epochs without val-loss progress before LR ÷ 10
    early_stopping: int = 5  # epochs without progress on `monitor` before stopping; 0 = never
    monitor: str = "val_loss"
    label_smoothing: float = 0.1
    mixup: float = 0.0  # mixup alpha; 0 = off
    cutmix: float = 0.0  # cutmix alpha; 0 = off
    grad_clip: float | None = None  # max gradient norm
    balance: str = "none"
    # data pipeline
    aug: str = "light"
    resize_mode: str = "crop"
    cache: str = "none"
    workers: int | None = None
    # runtime
    device: str = "auto"
    amp: bool = True
    compile: bool = False
    sync_bn: bool = False
    seed: int = 0
    # outputs and tracking
    out: str = "runs"
    name: str | None = None
    track: bool = True
    tracking_uri: str | None = None
    experiment: str | None = None
    register: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        from transferkit.core.fileio import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @property
    def strategy_name(self) -> str:
        return self.strategy.split(":")[0]

    @property
    def partial_stages(self) -> int:
        """N of ``partial:N``."""
        return int(self.strategy.split(":")[1])

    @property
    def uses_feature_cache(self) -> bool:
        """A linear probe that sees every image the same way each epoch: extract features once."""
        return self.strategy == "linear-probe" and self.aug == "none" and not (self.mixup or self.cutmix)


KEYS = tuple(f.name for f in fields(TrainConfig))


def resolve_config(recipe: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the recipe's keys, then ``overrides`` (CLI flags; ``None`` values mean "not given")."""
    values = TrainConfig().to_dict()
    if recipe is not None:
        values.update(_check_keys(read_recipe(recipe), f"recipe {recipe}"))
    values.update(_check_keys({k: v for k, v in (overrides or {}).items() if v is not None}, "options"))
    config = TrainConfig(**{key: _coerce(key, value) for key, value in values.items()})
    validate(config)
    return config


def resume_config(run_dir: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The saved config of the run in ``run_dir``; only where/how it runs may be overridden, not what it learns."""
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.is_file():
        raise TransferkitError(f"{run_dir} has no config.yaml; --resume takes a run folder written by transferkit finetune")
    saved = resolve_config(saved_path)
    given = _check_keys({k: v for k, v in (overrides or {}).items() if v is not None}, "options")
    changed = [k for k, v in given.items() if k not in RESUME_OVERRIDABLE and _coerce(k, v) != getattr(saved, k)]
    if changed:
        raise TransferkitError(
            f"cannot change {changed[0]} when resuming (the run was trained with {changed[0]}={getattr(saved, changed[0])!r}); "
            f"only {', '.join(RESUME_OVERRIDABLE)} may differ")
    return resolve_config(saved_path, given)


def read_recipe(path: str | os.PathLike) -> dict:
    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TransferkitError(f"cannot read recipe {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise TransferkitError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TransferkitError(f"recipe {path} must be a mapping of key: value (see recipes/quick-cpu.yaml)")
    return data


def validate(config: TrainConfig) -> None:
    """Reject values that would fail (or silently misbehave) later, naming the key."""
    allowed_values = {"optimizer": choices.OPTIMIZERS, "scheduler": choices.SCHEDULERS, "balance": choices.BALANCE,
                      "cache": choices.CACHE_MODES, "resize_mode": choices.RESIZE_MODES, "monitor": choices.MONITORS}
    for key, allowed in allowed_values.items():
        if getattr(config, key) not in allowed:
            _bad(key, getattr(config, key), f"use one of {', '.join(allowed)}")
    _check_strategy(config.strategy)
    preset_path(config.aug)  # a preset name or an existing albumentations file
    positive = ("epochs", "batch_size", "accum_steps", "lr")
    non_negative = ("freeze_epochs", "warmup_epochs", "min_lr", "plateau_patience", "early_stopping", "weight_decay",
                    "mixup", "cutmix", "momentum", "seed")
    for key in positive:
        if getattr(config, key) <= 0:
            _bad(key, getattr(config, key), "it must be > 0")
    for key in non_negative:
        if getattr(config, key) < 0:
            _bad(key, getattr(config, key), "it must be >= 0")
    for key in ("label_smoothing", "val_ratio"):
        if not 0 <= getattr(config, key) < 1:
            _bad(key, getattr(config, key), "it must be in [0, 1)")
    for key in ("layer_decay", "unfreeze_lr_scale"):
        if not 0 < getattr(config, key) <= 1:
            _bad(key, getattr(config, key), "it must be in (0, 1]")
    for key in ("img_size", "workers", "grad_clip"):
        value = getattr(config, key)
        if value is not None and value < (1 if key == "img_size" else 0):
            _bad(key, value, "it must be a positive number or null")
    if config.strategy == "freeze-unfreeze" and config.freeze_epochs >= config.epochs:
        _bad("freeze_epochs", config.freeze_epochs, f"freeze-unfreeze needs fewer head-only epochs than epochs={config.epochs}")
    if config.balance == "weights" and (config.mixup or config.cutmix):
        _bad("balance", "weights", "class weights do not apply to mixed soft targets; use balance: sampler with mixup/cutmix")


def _check_keys(values: Mapping, where: str) -> dict:
    unknown = [key for key in values if key not in KEYS]
    if unknown:
        raise TransferkitError(f"unknown key {unknown[0]!r} in {where}; valid keys: {', '.join(KEYS)}")
    return dict(values)


def _coerce(key: str, value):
    """YAML/CLI value → the field's type (ints accepted for floats, numeric strings for numbers)."""
    kind = TrainConfig.__dataclass_fields__[key].type
    optional = "None" in kind
    if value is None:
        if optional:
            return None
        _bad(key, value, "it needs a value")
    base = kind.replace(" | None", "")
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            raise ValueError
        if base == "int":
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base == "str":
            if isinstance(value, (dict, list, bool)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        _bad(key, value, f"expected {'true/false' if base == 'bool' else 'a number' if base in ('int', 'float') else 'a string'}")
    return value


def _check_strategy(strategy: str) -> None:
    name, _, arg = strategy.partition(":")
    if name == "partial" and arg.isdigit() and int(arg) > 0:
        return
    if arg or name not in choices.STRATEGIES:
        _bad("strategy", strategy, f"use one of {', '.join(choices.STRATEGIES)} (N = number of last stages to train, >= 1)")


def _bad(key: str, value, hint: str):
    raise TransferkitError(f"bad value for {key}: {value!r}; {hint}")
