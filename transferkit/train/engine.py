"""The finetune run: one run folder, epochs in phases, a commit point after every epoch.

Run folder ``runs/<name>/``: ``config.yaml`` (resolved), ``split.csv``, ``metrics.csv``, ``best.*`` and
``last.*`` (transferkit classifier checkpoints, loadable by :func:`transferkit.models.predictors.load_predictor`),
``curves.png``, ``resume.pt`` (see :mod:`.resume_state`), the review of the finished run (:mod:`.review`) and,
written last, ``result.json``: a folder without it is an unfinished run, to be continued with ``--resume``.

The parts: :mod:`.setup` (data, model, loaders), :mod:`.loop` (the step loop and validation),
:mod:`.checkpoints` (best/last, commit, resume state), :mod:`.head_phase` (LP-FT), :mod:`.review`,
:mod:`.console`, and listeners on named events (:mod:`.callbacks`) — MLflow among them
(:mod:`transferkit.tracking.training_callback`), attached when the config tracks.

Under torchrun every rank runs this same code on its share of each batch (DistributedDataParallel);
metrics are reduced across ranks and only rank 0 writes files, prints and calls the listeners.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from transferkit.core import distributed
from transferkit.core.fileio import write_json
from transferkit.core.runtime import seed_everything, select_device
from transferkit.errors import TransferkitError
from transferkit.tasks import get_task
from transferkit.train import head_phase, loop, preflight, resume_state, run_folder
from transferkit.train.callbacks import Callback, CallbackList
from transferkit.train.checkpoints import CheckpointSaver
from transferkit.train.config import TrainConfig
from transferkit.train.console import Console, duration, run_header, scores_line
from transferkit.train.lr_finder import LRFinding, range_test_run
from transferkit.train.setup import build_training_data, setup_run
from transferkit.train.strategies import Phase, phase_at, phases

# result.json keys a tracking listener fills in; None when the run was not tracked
TRACKING_RESULT_KEYS = ("mlflow_run_id", "model_uri")


@dataclass
class RunResult:
    run_dir: Path
    best_epoch: int
    best: dict  # the metrics.csv row of the best epoch
    history: list[dict] = field(default_factory=list)  # the epochs run (metrics.csv adds LP-FT's epoch 0)
    stopped_early: bool = False
    model_uri: str | None = None  # MLflow model URI when tracked
    seconds: float = 0.0  # the whole run, setup included
    next_steps: list[str] = field(default_factory=list)  # the footer's commands and links

    def summary(self) -> str:
        """The footer: how long, which epoch was kept and where, then what to run next."""
        epochs = f"{len(self.history)} epoch{'s' * (len(self.history) != 1)}" + (" (stopped early)" * self.stopped_early)
        return "\n".join([f"{epochs} in {duration(self.seconds)}; best epoch {self.best_epoch} "
                          f"({scores_line(self.best, get_task().checkpoint_columns, ', ')}), saved to {self.run_dir}",
                          *(["next:", *(f"  {line}" for line in self.next_steps)] if self.next_steps else [])])


def find_lr(config: TrainConfig, *, plot: str | os.PathLike | None = None, progress: bool = True) -> LRFinding:
    """The LR range test on ``config``'s model, data and strategy, without training a run (`transferkit lr-find`).

    ``plot`` writes its PNG. Nothing else is written.
    """
    device = select_device(config.device)
    console = Console(progress, config.epochs, get_task())
    seed_everything(config.seed)
    setup = setup_run(config, device, task=console.task, state=None, say=console.say)
    data, features = build_training_data(setup, head_features=config.head_on_features, features_file=None,
                                         say=console.say)
    if features is not None:
        head = setup.model.get_classifier()
        console.say(_fit_head(head, features, setup).summary())
    return _range_test(setup, data, phases(config)[0], plot, console)


def finetune(config: TrainConfig, *, resume: str | os.PathLike | None = None, recipe: str | None = None,
             progress: bool = True, callbacks: Sequence[Callback] = (), features: str | os.PathLike | None = None,
             allow_data_change: bool = False) -> RunResult:
    """Train ``config`` into a new run folder, or continue the run folder ``resume`` (whose config it is).

    ``callbacks`` listen to the run's events (:class:`transferkit.train.callbacks.Callback`); MLflow's is added
    when ``config.track``. One whose ``on_epoch_end`` returns True stops the run there, finished like an early
    stop (a hyper-parameter search prunes trials this way). ``features`` is an ``extract`` file of this
    backbone, weights and data that a linear probe with the feature cache reuses instead of running the
    backbone again (it is recomputed when it does not match). Resuming on data that changed since the run
    started is refused unless ``allow_data_change``.
    """
    device = select_device(config.device)
    with distributed.process_group(device):
        trainer = Trainer(config, device, resume=resume, progress=progress, features=features,
                          allow_data_change=allow_data_change)
        listeners = [*callbacks, *_tracking_callbacks(config, recipe)] if distributed.is_main() else []
        return trainer.execute(CallbackList(listeners), recipe)


def _tracking_callbacks(config: TrainConfig, recipe: str | None) -> list[Callback]:
    if not config.track:
        return []
    from transferkit.tracking.training_callback import MLflowCallback

    return [MLflowCallback(recipe)]


class Trainer:
    """One finetune run: set up and checked on construction, trained by :meth:`execute`."""

    def __init__(self, config: TrainConfig, device: torch.device, *, resume=None, progress: bool = True,
                 features=None, allow_data_change: bool = False):
        self.started = time.perf_counter()
        self.config = config
        self.device = device
        self.task = get_task()
        self.console = Console(progress, config.epochs, self.task)
        self.features_file = features
        self.state = resume_state.load_state(Path(resume)) if resume is not None else None
        seed_everything(config.seed)
        self.setup = setup_run(config, device, task=self.task, state=self.state, say=self.console.say)
        self.index, self.fingerprint = self.setup.index, self.setup.fingerprint
        self.preprocessing = self.setup.preprocessing
        if self.state is not None:
            change = preflight.check_same_data(Path(resume), self.state["identity"].get("dataset_fingerprint"),
                                               self.index, self.fingerprint, allow_data_change)
            if change:
                self.console.say(f"warning: resuming on changed data ({change}), as --allow-data-change asks")
        self.data_check = self._check_data()
        preflight.check_tracking(config)
        self.run_dir = self._run_dir(resume)
        self.checkpoints = CheckpointSaver(self.run_dir, task=self.task, monitor=config.monitor, metadata=dict(
            kind="classifier", class_names=self.index.classes, preprocessing=self.preprocessing,
            recipe=config.to_dict(), split=self.index.records(), dataset_fingerprint=self.fingerprint))
        self.review = None  # the review of the finished run (:class:`transferkit.train.review.Review`)

    @property
    def model(self) -> torch.nn.Module:
        return self.setup.model

    def _check_data(self):
        """`transferkit data check` of the run's data, shown before training; the same image in train and in
        val/test stops the run unless ``allow_leakage``, since every val score after it would be inflated."""
        from transferkit.data.check import check_dataset, leaked

        self.console.say(f"checking the data: decoding and hashing {len(self.index.samples)} images "
                         "(duplicates, leakage, sizes) …")
        started = time.perf_counter()
        check = check_dataset(self.index, min_side=min(self.preprocessing.input_hw))
        found = f"{len(check.errors)} errors, {len(check.warnings)} warnings" if check.errors or check.warnings \
            else "clean"
        self.console.say(f"data check: {found} ({duration(time.perf_counter() - started)}; data_check.json in the run)")
        self.console.block([f"data check: ERROR {line}" for line in check.errors]
                           + [f"data check: warning {line}" for line in check.warnings])
        groups = leaked(check)
        if groups:
            example = " = ".join(f"{f['split']}/{f['path']}" for f in groups[0]["files"][:2])
            if not self.config.allow_leakage:
                raise TransferkitError(
                    f"{len(groups)} image{' is' if len(groups) == 1 else 's are'} in train and also in val/test "
                    f"(e.g. {example}), so every val score "
                    f"would be inflated; remove the copies (`transferkit data check {self.config.data}` lists them) "
                    "or pass --allow-leakage to train anyway")
            self.console.say(f"warning: training on {len(groups)} images that are also in val/test "
                             "(--allow-leakage): val scores are inflated")
        return check

    def _run_dir(self, resume) -> Path:
        if resume is not None:
            run_dir = Path(resume)
            if (run_dir / resume_state.COMPLETE_FILE).exists():
                raise TransferkitError(f"run {run_dir} is already complete; start a new run instead of --resume")
            return run_dir
        from transferkit.tracking.naming import default_run_name

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

    def execute(self, callbacks: CallbackList, recipe: str | None = None) -> RunResult:
        """Train, calibrate, review; ``recipe`` (the file or name the config came from) is named in the header."""
        self.callbacks, self.recipe = callbacks, recipe
        try:
            if distributed.is_main() and self.state is None:
                self.config.save(self.run_dir / "config.yaml")
                self.checkpoints.write_split(self.index.records())
            callbacks.on_run_start(self)
            self.console.block(run_header(self, recipe=self.recipe, phases=phases(self.config),
                                          tracking=callbacks.describe(self)))
            stopped_early = self._train()
            if self.config.calibrate:
                self._calibrate()
            return self._finish(stopped_early)
        except BaseException as exc:
            try:
                callbacks.on_failure(self, exc)
            finally:
                self._after_failure(exc)
            raise

    def _after_failure(self, exc: BaseException) -> None:
        """Never leave a dead folder: one that no epoch committed is removed; a resumable one says so."""
        if not distributed.is_main():
            return
        if self.state is None and not (self.run_dir / resume_state.STATE_FILE).exists():
            shutil.rmtree(self.run_dir, ignore_errors=True)
            return
        for stray in self.run_dir.rglob(".*.tmp"):  # a signal inside mkstemp leaves a temp file nobody named
            stray.unlink(missing_ok=True)
        if isinstance(exc, (KeyboardInterrupt, TransferkitError)):
            self.console.say(f"the run stopped; its last completed epoch is kept: continue with "
                             f"`transferkit finetune --resume {self.run_dir}`")

    def _train(self) -> bool:
        config = self.config
        if config.uses_feature_cache or (config.head_on_features and self.state is None):
            self.console.say(f"extracting the backbone's features of {len(self.index.split('train'))} train and "
                             f"{len(self.index.split('val'))} val images once, for the head …")
        self.data, features = build_training_data(
            self.setup, head_features=config.head_on_features and self.state is None,
            features_file=self.features_file, say=self.console.say)
        start_epoch = self._restore()
        if features is not None:
            self._lp_ft_head(features)
            del features  # the head is fitted: free the vectors before the epochs
        if config.lr == "auto":
            self._auto_lr()
        all_phases, opt = phases(config), None
        for epoch in range(start_epoch, config.epochs):
            phase = phase_at(all_phases, epoch)
            if opt is None or opt.phase != phase:
                opt = self._start_phase(phase, all_phases)
            row = self._epoch(epoch, opt)
            improved = self.checkpoints.record(row)
            self.console.epoch(row, improved)
            self.checkpoints.commit(self.model, self.data.ema, improved, {
                "epoch": epoch, "phase": phase.index, **opt.state_dict(),
                "identity": {"backbone": config.backbone, "class_names": list(self.index.classes),
                             "dataset_fingerprint": self.fingerprint},
                "rng": resume_state.rng_state()})
            if improved:
                self.callbacks.on_best_checkpoint(self, row)
            stop = self.callbacks.on_epoch_end(self, row, improved)
            if config.early_stopping and self.checkpoints.bad_epochs >= config.early_stopping:
                self.console.say(f"early stopping: no {config.monitor} progress for {self.checkpoints.bad_epochs} "
                                 "epochs")
                return True
            if stop:
                self.console.say(f"stopped after epoch {epoch + 1} by a callback")
                return True
        return False

    def _restore(self) -> int:
        """The epoch to start from: 0, or the one after the last committed epoch of the run resumed."""
        if self.state is None:
            return 0
        self.checkpoints.restore(self.state)
        if self.data.ema is not None:
            self.data.ema.load_state_dict(self.state["ema"])
        resume_state.set_rng_state(self.state["rng"])
        self.console.say(f"resuming {self.run_dir} after epoch {self.state['epoch'] + 1}")
        return int(self.state["epoch"]) + 1

    def _lp_ft_head(self, features) -> None:
        """LP-FT: the new head trained to convergence on the cached features before any epoch; the probe
        (pretrained body, fitted head) is then epoch 0's candidate for the best checkpoint — on a small or easy
        set, unfreezing can lose what the linear probe had, and the run then keeps the probe."""
        head = self.model.get_classifier()
        fit = _fit_head(head, features, self.setup)
        self.console.say(fit.summary())
        self.callbacks.on_measurement(self, {"head_fit_epochs": fit.epochs, "head_fit_val_loss": fit.val_loss,
                                             "head_fit_val_accuracy": fit.val_accuracy,
                                             "head_fit_seconds": fit.seconds})
        row = head_phase.probe_row(head, features[1], task=self.task, class_names=self.index.classes,
                                   device=self.device)
        if self.data.ema is not None:
            self.checkpoints.best_extra["weights"] = "raw"
        self.checkpoints.propose(row, self.model)
        self.console.say(f"epoch 0 (LP-FT head on the pretrained body): "
                         f"{scores_line(row, self.task.checkpoint_columns)}  *best")
        self.callbacks.on_best_checkpoint(self, row)

    def _auto_lr(self) -> None:
        """``lr: auto``: the LR range test picks ``lr``, which the saved config then holds (so resume reuses it)."""
        plot = self.run_dir / "lr_find.png" if distributed.is_main() else None
        finding = _range_test(self.setup, self.data, phases(self.config)[0], plot, self.console)
        self.config = self.setup.config = dataclasses.replace(self.config, lr=finding.suggestion)
        if distributed.is_main():
            self.config.save(self.run_dir / "config.yaml")
        self.callbacks.on_measurement(self, {"lr_suggested": finding.suggestion}, plot)

    def _start_phase(self, phase: Phase, all_phases: list[Phase]) -> loop.PhaseOptimizer:
        """The phase's optimizer and schedule, restored when the run resumes inside this phase."""
        opt, trainable = loop.start_phase(self.model, self.data, phase, self.config, self.device, self.setup.amp)
        if self.state is not None and self.state["phase"] == phase.index:
            opt.load_state_dict(self.state)
        self.console.say(f"phase {all_phases.index(phase) + 1}/{len(all_phases)}: training {phase.trainable} "
                         f"({trainable:,} parameters), lr {self.config.lr * phase.lr_scale:g}")
        return opt

    def _epoch(self, epoch: int, opt: loop.PhaseOptimizer) -> dict:
        lr = max(group["lr"] for group in opt.optimizer.param_groups)
        started = time.perf_counter()
        bar = self.console.bar(epoch, len(self.data.train_loader))
        train_loss, train_score, seen = loop.train_one_epoch(
            epoch, self.model, self.data, opt, config=self.config, task=self.task, device=self.device,
            amp=self.setup.amp, bar=bar)
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - started
        val = self._validate(self.data.forward)
        opt.schedule.after_epoch(val["val_loss"])  # the schedule follows the weights that train
        row = {"epoch": epoch + 1, "train_loss": train_loss, self.task.train_metric: train_score, **val, "lr": lr,
               "epoch_seconds": round(seconds, 3), "images_per_s": round(seen / seconds, 1)}
        if self.data.ema is not None:  # the epoch's val scores are those of the better of raw and averaged weights
            averaged = self._validate(self.data.ema.module)
            row["val_weights_ema"] = float(self.task.better(averaged, val, self.config.monitor))
            if row["val_weights_ema"]:
                row.update(averaged)
        return row

    def _validate(self, module: torch.nn.Module) -> dict:
        return loop.validate(module, self.data, task=self.task, class_names=self.index.classes, device=self.device,
                             amp=self.setup.amp)

    def _best_val_logits(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(labels, logits, temperature)`` of the saved best checkpoint on the val split, from the per-epoch
        validation pass itself: calibration and the review see the model the way training did."""
        temperature = self.checkpoints.load_best(self.model, self.device)
        labels, logits = loop.val_logits(self.data.forward, self.data, num_classes=len(self.index.classes),
                                         device=self.device, amp=self.setup.amp)
        return labels, logits, temperature

    def _calibrate(self) -> None:
        """Temperature scaling of the best checkpoint on val, written into its metadata."""
        labels, logits, _ = self._best_val_logits()
        fit = self.task.calibrate(logits, labels)
        self.checkpoints.best_extra["calibration"] = fit.metrics()
        if distributed.is_main():
            self.checkpoints.add_to_best(self.model, temperature=fit.temperature)
        self.callbacks.on_measurement(self, fit.metrics())
        self.console.say(fit.summary())

    def _finish(self, stopped_early: bool) -> RunResult:
        from transferkit.reports.plots import training_curves_png
        from transferkit.train.review import write_review

        labels, logits, temperature = self._best_val_logits()
        checkpoints, best = self.checkpoints, self.checkpoints.best
        result = RunResult(self.run_dir, best["epoch"], best, checkpoints.history, stopped_early)
        if not distributed.is_main():
            return result
        self.console.say(f"writing the review of epoch {best['epoch']}: curves, val report, augmentation preview …")
        training_curves_png(checkpoints.table, self.run_dir / "curves.png", best_epoch=best["epoch"],
                            title=f"{self.config.backbone} · {self.config.strategy} on {Path(self.index.root).name}: "
                                  f"train and val per epoch")
        probabilities = self.task.probabilities(logits, temperature).numpy()
        self.review = write_review(self.run_dir, self.index, labels.numpy(), probabilities, best_epoch=best["epoch"],
                                   preprocessing=self.preprocessing, aug=self.config.aug, seed=self.config.seed,
                                   check=self.data_check)
        report = self.review.report
        self.console.say(f"val report of the best epoch ({best['epoch']}): accuracy {report['val_accuracy']:.4f}, "
                         f"macro-F1 {report['val_macro_f1']:.4f}, in {self.review.folder}")
        columns = self.task.checkpoint_columns
        summary = {"best_epoch": best["epoch"], "epochs_run": len(checkpoints.history),
                   **{k: best[k] for k in columns},
                   **{k: v for k, v in report.items() if k.startswith("val_") and k not in columns
                      and not isinstance(v, (dict, list))}, "stopped_early": stopped_early}
        if self.callbacks.describe(self):  # a listener that tracks the run: logging the model takes a while
            self.console.say("logging the model, metrics and review to the tracking store …")
        tracked = {**dict.fromkeys(TRACKING_RESULT_KEYS), **self.callbacks.on_run_end(self, summary)}
        write_json(self.run_dir / resume_state.COMPLETE_FILE,
                   {**summary, "best": best, **tracked, **checkpoints.best_extra})
        result.model_uri = tracked["model_uri"]
        result.seconds = time.perf_counter() - self.started
        result.next_steps = self._next_steps()
        return result

    def _next_steps(self) -> list[str]:
        """The footer's commands: evaluate on held-out images, predict, and the run in the dashboard."""
        run, data = self.run_dir, self.config.data
        held_out = (f"--data {data} --split test" if self.index.split("test")
                    else f"--data HELD_OUT_IMAGES   # images the run never saw ({data} has no test split)")
        example = self.index.split("val")[0].path
        return [f"transferkit evaluate --model {run} {held_out}",
                f"transferkit predict --model {run} {example}",
                *self.callbacks.describe(self)]


def _fit_head(head: torch.nn.Module, features, setup) -> head_phase.HeadFit:
    config = setup.config
    return head_phase.fit_head_on_features(head, *features, task=setup.task, weight_decay=config.weight_decay,
                                           label_smoothing=config.label_smoothing, seed=config.seed)


def _range_test(setup, data, phase: Phase, plot, console: Console) -> LRFinding:
    """The LR range test of the run's first phase, its PNG written to ``plot`` (None: no plot)."""
    from transferkit.reports.plots import lr_find_png

    finding = range_test_run(setup.model, data, phase, config=setup.config, device=setup.device, amp=setup.amp)
    if plot is not None:
        lr_find_png(finding.lrs, finding.losses, finding.suggestion, plot)
    console.say(finding.summary())
    return finding

