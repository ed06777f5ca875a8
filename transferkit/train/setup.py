"""Everything a run needs before its first epoch, checked before anything is written.

:func:`setup_run` finds the data, checks every image header and the layout, loads the backbone with its
preprocessing and a new head, and checks strategy and augmentation against them; :func:`build_training_data`
then builds the loaders (or, for a linear probe without augmentation, cached features), the loss and the EMA.
``finetune`` and ``lr-find`` share both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transferkit.core import distributed
from transferkit.core.runtime import amp_dtype, prepare_model
from transferkit.data import discover
from transferkit.errors import TransferkitError
from transferkit.models.backbones import load_backbone
from transferkit.models.saved_model import read_checkpoint_metadata
from transferkit.train import loaders, preflight
from transferkit.train.feature_cache import cached_features
from transferkit.train.loop import TrainingData
from transferkit.train.strategies import reset_head


@dataclass
class RunSetup:
    """The checked inputs of a run: its config, device, data, model and the task it learns."""

    config: object  # TrainConfig
    device: torch.device
    amp: bool
    task: object
    index: object  # DatasetIndex
    fingerprint: str
    model: nn.Module
    preprocessing: object

    @property
    def classes(self) -> list[str]:
        return self.index.classes


def setup_run(config, device: torch.device, *, task, state: dict | None, say) -> RunSetup:
    """Data and model of ``config`` (or of the resumed run whose resume ``state`` is given), all checked."""
    index = _discover(config, device, say)
    fingerprint = index.fingerprint()  # stats every file: once per run, not per checkpoint
    say(f"loading {config.backbone} and its weights …")
    model, preprocessing = _load_model(config, index.classes, state)
    preflight.check_strategy(config, model)
    preflight.check_augmentation(config, preprocessing)
    return RunSetup(config, device, config.amp and amp_dtype(device) is not None, task, index, fingerprint, model,
                    preprocessing)


def _discover(config, device: torch.device, say):
    index = discover(config.data, val_ratio=config.val_ratio, seed=config.seed)
    say(f"checking the headers of {len(index.split('train')) + len(index.split('val'))} train/val images …")
    skipped = preflight.check_images(index, config.bad_images)
    if skipped:
        say(f"skipped {len(skipped)} unreadable images (bad_images: skip), e.g. {skipped[0]}")
    preflight.check_layout(config, index, distributed.world_size(), device)
    return index


def _load_model(config, classes: list[str], state: dict | None):
    if state is not None:
        saved = state["identity"]
        if saved["backbone"] != config.backbone or saved["class_names"] != classes:
            raise TransferkitError(
                f"the run to resume trained {saved['backbone']} on classes {saved['class_names']}, but the data "
                f"has {classes}; resume with the same data")
    stated = read_checkpoint_metadata(Path(config.weights)) if config.weights else {}
    if stated.get("kind") == "classifier" and len(stated.get("class_names", [])) != len(classes):
        raise TransferkitError(
            f"--weights {config.weights} is a classifier for {len(stated['class_names'])} classes "
            f"({', '.join(stated['class_names'])}) but the data has {len(classes)}; "
            "pass the backbone's pretrained weights instead")
    overrides = {"img_size": config.img_size} if config.img_size else None
    model, preprocessing = load_backbone(
        config.backbone, weights=config.weights, num_classes=len(classes), pretrained=config.pretrained,
        weights_config=config.weights_config, data_overrides=overrides, resize_mode=config.resize_mode,
    )
    if state is not None:
        model.load_state_dict(state["model"])
    elif stated.get("kind") != "classifier":  # a transferkit classifier brings its trained head along
        reset_head(model)
    return model, preprocessing


def build_training_data(setup: RunSetup, *, head_features: bool, features_file: Path | None,
                        say) -> tuple[TrainingData, list | None]:
    """The run's :class:`TrainingData`, and the cached ``[train, val]`` features LP-FT fits its head on (when
    ``head_features``; None otherwise). Moves the model to the device (SyncBatchNorm under torchrun if asked)."""
    from transferkit.data.cache import build_cache
    from transferkit.data.dataset import ImageDataset

    config, preprocessing, index = setup.config, setup.preprocessing, setup.index
    world = distributed.world_size()
    train, val = index.split("train"), index.split("val")
    train_labels = np.array([s.label for s in train])
    cache = build_cache(config.cache, interpolation=preprocessing.interpolation)
    if cache is not None:  # what the cache will hold, before the first epoch fills it
        say(cache.describe([s.path for s in train + val], preprocessing.decode_short_side))
    eval_transform = preprocessing.eval_transform()

    def images(samples, transform):
        return ImageDataset([s.path for s in samples], [s.label for s in samples], transform,
                            min_short_side=preprocessing.decode_short_side, cache=cache)

    setup.model = prepare_model(setup.model, setup.device, benchmark=config.cudnn_benchmark)
    val_set = images(val, eval_transform)
    features = None
    if config.uses_feature_cache or head_features:
        features = cached_features(setup.model, images(train, eval_transform), val_set, config=config,
                                   device=setup.device, amp=setup.amp, stored=features_file,
                                   preprocessing=preprocessing, index=index, fingerprint=setup.fingerprint, say=say)
    if config.uses_feature_cache:
        train_set, val_set = features
        forward = setup.model.get_classifier()
    else:
        if config.parsed_strategy.name == "linear-probe":
            say(f"linear probe with aug {config.aug!r}: the frozen backbone runs every epoch "
                "(leave aug unset for features extracted once)")
        train_set = images(train, preprocessing.train_transform(config.aug))
        if config.sync_bn and world > 1:
            from timm.layers import convert_sync_batchnorm

            setup.model = convert_sync_batchnorm(setup.model)
        forward = setup.model
    workers = 0 if config.uses_feature_cache else config.workers
    train_loader = loaders.train_loader(train_set, train_labels, batch_size=config.batch_size // world,
                                        seed=config.seed, balance=config.balance, workers=workers, device=setup.device)
    val_loader = loaders.val_loader(val_set, batch_size=max(1, config.batch_size // world), workers=workers,
                                    device=setup.device)
    criterion, mixup = setup.task.training_loss(
        num_classes=len(setup.classes), train_labels=train_labels, label_smoothing=config.label_smoothing,
        mixup=config.mixup, cutmix=config.cutmix, balance=config.balance, device=setup.device)
    ema = None
    if config.ema:
        from transferkit.train.ema import WeightAverage

        ema = WeightAverage(forward, config.ema_decay, head_only=forward is not setup.model)
    data = TrainingData(train_loader, val_loader, len(val_set), train_labels, forward, criterion, mixup, ema)
    return data, features if head_features else None
