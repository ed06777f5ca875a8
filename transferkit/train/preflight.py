"""Checks a finetune makes before it creates its run folder, so bad input fails in seconds and leaves nothing.

Each check answers one question a run would otherwise answer late, mid-epoch, with a traceback and a
half-made run folder: can every training image be opened, can the tracking store be written, does the
augmentation file build, does the strategy fit the model, and — when resuming — is the data still the
data the run was trained on.
"""

from __future__ import annotations

import csv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from torch import nn

from transferkit.data.decode import check_image
from transferkit.data.discover import DatasetIndex
from transferkit.errors import TransferkitError
from transferkit.train.config import TrainConfig

HEADER_CHECK_THREADS = 8  # header reads wait on the disk, not the CPU


def check_images(index: DatasetIndex, bad_images: str, min_short_side: int | None = None) -> list[str]:
    """Open every train/val image's header; with ``bad_images='skip'`` drop the bad ones from ``index``.

    Returns one line per skipped file (empty when all are fine); with ``'error'`` the first bad file
    stops the run, with the count of the others.
    """
    samples = [s for s in index.samples if s.split in ("train", "val")]
    with ThreadPoolExecutor(HEADER_CHECK_THREADS) as pool:
        problems = [(s, error) for s, error in zip(samples, pool.map(lambda s: check_image(s.path, min_short_side),
                                                                          samples)) if error]
    if not problems:
        return []
    if bad_images == "error":
        others = f"; {len(problems) - 1} more files fail too" if len(problems) > 1 else ""
        raise TransferkitError(f"{problems[0][1]}{others} (or pass --bad-images skip to train without such "
                               "files)")
    bad = {s.path for s, _ in problems}
    index.samples = [s for s in index.samples if s.path not in bad]
    return [error for _, error in problems]


def check_tracking(config: TrainConfig) -> None:
    if config.track:
        from transferkit.tracking.store import check_tracking_store

        check_tracking_store(config.tracking_uri)


def check_augmentation(config: TrainConfig, preprocessing) -> None:
    """Build the train transform once: a broken ``--aug`` file fails here, not after the run folder exists."""
    if not config.uses_feature_cache:
        preprocessing.train_transform(config.aug)


def check_strategy(config: TrainConfig, model: nn.Module) -> None:
    """``partial:N`` with more stages than the model has would silently train everything."""
    strategy = config.parsed_strategy
    if strategy.name == "partial":
        from transferkit.train.strategies import stage_groups

        stages = len(stage_groups(model))
        if strategy.stages > stages:
            raise TransferkitError(
                f"strategy {config.strategy} asks for {strategy.stages} stages but {config.backbone} has "
                f"{stages}; use partial:1 to partial:{stages}, or --strategy full to train everything")


def check_same_data(run_dir: Path, saved_fingerprint: str | None, index: DatasetIndex, fingerprint: str,
                    allow_change: bool) -> str | None:
    """Refuse to resume on other data than the run trained on; returns what changed when ``allow_change``."""
    if saved_fingerprint is None or saved_fingerprint == fingerprint:
        return None
    change = describe_change(run_dir / "split.csv", index)
    if not allow_change:
        raise TransferkitError(f"the data changed since {run_dir} started ({change}); resume with the same data, "
                               "start a new run, or pass --allow-data-change to continue knowingly")
    return change


def describe_change(split_csv: Path, index: DatasetIndex) -> str:
    """What differs between the run's ``split.csv`` and the data now, in a few words."""
    try:
        with open(split_csv, newline="") as fh:
            before = {row["path"]: (row["label"], row["split"]) for row in csv.DictReader(fh)}
    except (OSError, KeyError, csv.Error):
        return "dataset fingerprint differs"
    now = {row["path"]: (row["label"], row["split"]) for row in index.records()}
    added, removed = sorted(now.keys() - before.keys()), sorted(before.keys() - now.keys())
    moved = sorted(p for p in now.keys() & before.keys() if now[p] != before[p])
    parts = [f"{len(files)} files {what} (e.g. {files[0]})"
             for what, files in (("added", added), ("removed", removed), ("relabelled or moved", moved)) if files]
    return "; ".join(parts) or "files edited in place: sizes or modification times differ"


def check_layout(config: TrainConfig, index: DatasetIndex, world: int, device) -> None:
    """Every class in train and val, and a batch the train split, the process count and mixup can take."""
    counts = index.counts()
    for split in ("train", "val"):
        missing = [c for c in index.classes if counts.get(split, {}).get(c, 0) == 0]
        if missing:
            raise TransferkitError(
                f"classes missing from {split}: {', '.join(missing)}; every class needs {split} images "
                f"(add some, or raise --val-ratio / use class folders so val is carved per class)")
    n_train = len(index.split("train"))
    if config.batch_size > n_train:
        raise TransferkitError(f"batch size {config.batch_size} is larger than the {n_train} training images; "
                               f"use --batch-size {n_train} or less")
    if config.batch_size % world:
        raise TransferkitError(f"batch size {config.batch_size} (the global batch) must divide by the "
                               f"{world} processes; use a multiple of {world}")
    if world > 1 and config.sync_bn and device.type == "cpu":
        raise TransferkitError("--sync-bn needs GPUs (torch's SyncBatchNorm does not run on CPU); drop it")
    if world > 1 and config.balance == "sampler":
        raise TransferkitError("balance 'sampler' is not supported under torchrun; use --balance weights")
    if (config.mixup or config.cutmix) and (config.batch_size // world) % 2:
        raise TransferkitError(f"mixup/cutmix need an even batch per process, got {config.batch_size // world}")
