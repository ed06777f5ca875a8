"""The finetune loop: one run folder, epochs in phases, a commit point after every epoch.

Run folder ``runs/<name>/``: ``config.yaml`` (resolved), ``split.csv``, ``metrics.csv``, ``best.*`` and
``last.*`` (transferkit classifier checkpoints, loadable by :func:`transferkit.models.predictors.load_predictor`),
``curves.png``, ``resume.pt`` (see :mod:`.checkpoint`), the review of the finished run — ``val/`` (the best
checkpoint's evaluation report on its val split, see :func:`transferkit.use.evaluate.write_report`),
``augment_preview.png`` and ``data_check.json`` — and, written last, ``result.json``: a folder without it is
an unfinished run, to be continued with ``--resume``. With tracking on, all of it goes to MLflow too, in one
experiment per dataset (the data folder's name unless ``experiment`` is set).

Under torchrun every rank runs this same code on its share of each batch (DistributedDataParallel);
metrics are reduced across ranks and only rank 0 writes files, prints and talks to MLflow.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from transferkit.core import distributed
from transferkit.core.fileio import atomic_path, ensure_writable_dir, write_json
from transferkit.core.runtime import (
    amp_dtype,
    autocast,
    prepare_model,
    seed_everything,
    select_device,
    to_device,
)
from transferkit.data import discover
from transferkit.data.dataset import make_loader
from transferkit.errors import TransferkitError
from transferkit.models.backbones import load_backbone
from transferkit.models.saved_model import checkpoint_metadata, read_checkpoint_metadata, save_checkpoint
from transferkit.reports.metrics import CHECKPOINT_COLUMNS, EPOCH_COLUMNS, EPOCH_SERIES_PREFIX
from transferkit.train import loaders, preflight, resume_state, run_folder
from transferkit.train.config import TrainConfig
from transferkit.train.lr_finder import LRFinding
from transferkit.train.optim import Schedule, build_optimizer
from transferkit.train.strategies import Phase, apply_trainable, phase_at, phases, reset_head, set_train_mode

METRIC_COLUMNS = EPOCH_COLUMNS  # metrics.csv header; names fixed in transferkit.reports.metrics
TIMING_COLUMNS = ("epoch_seconds", "images_per_s")
# A val loss counts as progress (new best, early-stopping patience reset) only if it beats the best by this
# fraction: torch's ReduceLROnPlateau default, so the plateau schedule and early stopping agree on a stall.
MIN_REL_IMPROVEMENT = 1e-4


@dataclass
class RunResult:
    run_dir: Path
    best_epoch: int
    best: dict  # the metrics.csv row of the best epoch
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    model_uri: str | None = None  # MLflow model URI when tracked

    def summary(self) -> str:
        return (f"run {self.run_dir}: best epoch {self.best_epoch}, val_loss {self.best['val_loss']:.4f}, "
                f"val_accuracy {self.best['val_accuracy']:.4f}, val_macro_f1 {self.best['val_macro_f1']:.4f}")


def find_lr(config: TrainConfig, *, plot: str | os.PathLike | None = None, progress: bool = True):
    """The LR range test on ``config``'s model, data and strategy, without training a run (`transferkit lr-find`).

    Returns a :class:`transferkit.train.lr_finder.LRFinding`; ``plot`` writes its PNG. Nothing else is written.
    """
    from transferkit.tracking.runs import Tracker

    run = _Run(config, select_device(config.device), resume=None, recipe=None, progress=progress, folder=False)
    run.tracker = Tracker(None)
    run._build_data()
    if config.head_on_features:
        run._fit_head()
    return run._range_test(plot)


def finetune(config: TrainConfig, *, resume: str | os.PathLike | None = None, recipe: str | None = None,
             progress: bool = True, on_epoch_end: Callable[[int, dict], bool] | None = None,
             features: str | os.PathLike | None = None, allow_data_change: bool = False) -> RunResult:
    """Train ``config`` into a new run folder, or continue the run folder ``resume`` (whose config it is).

    ``on_epoch_end(epoch, row)`` is called after each committed epoch with its metrics.csv row; returning
    True stops the run there, finished like an early stop (a hyper-parameter search prunes trials this way).
    ``features`` is an ``extract`` file of this backbone, weights and data that a linear probe with the
    feature cache reuses instead of running the backbone again (it is recomputed when it does not match).
    Resuming on data that changed since the run started is refused unless ``allow_data_change``.
    """
    device = select_device(config.device)
    with distributed.process_group(device):
        return _Run(config, device, resume=resume, recipe=recipe, progress=progress, on_epoch_end=on_epoch_end,
                    features=features, allow_data_change=allow_data_change).execute()


class _Run:
    def __init__(self, config: TrainConfig, device: torch.device, *, resume, recipe, progress, folder: bool = True,
                 on_epoch_end=None, features=None, allow_data_change: bool = False):
        self.config = config
        self.on_epoch_end = on_epoch_end
        self.features_file = features
        self.device = device
        self.recipe = recipe
        self.progress = progress and distributed.is_main()
        self.amp = config.amp and amp_dtype(device) is not None
        self.state = resume_state.load_state(Path(resume)) if resume is not None else None
        seed_everything(config.seed)
        self.index = self._discover()
        self.fingerprint = self.index.fingerprint()  # stats every file: once per run, not per checkpoint
        self.classes = self.index.classes
        self.model, self.preprocessing = self._load_model()
        preflight.check_strategy(config, self.model)
        preflight.check_augmentation(config, self.preprocessing)
        if self.state is not None:
            change = preflight.check_same_data(Path(resume), self.state["identity"].get("dataset_fingerprint"),
                                               self.index, self.fingerprint, allow_data_change)
            if change:
                self._say(f"warning: resuming on changed data ({change}), as --allow-data-change asks")
        if folder:
            preflight.check_tracking(config)
        self.run_dir = self._run_dir(resume) if folder else None
        self.phases = phases(config)
        self.history: list[dict] = []
        self.best: dict | None = None
        self.summary_epoch: int | None = None  # the epoch whose summary metrics this MLflow run holds
        self.best_extra: dict = {}  # metadata of the best checkpoint beyond its epoch row (calibration, weights)
        self.bad_epochs = 0

    # ------------------------------------------------------------------ setup, all checked before training

    def _discover(self):
        config = self.config
        index = discover(config.data, val_ratio=config.val_ratio, seed=config.seed)
        skipped = preflight.check_images(index, config.bad_images)
        if skipped:
            self._say(f"skipped {len(skipped)} unreadable images (bad_images: skip), e.g. {skipped[0]}")
        preflight.check_layout(config, index, distributed.world_size(), self.device)
        return index

    def _load_model(self):
        config = self.config
        if self.state is not None:
            saved = self.state["identity"]
            if saved["backbone"] != config.backbone or saved["class_names"] != self.classes:
                raise TransferkitError(
                    f"the run to resume trained {saved['backbone']} on classes {saved['class_names']}, but the data "
                    f"has {self.classes}; resume with the same data")
        stated = read_checkpoint_metadata(Path(config.weights)) if config.weights else {}
        if stated.get("kind") == "classifier" and len(stated.get("class_names", [])) != len(self.classes):
            raise TransferkitError(
                f"--weights {config.weights} is a classifier for {len(stated['class_names'])} classes "
                f"({', '.join(stated['class_names'])}) but the data has {len(self.classes)}; "
                "pass the backbone's pretrained weights instead")
        overrides = {"img_size": config.img_size} if config.img_size else None
        model, preprocessing = load_backbone(
            config.backbone, weights=config.weights, num_classes=len(self.classes), pretrained=config.pretrained,
            weights_config=config.weights_config, data_overrides=overrides, resize_mode=config.resize_mode,
        )
        if self.state is not None:
            model.load_state_dict(self.state["model"])
        elif stated.get("kind") != "classifier":  # a transferkit classifier brings its trained head along
            reset_head(model)
        return model, preprocessing

    def _run_dir(self, resume) -> Path:
        if resume is not None:
            run_dir = Path(resume)
            if (run_dir / resume_state.COMPLETE_FILE).exists():
                raise TransferkitError(f"run {run_dir} is already complete; start a new run instead of --resume")
            return run_dir
        from transferkit.tracking.runs import default_run_name

        out = Path(self.config.out).expanduser()
        name, error = self.config.name, None
        if distributed.is_main():
            try:
                name = run_folder.new_run_folder(out, name, default_run_name(
                    self.config.backbone, self.config.strategy.replace(":", "")))
            except TransferkitError as exc:
                error = str(exc)
        name, error = distributed.broadcast_from_main((name, error))  # every rank fails alike, none hangs
        if error:
            raise TransferkitError(error)
        return out / name

    # ------------------------------------------------------------------ the run

    def execute(self) -> RunResult:
        try:
            return self._execute()
        except BaseException as exc:
            if distributed.is_main():
                self._after_failure(exc)
            raise

    def _after_failure(self, exc: BaseException) -> None:
        """Never leave a dead folder: one that no epoch committed is removed; a resumable one says so."""
        if self.state is None and not (self.run_dir / resume_state.STATE_FILE).exists():
            shutil.rmtree(self.run_dir, ignore_errors=True)
            return
        for stray in self.run_dir.rglob(".*.tmp"):  # a signal inside mkstemp leaves a temp file nobody named
            stray.unlink(missing_ok=True)
        if isinstance(exc, (KeyboardInterrupt, TransferkitError)):
            self._say(f"the run stopped; its last completed epoch is kept: continue with "
                      f"`transferkit finetune --resume {self.run_dir}`")

    def _execute(self) -> RunResult:
        from transferkit.tracking.runs import default_experiment_name, run_tags, start_run

        config = self.config
        if distributed.is_main() and self.state is None:
            config.save(self.run_dir / "config.yaml")
            self._write_split()
        with start_run(
            "finetune", enabled=config.track and distributed.is_main(), tracking_uri=config.tracking_uri,
            experiment=config.experiment or default_experiment_name(config.data), run_name=self.run_dir.name,
            tags=run_tags(backbone=config.backbone, strategy=config.strategy,
                          dataset_fingerprint=self.fingerprint, recipe=self.recipe),
            params=config.to_dict(),
        ) as tracker:
            self.tracker = tracker
            self._log_data()
            stopped_early = self._train()
            if config.calibrate:
                self._calibrate()
            model_uri = self._finish(stopped_early, self._best_val_probabilities())
        return RunResult(self.run_dir, self.best["epoch"], self.best, self.history, stopped_early, model_uri)

    def _train(self) -> bool:
        config = self.config
        self._build_data()
        start_epoch = self._restore()
        if config.head_on_features and self.state is None:
            self._fit_head()
        if config.lr == "auto":
            self._auto_lr()
        phase = None
        for epoch in range(start_epoch, config.epochs):
            if phase is None or phase_at(self.phases, epoch) != phase:
                fresh = self.state is None or self.state["phase"] != phase_at(self.phases, epoch).index
                phase = self._start_phase(phase_at(self.phases, epoch), fresh)
            row = self._epoch(epoch, phase)
            improved = self._record(row)
            self._commit(epoch, phase, improved)
            if config.early_stopping and self.bad_epochs >= config.early_stopping:
                self._say(f"early stopping: no {config.monitor} progress for {self.bad_epochs} epochs")
                return True
            if self.on_epoch_end is not None and self.on_epoch_end(epoch + 1, row):
                self._say(f"stopped after epoch {epoch + 1} by the on_epoch_end callback")
                return True
        return False

    def _build_data(self) -> None:
        """Image loaders, or — for a linear probe without train-time augmentation — cached features."""
        from transferkit.data.cache import build_cache
        from transferkit.data.dataset import ImageDataset

        config = self.config
        world = distributed.world_size()
        train, val = self.index.split("train"), self.index.split("val")
        self.train_labels = np.array([s.label for s in train])
        short_side = self.preprocessing.decode_short_side
        cache = build_cache(config.cache, interpolation=self.preprocessing.interpolation)
        eval_transform = self.preprocessing.eval_transform()

        def images(samples, transform):
            return ImageDataset([s.path for s in samples], [s.label for s in samples], transform,
                                min_short_side=short_side, cache=cache)

        self.model = prepare_model(self.model, self.device)
        val_set = images(val, eval_transform)
        self.head_features = None
        if config.uses_feature_cache or (config.head_on_features and self.state is None):
            self.head_features = self._features(images(train, eval_transform), val_set)
        if config.uses_feature_cache:
            train_set, val_set = self.head_features
            self.forward = self.model.get_classifier()
        else:
            if config.parsed_strategy.name == "linear-probe":
                self._say(f"linear probe with aug {config.aug!r}: the frozen backbone runs every epoch "
                          "(leave aug unset for features extracted once)")
            train_set = images(train, self.preprocessing.train_transform(config.aug))
            self.forward = self.model
            if config.sync_bn and world > 1:
                from timm.layers import convert_sync_batchnorm

                self.model = convert_sync_batchnorm(self.model)
                self.forward = self.model
        workers = 0 if config.uses_feature_cache else config.workers
        self.train_loader = loaders.train_loader(
            train_set, self.train_labels, batch_size=config.batch_size // world, seed=config.seed,
            balance=config.balance, workers=workers, device=self.device)
        self.val_loader = loaders.val_loader(val_set, batch_size=max(1, config.batch_size // world),
                                             workers=workers, device=self.device)
        self.n_val = len(val_set)
        self.criterion, self.mixup = self._losses()
        self.ema = None
        if config.ema:
            from transferkit.train.ema import WeightAverage

            self.ema = WeightAverage(self.forward, config.ema_decay, head_only=self.forward is not self.model)

    def _features(self, train_set, val_set):
        """Run the frozen backbone once over train and val; the head then trains on the vectors."""
        from transferkit.features.extract import compute_features

        stored = self._stored_features() if self.features_file is not None else None
        if stored is not None:
            return stored
        started = time.perf_counter()
        sets = []
        for dataset in (train_set, val_set):
            loader = make_loader(dataset, self.config.batch_size, workers=self.config.workers, device=self.device)
            sets.append(loaders.feature_dataset(*compute_features(self.model, loader, self.device, amp=self.amp)))
        self._say(f"features extracted once for the head in {time.perf_counter() - started:.1f} s "
                  f"({len(train_set)} train, {len(val_set)} val images)")
        return sets

    def _stored_features(self):
        """Train and val vectors from ``features_file`` if it holds exactly what :meth:`_features` computes."""
        from transferkit.features.extract import own_pool, read_features, read_metadata
        from transferkit.models.backbones import backbone_identity

        metadata = read_metadata(self.features_file)
        expected = {**backbone_identity(self.model), **self.preprocessing.to_metadata(), "pool": own_pool(self.model),
                    "layer": None, "tta": "none"}
        differ = [key for key, value in expected.items() if json.dumps(metadata.get(key)) != json.dumps(value)]
        if metadata["dataset"]["fingerprint"] != self.fingerprint:
            differ.append("dataset")
        if not differ:
            table, _ = read_features(self.features_file)
            splits = {split: table.subset(split) for split in ("train", "val")}
            if all(list(rows.paths) == [self.index.relpath(s) for s in self.index.split(split)]
                   for split, rows in splits.items()):
                self._say(f"linear probe on the features in {self.features_file}")
                return [loaders.feature_dataset(rows.vectors, rows.label_index) for rows in splits.values()]
            differ.append("split")
        self._say(f"features in {self.features_file} differ from this run's ({', '.join(differ)}); extracting again")
        return None

    def _fit_head(self) -> None:
        """LP-FT: the new head trained to convergence on the cached features before any epoch."""
        from transferkit.train.head_phase import fit_head_on_features

        config = self.config
        head = self.model.get_classifier()
        fit = fit_head_on_features(head, *self.head_features, weight_decay=config.weight_decay,
                                   label_smoothing=config.label_smoothing, seed=config.seed)
        self._say(fit.summary())
        self.tracker.log_metrics({"head_fit_epochs": fit.epochs, "head_fit_val_loss": fit.val_loss,
                                  "head_fit_val_accuracy": fit.val_accuracy, "head_fit_seconds": fit.seconds})
        self._head_candidate(head)
        self.head_features = None

    @torch.inference_mode()
    def _head_candidate(self, head: nn.Module) -> None:
        """The LP-FT model (pretrained body, fitted head) is epoch 0's candidate for the best checkpoint: on a
        small or easy set, unfreezing can lose what the linear probe had, and the run then keeps the probe.
        Scored on the cached val vectors, which are exactly what the model computes on val images."""
        val_x, val_y = self.head_features[1].tensors
        head.eval()
        row = {"epoch": 0, **self._scores(val_y, head(val_x.to(self.device)).float().cpu())}
        self.best, self.bad_epochs = row, 0
        self._say(f"epoch 0 (LP-FT head on the pretrained body): val_loss {row['val_loss']:.4f}  "
                  f"val_accuracy {row['val_accuracy']:.3f}  val_macro_f1 {row['val_macro_f1']:.3f}  *best")
        if distributed.is_main():
            if self.ema is not None:
                self.best_extra["weights"] = "raw"
            self._save_model("best", row, **self.best_extra)
            self._log_summary()

    def _auto_lr(self) -> None:
        """``lr: auto``: the LR range test picks ``lr``, which the saved config then holds (so resume reuses it)."""
        finding = self._range_test(self.run_dir / "lr_find.png" if distributed.is_main() else None)
        self.config.lr = finding.suggestion
        if distributed.is_main():
            self.config.save(self.run_dir / "config.yaml")
            self.tracker.log_metrics({"lr_suggested": finding.suggestion})
            self.tracker.log_artifact(self.run_dir / "lr_find.png")

    def _range_test(self, plot) -> LRFinding:
        """The LR range test on the first phase's parameters, LR ratios and loss; the model is left as it was."""
        from itertools import chain, repeat

        from transferkit.reports.plots import lr_find_png
        from transferkit.train.lr_finder import range_test, restored

        config, phase = self.config, self.phases[0]
        apply_trainable(self.model, phase, config.train_bn)
        optimizer = build_optimizer(self.forward, dataclasses.replace(config, lr=1.0), phase)
        set_train_mode(self.model, config.train_bn, config.frozen_bn_stats)

        def step(batch) -> float:
            images, labels = to_device(batch[0], self.device), batch[1].to(self.device)
            inputs, targets = self.mixup(images, labels) if self.mixup else (images, labels)
            with autocast(self.device, self.amp):
                loss = self.criterion(self.forward(inputs).float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.item()

        with restored(self.model, optimizer):
            finding = range_test(step, optimizer.param_groups, chain.from_iterable(repeat(self.train_loader)))
        if plot is not None:
            lr_find_png(finding.lrs, finding.losses, finding.suggestion, plot)
        self._say(finding.summary())
        return finding

    def _losses(self):
        config = self.config
        if config.mixup or config.cutmix:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy

            mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                          label_smoothing=config.label_smoothing, num_classes=len(self.classes))
            return SoftTargetCrossEntropy(), mixup
        weight = None
        if config.balance == "weights":
            counts = np.bincount(self.train_labels, minlength=len(self.classes))
            weight = torch.tensor(len(self.train_labels) / (len(self.classes) * counts), dtype=torch.float32,
                                  device=self.device)
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing), None

    def _restore(self) -> int:
        """The epoch to start from: 0, or the one after the last committed epoch of the run resumed."""
        if self.state is None:
            return 0
        self.history = list(self.state["history"])
        self.best = dict(self.state["best"])
        self.bad_epochs = int(self.state["bad_epochs"])
        self.best_extra = dict(self.state.get("best_extra", {}))
        if self.ema is not None:
            self.ema.load_state_dict(self.state["ema"])
        resume_state.set_rng_state(self.state["rng"])
        self._say(f"resuming {self.run_dir} after epoch {self.state['epoch'] + 1}")
        return int(self.state["epoch"]) + 1

    def _start_phase(self, phase: Phase, fresh: bool) -> Phase:
        """Freeze/unfreeze for ``phase`` and build its optimizer and schedule (restored when resuming in it)."""
        config = self.config
        trainable = apply_trainable(self.model, phase, config.train_bn)
        module = self.forward
        self.ddp = None
        if distributed.world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(module, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.net = self.ddp or module
        if config.compile and not config.uses_feature_cache:
            self.net = torch.compile(self.net)
        self.optimizer = build_optimizer(module, config, phase)
        self.updates_per_epoch = math.ceil(len(self.train_loader) / config.accum_steps)
        self.schedule = Schedule(self.optimizer, config, phase, self.updates_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp and amp_dtype(self.device) == torch.float16)
        if not fresh:
            self.optimizer.load_state_dict(self.state["optimizer"])
            self.schedule.load_state_dict(self.state["schedule"])
            if self.state["scaler"]:  # empty when saved without fp16 (e.g. a CPU run resumed on a GPU)
                self.scaler.load_state_dict(self.state["scaler"])
        self._say(f"phase {self.phases.index(phase) + 1}/{len(self.phases)}: training {phase.trainable} "
                  f"({trainable:,} parameters), lr {config.lr * phase.lr_scale:g}")
        return phase

    def _epoch(self, epoch: int, phase: Phase) -> dict:
        lr = max(group["lr"] for group in self.optimizer.param_groups)
        started = time.perf_counter()
        train_loss, train_accuracy, seen = self._train_epoch(epoch, phase)
        seconds = time.perf_counter() - started
        val = self._evaluate()
        self.schedule.after_epoch(val["val_loss"])  # the schedule follows the weights that train
        row = {"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_accuracy, **val, "lr": lr,
               "epoch_seconds": round(seconds, 3), "images_per_s": round(seen / seconds, 1)}
        if self.ema is not None:  # the epoch's val scores are those of the better of raw and averaged weights
            averaged = self._evaluate(self.ema.module)
            row["val_weights_ema"] = float(self._better(averaged, val))
            if row["val_weights_ema"]:
                row.update(averaged)
        return row

    def _better(self, a: dict, b: dict) -> bool:
        """Whether val scores ``a`` beat ``b`` on ``monitor`` (by the margin that counts as progress)."""
        key = self.config.monitor
        if key == "val_loss":
            return a[key] < b[key] * (1 - MIN_REL_IMPROVEMENT)
        return a[key] > b[key]

    def _train_epoch(self, epoch: int, phase: Phase) -> tuple[float, float, int]:
        config = self.config
        self.train_loader.sampler.set_epoch(epoch)
        set_train_mode(self.model, config.train_bn, config.frozen_bn_stats)
        updates = (epoch - phase.start_epoch) * self.updates_per_epoch
        totals = [0.0, 0.0, 0.0]  # loss sum, correct, count (this rank)
        steps = len(self.train_loader)
        self.optimizer.zero_grad(set_to_none=True)
        bar = self._bar(epoch, steps)
        for step, (images, labels) in enumerate(self.train_loader):
            images, labels = to_device(images, self.device), labels.to(self.device)
            inputs, targets = self.mixup(images, labels) if self.mixup else (images, labels)
            sync = (step + 1) % config.accum_steps == 0 or step + 1 == steps
            with self.ddp.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext():
                with autocast(self.device, self.amp):
                    logits = self.net(inputs)
                    loss = self.criterion(logits.float(), targets)
                self._stop_if_not_finite(loss, epoch, step)
                self.scaler.scale(loss / config.accum_steps).backward()
            if sync:
                if config.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], config.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                updates += 1
                self.schedule.after_update(updates)
                if self.ema is not None:
                    self.ema.update(self.forward)
            totals[0] += loss.item() * len(labels)
            totals[1] += (logits.argmax(1) == labels).sum().item()
            totals[2] += len(labels)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{totals[0] / totals[2]:.4f}", acc=f"{totals[1] / totals[2]:.3f}",
                                img_s=f"{totals[2] * distributed.world_size() / bar.format_dict['elapsed']:.1f}")
        loss_sum, correct, count = distributed.all_reduce_sum(totals, self.device)
        if bar is not None:
            bar.close()
        return loss_sum / count, correct / count, int(count)

    def _stop_if_not_finite(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        """A NaN/inf loss ends the run before it reaches the weights; the last committed epoch stays resumable.
        Under torchrun every rank learns of it (a sum across ranks), so none waits forever in backward."""
        value = loss.item()
        bad = not math.isfinite(value)
        if distributed.world_size() > 1:
            bad = distributed.all_reduce_sum([float(bad)], self.device)[0] > 0
        if bad:
            raise TransferkitError(
                f"the training loss became {value} at epoch {epoch + 1}, batch {step + 1}; lower --lr, set grad_clip, "
                "or check the data (the last completed epoch's checkpoint is kept)", exit_code=1)

    def _evaluate(self, module: nn.Module | None = None) -> dict:
        """Val loss (plain cross-entropy), accuracy and macro-F1 over the whole val split, on every rank."""
        return self._scores(*self._val_logits(module or self.forward))

    def _scores(self, labels: torch.Tensor, logits: torch.Tensor) -> dict:
        from transferkit.reports.metrics import classification_metrics

        metrics = classification_metrics(labels.numpy(), logits.softmax(1).numpy(), self.classes, topk=(1,))
        return {"val_loss": F.cross_entropy(logits, labels).item(), "val_accuracy": metrics["accuracy"],
                "val_macro_f1": metrics["macro_f1"]}

    @torch.inference_mode()
    def _val_logits(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(labels, logits)`` of the whole val split in order, gathered from every rank."""
        module.eval()
        rows = []
        offset = 0
        shard = distributed.shard_indices(self.n_val)
        for images, labels in self.val_loader:
            with autocast(self.device, self.amp):
                logits = module(to_device(images, self.device)).float().cpu()
            index = torch.tensor(shard[offset:offset + len(labels)], dtype=torch.float32)
            offset += len(labels)
            rows.append(torch.cat([index[:, None], labels[:, None].float(), logits], 1))
        width = len(self.classes) + 2
        mine = torch.cat(rows).numpy() if rows else np.zeros((0, width), np.float32)
        gathered = np.concatenate(distributed.gather_rows(mine, math.ceil(self.n_val / distributed.world_size()),
                                                          width, self.device))
        gathered = gathered[np.argsort(gathered[:, 0], kind="stable")]
        return torch.from_numpy(gathered[:, 1]).long(), torch.from_numpy(np.ascontiguousarray(gathered[:, 2:]))

    def _record(self, row: dict) -> bool:
        """Append ``row`` to the history; True when it is the new best on ``monitor``."""
        self.history.append(row)
        improved = self.best is None or self._better(row, self.best)
        if improved:
            self.best = row
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        self._say(_epoch_line(row, self.config.epochs) + ("  *best" if improved else ""))
        return improved

    def _commit(self, epoch: int, phase: Phase, improved: bool) -> None:
        """Write the epoch's outputs; ``resume.pt`` last, as the commit point."""
        if distributed.is_main():
            self._save_model("last", self.history[-1])
            if improved:
                if self.ema is not None:
                    self.best_extra["weights"] = "ema" if self.best["val_weights_ema"] else "raw"
                model = self.ema.full_model(self.model) if self.best_extra.get("weights") == "ema" else None
                self._save_model("best", self.best, model, **self.best_extra)
            self._write_metrics()
            self._log_epoch(improved)
            resume_state.save_state(self.run_dir, {
                "epoch": epoch, "phase": phase.index,
                "identity": {"backbone": self.config.backbone, "class_names": list(self.classes),
                             "dataset_fingerprint": self.fingerprint},
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": resume_state.rng_state(),
                "history": self.history, "best": self.best, "bad_epochs": self.bad_epochs,
                "best_extra": self.best_extra, "ema": self.ema.state_dict() if self.ema is not None else {},
            })
            run_folder.committed(self.run_dir)
        distributed.barrier()

    def _calibrate(self) -> None:
        """Temperature scaling of the best checkpoint on val, written into its metadata (see :mod:`.calibration`)."""
        from safetensors.torch import load_file

        from transferkit.train.calibration import calibrate

        self.model.load_state_dict(load_file(str(self.run_dir / "best.safetensors"), device=str(self.device)))
        labels, logits = self._val_logits(self.forward)
        fit = calibrate(logits, labels)
        if distributed.is_main():
            self.best_extra["calibration"] = fit.metrics()
            self._save_model("best", self.best, temperature=fit.temperature, **self.best_extra)
            self.tracker.log_metrics(fit.metrics())
        self._say(fit.summary())

    def _log_epoch(self, improved: bool) -> None:
        """The epoch's row as the ``epoch/`` series and, when it is the new best, as the run's summary.

        Logged at step = epoch, the summary's latest value (what the runs table shows and sorts by) is always
        the best checkpoint's, also while training runs and in a run that crashed.
        """
        row = self.history[-1]
        self.tracker.log_metrics({EPOCH_SERIES_PREFIX + k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
        if improved:
            self._log_summary()

    def _log_summary(self) -> None:
        """The best checkpoint's columns under their own names, plus ``best_epoch``, at step = its epoch."""
        epoch = self.best["epoch"]
        self.tracker.log_metrics({**{k: self.best[k] for k in CHECKPOINT_COLUMNS}, "best_epoch": epoch}, step=epoch)
        self.summary_epoch = epoch

    def _best_val_probabilities(self) -> tuple[np.ndarray, np.ndarray]:
        """``(labels, probabilities)`` of the saved best checkpoint (its weights and temperature) on the val
        split, from the per-epoch validation pass itself: the review scores the model the way training did."""
        from safetensors.torch import load_file

        best = self.run_dir / "best.safetensors"
        self.model.load_state_dict(load_file(str(best), device=str(self.device)))
        labels, logits = self._val_logits(self.forward)
        temperature = float(read_checkpoint_metadata(best).get("temperature", 1.0))
        return labels.numpy(), (logits / temperature).softmax(1).numpy()

    def _finish(self, stopped_early: bool, val_probabilities: tuple[np.ndarray, np.ndarray]) -> str | None:
        if not distributed.is_main():
            return None
        from transferkit.reports.plots import training_curves_png

        curves = training_curves_png(self.history, self.run_dir / "curves.png")
        for path in (self.run_dir / "config.yaml", self.run_dir / "metrics.csv", curves):
            self.tracker.log_artifact(path)
        review = self._write_review(*val_probabilities)
        best_epoch = self.best["epoch"]
        if self.summary_epoch != best_epoch:  # a resumed run logs to a new MLflow run that missed its best epoch
            self._log_summary()
        self.tracker.log_metrics({"epochs_run": len(self.history)}, step=best_epoch)
        model_uri = self.tracker.log_model(self.run_dir / "best.safetensors", register=self.config.register)
        summary = {"best_epoch": best_epoch, "epochs_run": len(self.history),
                   **{k: self.best[k] for k in CHECKPOINT_COLUMNS},
                   **{k: v for k, v in review.items() if k.startswith("val_") and k not in CHECKPOINT_COLUMNS
                      and not isinstance(v, (dict, list))}}
        self.tracker.set_description(self._description(summary, stopped_early, model_uri))
        write_json(self.run_dir / resume_state.COMPLETE_FILE, {
            **summary, "stopped_early": stopped_early, "best": self.best, "mlflow_run_id": self.tracker.run_id,
            "model_uri": model_uri, **self.best_extra,
        })
        return model_uri

    def _description(self, summary: dict, stopped_early: bool, model_uri: str | None) -> str:
        """The run page's markdown: what was trained on what, which epoch was kept, its scores, where to look."""
        from transferkit.tracking.summary import run_description

        config, counts = self.config, self.index.counts()
        n_train, n_val = (sum(counts.get(split, {}).values()) for split in ("train", "val"))
        stop = f", stopped early (no `{config.monitor}` progress)" if stopped_early else ""
        facts = [
            f"data: `{self.index.root}`: {n_train} train / {n_val} val images, {len(self.classes)} classes "
            f"(fingerprint `{self.fingerprint[:12]}`)",
            f"best checkpoint (by `{config.monitor}`): epoch {summary['best_epoch']} of {summary['epochs_run']}{stop}",
            "confusion matrix: artifacts `val/confusion_matrix.png` and `val/confusion_matrix_normalized.png`; "
            "per class: `val/per_class.txt`; worst errors: `val/errors.png`",
        ]
        if model_uri:
            facts.append(f"model: `{model_uri}`" + (f", registered as `{config.register}`" if config.register else ""))
        headline = ("val_accuracy", "val_macro_f1", "val_loss", "val_ece")
        return run_description(f"{config.backbone} · {config.strategy} on {Path(self.index.root).name}", facts,
                               {k: summary[k] for k in headline if k in summary})

    def _log_data(self) -> None:
        """The data a run saw, as MLflow inputs and params, so runs are compared on it in the UI alone."""
        self.tracker.log_dataset(self.index, context="training")
        self.tracker.set_description(f"**{self.config.backbone} · {self.config.strategy} on "
                                     f"{Path(self.index.root).name}**: training (summary when the run ends)\n")
        self.tracker.log_params({"data_config": self.preprocessing.data_config, "classes": self.classes,
                                 "counts": self.index.counts()})

    def _write_review(self, labels: np.ndarray, probabilities: np.ndarray) -> dict:
        """What a reviewer judges the run by, in the run folder and in MLflow: the best checkpoint's report on
        the val split it trained with (``val/``, from :meth:`_best_val_probabilities`), the augmentation preview
        and the dataset check."""
        from transferkit.data.check import check_dataset
        from transferkit.reports.plots import augmentation_preview_png
        from transferkit.use.evaluate import score_probabilities

        config = self.config
        val = self.index.split("val")
        folder = ensure_writable_dir(self.run_dir / "val")
        report = score_probabilities(
            [s.path for s in val], labels, probabilities, [""] * len(val), self.classes, split="val", folder=folder,
            info={"model": str(self.run_dir / "best.safetensors"), "best_epoch": self.best["epoch"]})
        # val_accuracy/val_macro_f1 were logged with the best epoch; logged again they would be a second point
        self.tracker.log_evaluation({k: v for k, v in report.items() if k not in CHECKPOINT_COLUMNS},
                                    artifacts_dir=folder, step=self.best["epoch"])
        preview = augmentation_preview_png(self.index, config.aug, self.preprocessing,
                                           self.run_dir / "augment_preview.png", n=16, seed=config.seed)
        check = check_dataset(self.index, min_side=min(self.preprocessing.input_hw))
        write_json(self.run_dir / "data_check.json", check.to_dict())
        for path in (preview, self.run_dir / "data_check.json"):
            self.tracker.log_artifact(path)
        self._say(f"val report of the best epoch ({self.best['epoch']}): accuracy {report['val_accuracy']:.4f}, "
                  f"macro-F1 {report['val_macro_f1']:.4f}, in {folder}")
        return report

    # ------------------------------------------------------------------ outputs

    def _save_model(self, stem: str, row: dict, model: nn.Module | None = None, **extra) -> None:
        """Checkpoint ``stem`` of the epoch ``row``: ``model`` (default: the model training), ``extra`` metadata."""
        metadata = checkpoint_metadata(
            self.model, kind="classifier", class_names=self.classes, preprocessing=self.preprocessing,
            recipe=self.config.to_dict(), split=self.index.records(),
            epoch=row["epoch"], metrics=row, dataset_fingerprint=self.fingerprint, **extra,
        )
        save_checkpoint(self.run_dir / stem, model or self.model, metadata)

    def _write_split(self) -> None:
        with atomic_path(self.run_dir / "split.csv") as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["path", "label", "split"])
            writer.writeheader()
            writer.writerows(self.index.records())

    def _write_metrics(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: row[k] for k in METRIC_COLUMNS} for row in self.history)
        with atomic_path(self.run_dir / "metrics.csv") as tmp:
            tmp.write_text(buffer.getvalue())

    def _bar(self, epoch: int, steps: int):
        """A tqdm bar on a terminal; on a pipe or log file only the per-epoch line is printed."""
        if not (self.progress and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=steps, desc=f"epoch {epoch + 1}/{self.config.epochs}", unit="batch", leave=False)

    def _say(self, line: str) -> None:
        if self.progress:
            print(line, file=sys.stderr, flush=True)


def _epoch_line(row: dict, epochs: int) -> str:
    return (f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}  "
            f"train_accuracy {row['train_accuracy']:.3f}  val_loss {row['val_loss']:.4f}  "
            f"val_accuracy {row['val_accuracy']:.3f}  val_macro_f1 {row['val_macro_f1']:.3f}  "
            f"lr {row['lr']:.2e}  {row['epoch_seconds']:.1f} s  {row['images_per_s']:.1f} img/s"
            + ("  (EMA weights)" if row.get("val_weights_ema") else ""))
