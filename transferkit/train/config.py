"""The training configuration: built-in defaults < recipe YAML < command-line flags.

A recipe is a flat YAML mapping of the same keys as :class:`TrainConfig` (shipped ones: ``recipes/``). Every key and
value is checked before anything runs against the constraint its field declares (:mod:`transferkit.params`; the
same declaration makes the ``finetune`` flag), and a bad one is named in a one-line error. The resolved config is
frozen and saved as ``config.yaml`` in the run folder, so a run can be repeated with ``--recipe
runs/<name>/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from transferkit import choices, params
from transferkit.errors import TransferkitError, did_you_mean
from transferkit.params import Interval, Options

# What may differ when a run is resumed: where and how it runs, and how long; never what it learns.
RESUME_OVERRIDABLE = ("device", "workers", "cache", "track", "tracking_uri", "experiment", "register")
AUTO_AUG = {"linear-probe": "none"}  # aug left unset: a linear probe gets the feature cache, the rest "light"
DEFAULT_AUG = "light"


@dataclass(frozen=True)
class Strategy:
    """A parsed ``strategy`` value: its name and, for ``partial:N``, the number of last stages that train."""

    name: str
    stages: int | None = None

    def __str__(self) -> str:
        return f"{self.name}:{self.stages}" if self.stages is not None else self.name


class StrategyText(params.Text):
    """A strategy name, or ``partial:N`` with N >= 1: a choice with an argument, so not plain :class:`Options`."""

    description = f"one of {', '.join(choices.STRATEGIES)} (N = number of last stages to train, >= 1)"
    metavar = "[" + "|".join(choices.STRATEGIES) + "]"

    def _accepts(self, value: str) -> bool:
        name, _, arg = value.partition(":")
        return (name == "partial" and arg.isdigit() and int(arg) > 0) or (not arg and name in choices.STRATEGIES)


STRATEGY = StrategyText()


def parse_strategy(text: str) -> Strategy:
    """``"partial:2"`` → ``Strategy("partial", 2)``; the one place a strategy string is read."""
    name, _, arg = STRATEGY.check("strategy", text).partition(":")
    return Strategy(name, int(arg) if arg else None)


def setting(default, help: str, constraint: params.Constraint | None = None):
    """A config field with its one-line help (shown beside its ``finetune`` flag) and the values it takes.

    Numbers must declare their ``constraint``; text and true/false fields get theirs from the type hint, which
    also adds the literals a field takes besides (``None`` when it is optional, ``"auto"`` for lr).
    """
    return field(default=default, metadata={"help": help, "constraint": constraint})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a finetune run depends on. Defaults follow timm / fastai fine-tuning practice."""

    backbone: str = setting("", "timm model name (see `transferkit backbones`).")
    data: str = setting("", "Image folder (class folders or train/val split folders) or labels CSV.")
    weights: str | None = setting(None, "Local weights file; unset: $TRANSFERKIT_WEIGHTS_DIR/<backbone>.safetensors, else the hub.")
    weights_config: str | None = setting(None, "JSON stating what a bare weights file needs.")
    pretrained: bool = setting(True, "Start from pretrained weights (false: random init).")
    img_size: int | None = setting(None, "Input size; unset: the backbone's own.", params.IMG_SIZE)
    val_ratio: float = setting(0.2, "Share of each class held out for validation when the data has no val split.",
                                params.VAL_RATIO)
    # what trains
    strategy: str = setting("freeze-unfreeze", "What trains: " + " | ".join(choices.STRATEGIES) + ".", STRATEGY)
    lp_ft: bool = setting(True, "freeze-unfreeze: first fit the new head on features cached once (LP-FT), "
                                "costing no epoch, then train everything for `epochs`.")
    freeze_epochs: int = setting(0, "freeze-unfreeze: head-only epochs over the images before everything trains.",
                                 Interval(int, 0, None))
    unfreeze_lr_scale: float = setting(1.0, "freeze-unfreeze: LR multiplier once everything trains (the top layer "
                                            "group then trains at lr, as in fastai's fine_tune; layer_decay below).",
                                      Interval(float, 0, 1, closed="right"))
    layer_decay: float = setting(0.75, "discriminative / freeze-unfreeze: LR x this per layer group from head to stem.",
                                 Interval(float, 0, 1, closed="right"))
    train_bn: bool = setting(False, "Let BatchNorm in frozen parts update its statistics and affine params.")
    bn_stats: str = setting("auto", "BatchNorm running statistics of the parts that train: frozen (inference mode, "
                                    "as Keras' fine-tuning guide advises after a head phase), update, or auto "
                                    "(frozen for freeze-unfreeze, update otherwise).", Options(choices.BN_STATS))
    # optimisation
    epochs: int = setting(10, "Epochs over the training images.", params.EPOCHS)
    batch_size: int = setting(16, "Batch size; the global batch under torchrun.", params.BATCH_SIZE)
    accum_steps: int = setting(1, "Gradient accumulation steps per optimizer step.", Interval(int, 1, None))
    lr: float | Literal["auto"] = setting(1e-3, "Learning rate of the head, or auto (LR range test before training).",
                                         Interval(float, 0, None, closed="neither"))
    optimizer: str = setting("adamw", "Optimizer (timm's factory).", Options(choices.OPTIMIZERS))
    momentum: float = setting(0.9, "SGD momentum.", Interval(float, 0, None))
    weight_decay: float = setting(0.01, "Weight decay (not on biases and norms).", Interval(float, 0, None))
    scheduler: str = setting("cosine", "LR schedule: cosine (with warmup), plateau (/10 when val loss stalls), none.",
                               Options(choices.SCHEDULERS))
    warmup_epochs: int = setting(0, "cosine: epochs of linear LR warmup.", Interval(int, 0, None))
    min_lr: float = setting(1e-6, "Lowest LR of the schedule.", Interval(float, 0, None))
    plateau_patience: int = setting(2, "plateau: epochs without val-loss progress before LR / 10.", Interval(int, 0, None))
    early_stopping: int = setting(5, "Epochs without progress on `monitor` before stopping; 0 = never.",
                                  Interval(int, 0, None))
    monitor: str = setting("val_loss", "Metric that picks the best epoch and drives early stopping.", params.MONITOR)
    label_smoothing: float = setting(0.1, "Label smoothing of the training loss.", Interval(float, 0, 1, closed="left"))
    mixup: float = setting(0.0, "Mixup alpha; 0 = off.", Interval(float, 0, None))
    cutmix: float = setting(0.0, "CutMix alpha; 0 = off.", Interval(float, 0, None))
    grad_clip: float | None = setting(None, "Max gradient norm; unset: no clipping.", Interval(float, 0, None))
    balance: str = setting("none", "Class imbalance: none, weights (loss weights) or sampler (balanced batches).",
                             Options(choices.BALANCE))
    ema: bool = setting(False, "Keep an exponential moving average of the weights (timm ModelEmaV3); validation "
                               "scores it and the better of raw and averaged weights is saved.")
    ema_decay: float = setting(0.998, "EMA decay per update (warmed up from 0 over the first updates).",
                               Interval(float, 0, 1, closed="right"))
    calibrate: bool = setting(True, "Fit a softmax temperature on the val split after training; predictors apply it.")
    # data pipeline
    aug: str | None = setting(None, f"Augmentation preset ({', '.join(choices.AUG_PRESETS)}) or albumentations YAML; "
                                    "unset: none for linear-probe (features cached once), light otherwise.")
    resize_mode: str | None = setting(None, "How images fit the input: crop, squash or letterbox; unset: the "
                                            "backbone's own (timm's crop_mode: crop for most).", params.RESIZE_MODE)
    cache: str = setting("none", "Keep decoded images between epochs: none, memory or disk.", params.CACHE_MODE)
    workers: int | None = setting(None, "Data loading processes; unset: CPU count - 1, at most 8.", params.WORKERS)
    bad_images: str = setting("error", "An unreadable train/val image: error (stop before training) or skip "
                                       "(train without it, and say how many).", Options(choices.BAD_IMAGES))
    allow_leakage: bool = setting(False, "Train even though the data check finds the same image in train and in "
                                         "val/test (every val score is then inflated).")
    # runtime
    device: str = setting("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.")
    amp: bool = setting(True, "Mixed precision on GPU (bf16 where supported, else fp16).")
    compile: bool = setting(False, "torch.compile the model.")
    cudnn_benchmark: bool = setting(False, "Let cuDNN time kernels and keep the fastest (GPU, fixed input size): "
                                           "faster, but a seeded run no longer repeats exactly.")
    sync_bn: bool = setting(False, "SyncBatchNorm across processes under torchrun.")
    seed: int = setting(0, "Random seed: same seed, same metrics on CPU.", params.SEED)
    # outputs and tracking
    out: str = setting("runs", "Parent folder of run folders.")
    name: str | None = setting(None, "Run folder name; unset: <backbone>-<strategy>-<timestamp>.")
    track: bool = setting(True, "Log the run to MLflow.")
    tracking_uri: str | None = setting(None, "MLflow tracking URI; unset: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.")
    experiment: str | None = setting(None, "MLflow experiment name; unset: the dataset folder's name.")
    register: str | None = setting(None, "Register the best model in the MLflow model registry under this name.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        from transferkit.core.fileio import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @property
    def parsed_strategy(self) -> Strategy:
        """The parsed ``strategy``."""
        return parse_strategy(self.strategy)

    @property
    def uses_feature_cache(self) -> bool:
        """A linear probe that sees every image the same way each epoch: extract features once."""
        return self.parsed_strategy.name == "linear-probe" and self.aug == "none" and not (self.mixup or self.cutmix)

    @property
    def frozen_bn_stats(self) -> bool:
        """freeze-unfreeze fits its head on the body's inference-mode features; BatchNorm switched to batch
        statistics when the body unfreezes would feed that head other features (its accuracy on train batches fell
        from 0.92 to 0.25 on a 10-class set), so there ``auto`` keeps the pretrained statistics."""
        if self.bn_stats == "auto":
            return self.parsed_strategy.name == "freeze-unfreeze"
        return self.bn_stats == "frozen"

    @property
    def head_on_features(self) -> bool:
        """freeze-unfreeze with LP-FT: the new head is fitted on cached features before the body unfreezes."""
        return self.parsed_strategy.name == "freeze-unfreeze" and self.lp_ft


KEYS = tuple(f.name for f in fields(TrainConfig))
TYPE_HINTS = typing.get_type_hints(TrainConfig)
_BY_TYPE = {str: params.Text(), bool: params.Boolean()}  # the fields that need not declare a constraint


def value_type(key: str) -> type:
    """The type a key's value has when it is not one of its literals: ``float`` for lr, ``int`` for workers."""
    hint = TYPE_HINTS[key]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None) and typing.get_origin(arg) is not Literal]
    return hint


def _field_constraint(spec: dataclasses.Field) -> params.Constraint:
    """The field's declared constraint (or its type's), taking the literals its type hint adds."""
    constraint = spec.metadata["constraint"] or _BY_TYPE.get(value_type(spec.name))
    if constraint is None:
        raise TypeError(f"TrainConfig.{spec.name} is a number: declare its range with setting(..., constraint=...)")
    hint_args = typing.get_args(TYPE_HINTS[spec.name])
    literals = [None] * (type(None) in hint_args) + [value for arg in hint_args if typing.get_origin(arg) is Literal
                                                       for value in typing.get_args(arg)]
    return constraint.allowing(*literals) if literals else constraint


CONSTRAINTS: dict[str, params.Constraint] = {spec.name: _field_constraint(spec) for spec in fields(TrainConfig)}


def resolve_config(recipe: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the recipe's keys, then ``overrides`` (CLI flags; ``None`` values mean "not given")."""
    values = TrainConfig().to_dict()
    if recipe is not None:
        values.update(_check_keys(read_recipe(recipe), f"recipe {recipe}"))
    values.update(_check_keys({k: v for k, v in (overrides or {}).items() if v is not None}, "options"))
    checked = {key: CONSTRAINTS[key].check(key, value) for key, value in values.items()}
    if checked["aug"] is None:
        checked["aug"] = AUTO_AUG.get(parse_strategy(checked["strategy"]).name, DEFAULT_AUG)
    config = TrainConfig(**checked)
    _check_across_keys(config)
    return config


def resume_config(run_dir: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The saved config of the run in ``run_dir``; only where/how it runs may be overridden, not what it learns."""
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.is_file():
        raise TransferkitError(f"{run_dir} has no config.yaml; --resume takes a run folder written by transferkit finetune")
    saved = resolve_config(saved_path)
    given = _check_keys({k: v for k, v in (overrides or {}).items() if v is not None}, "options")
    changed = [k for k, v in given.items()
               if k not in RESUME_OVERRIDABLE and CONSTRAINTS[k].check(k, v) != getattr(saved, k)]
    if changed:
        raise TransferkitError(
            f"cannot change {changed[0]} when resuming (the run was trained with {changed[0]}={getattr(saved, changed[0])!r}); "
            f"only {', '.join(RESUME_OVERRIDABLE)} may differ")
    return resolve_config(saved_path, given)


def read_recipe(path: str | os.PathLike, kind: str = "recipes") -> dict:
    """A recipe file, or the name of one shipped in ``transferkit/<kind>/`` (``quick-cpu``)."""
    from transferkit.core.bundled import resolve_yaml

    path = resolve_yaml(path, kind, "recipe")
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TransferkitError(f"cannot read recipe {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise TransferkitError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TransferkitError(f"recipe {path} must be a mapping of key: value (see `transferkit recipes quick-cpu`)")
    return data


def _check_across_keys(config: TrainConfig) -> None:
    """The rules no single key's constraint can state: each key's own value was checked as it was read."""
    if config.aug not in choices.AUG_PRESETS:  # a file: albumentations (and torch with it) only then
        from transferkit.data.augment import preset_path

        preset_path(config.aug)
    if config.parsed_strategy.name == "freeze-unfreeze" and config.freeze_epochs >= config.epochs:
        _bad("freeze_epochs", config.freeze_epochs,
             f"freeze-unfreeze with {config.freeze_epochs} head-only epochs needs epochs >= {config.freeze_epochs + 1} "
             f"(or freeze_epochs: 0, the default, where the head is fitted on cached features at no epoch's cost)")
    if config.name is not None:
        _check_run_name(config.name)
    if config.balance == "weights" and (config.mixup or config.cutmix):
        _bad("balance", "weights", "class weights do not apply to mixed soft targets; use balance: sampler with mixup/cutmix")


def _check_run_name(name: str) -> None:
    """A run name is one folder inside ``out``: never a path that leads elsewhere."""
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name or os.sep in name:
        _bad("name", name, "a run name is a single folder name, without / or \\ (the folder goes in --out)")


def _check_keys(values: Mapping, where: str) -> dict:
    unknown = [key for key in values if key not in KEYS]
    if unknown:
        raise unknown_key(unknown[0], where)
    return dict(values)


def unknown_key(key: str, where: str) -> TransferkitError:
    """A key no config field has: the near-misses (``epoch`` → epochs), not all ~60 keys."""
    hint = did_you_mean(key, KEYS) or "; every key is a flag of `transferkit finetune --help` (--key-name)"
    return TransferkitError(f"unknown key {key!r} in {where}{hint}")


def given_settings(config: TrainConfig, recipe: str | os.PathLike | None) -> tuple[dict, dict]:
    """``(recipe keys, overrides)`` behind ``config``: what its recipe set, and what differs from the recipe
    (the command line's flags and key=value settings), for the run's header."""
    from_recipe = _check_keys(read_recipe(recipe), f"recipe {recipe}") if recipe is not None else {}
    base = resolve_config(recipe)
    overrides = {key: value for key, value in config.to_dict().items() if getattr(base, key) != value}
    return from_recipe, overrides


def _bad(key: str, value, hint: str):
    raise TransferkitError(params.bad_value(key, value, hint))
