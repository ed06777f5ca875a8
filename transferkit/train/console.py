"""What a finetune run prints: a header before work starts, one line per event on stderr (a tqdm bar on a
terminal) with the whole run's ETA, and the footer of :meth:`transferkit.train.engine.RunResult.summary`.

Only the main process prints (under torchrun every rank runs the same code), and a run started with
``progress=False`` (the sweep's trials, notebooks) prints nothing.
"""

from __future__ import annotations

import sys
import time

from transferkit.core import distributed

MAX_CLASSES_SHOWN = 6  # a split's per-class counts on one line; more classes are summarised as a range
RECIPE_KEYS_SHOWN = 5  # the recipe's own keys in the header (the overrides are all shown)


class Console:
    def __init__(self, progress: bool, epochs: int, task):
        self.enabled = progress and distributed.is_main()
        self.epochs = epochs
        self.task = task
        self.epoch_seconds: list[float] = []  # wall time of each epoch so far (train, validation, commit)
        self._epoch_started: float | None = None

    def say(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stderr, flush=True)

    def block(self, lines) -> None:
        for line in lines:
            self.say(line)

    def bar(self, epoch: int, steps: int):
        """The epoch starts: a tqdm bar on a terminal (on a pipe or log file only the per-epoch line is printed)."""
        self._epoch_started = time.perf_counter()
        if not (self.enabled and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        eta = self.eta(epoch)
        return tqdm(total=steps, desc=f"epoch {epoch + 1}/{self.epochs}" + (f" (run ETA {eta})" if eta else ""),
                    unit="batch", leave=False)

    def eta(self, epochs_done: int) -> str:
        """The rest of the run at the mean epoch time so far ("" before the first epoch); early stopping may end
        it sooner."""
        if not self.epoch_seconds:
            return ""
        return duration(sum(self.epoch_seconds) / len(self.epoch_seconds) * (self.epochs - epochs_done))

    def epoch(self, row: dict, improved: bool) -> None:
        if self._epoch_started is not None:
            self.epoch_seconds.append(time.perf_counter() - self._epoch_started)
        left = self.eta(row["epoch"]) if row["epoch"] < self.epochs else ""
        self.say(f"epoch {row['epoch']}/{self.epochs}  {scores_line(row, ('train_loss', self.task.train_metric))}  "
                 f"{scores_line(row, self.task.checkpoint_columns)}  lr {row['lr']:.2e}  "
                 f"{row['epoch_seconds']:.1f} s  {row['images_per_s']:.1f} img/s"
                 + ("  (EMA weights)" if row.get("val_weights_ema") else "") + ("  *best" if improved else "")
                 + (f"  ETA {left}" if left else ""))


def scores_line(row: dict, keys, sep: str = "  ") -> str:
    """``val_loss 0.1234  val_accuracy 0.951``: losses to 4 decimals, scores to 3."""
    return sep.join(f"{key} {row[key]:.{4 if key.endswith('_loss') else 3}f}" for key in keys)


def duration(seconds: float) -> str:
    """``12.3 s``, ``4 m 12 s``, ``1 h 05 m``: as a person reads a wait."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} m {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} m"


# --------------------------------------------------------------------------- the header


def run_header(run, *, recipe, phases, tracking: list[str]) -> list[str]:
    """One screen, before the first epoch: versions and device, model and where its weights came from, data,
    strategy and phases, recipe and overrides, run folder, and the ``tracking`` lines of the listeners."""
    import torch

    from transferkit import __version__
    from transferkit.models.backbones import weights_source
    from transferkit.train.config import given_settings

    config, setup, index = run.config, run.setup, run.index
    from_recipe, overrides = given_settings(config, recipe)
    total = sum(p.numel() for p in run.model.parameters())
    return [
        f"transferkit {__version__} · torch {torch.__version__} · {_device(run.device, setup.amp)}",
        f"model     {config.backbone} ({total / 1e6:.1f} M parameters), weights: {weights_source(run.model)}",
        f"          input {run.preprocessing.describe()}",
        f"data      {index.root} ({index.layout}, {len(index.classes)} classes): {_counts(index)}",
        f"          val: {_val_origin(index, config)}",
        f"strategy  {config.strategy}: {_phases(config, phases)}",
        "recipe    " + (f"{recipe} ({_settings(from_recipe, RECIPE_KEYS_SHOWN)})" if recipe else "none (built-in defaults)")
        + (f"; overrides: {_settings(overrides)}" if overrides else ""),
        f"run       {run.run_dir}",
        *[f"{'tracking' if i == 0 else '':<10}{line}" for i, line in enumerate(tracking)],
        *([] if tracking else ["tracking  off (--no-track): results only in the run folder"]),
    ]


def _device(device, amp: bool) -> str:
    import torch

    if device.type == "cuda":
        from transferkit.core.runtime import amp_dtype

        precision = f"AMP {str(amp_dtype(device)).removeprefix('torch.')}" if amp else "AMP off (fp32)"
        return f"device {device} ({torch.cuda.get_device_name(device)}), {precision}, channels_last"
    return f"device {device} ({torch.get_num_threads()} threads)"


def _counts(index) -> str:
    """``train 67 (paved 45, unpaved 22) · val 22 (...)``; many classes as their smallest and largest count."""
    parts = []
    for split, per_class in index.counts().items():
        values = list(per_class.values())
        detail = (", ".join(f"{c} {n}" for c, n in per_class.items()) if len(per_class) <= MAX_CLASSES_SHOWN
                  else f"{min(values)}-{max(values)} per class")
        parts.append(f"{split} {sum(values)} ({detail})")
    return " · ".join(parts)


def _val_origin(index, config) -> str:
    if index.val_from_train:
        return (f"carved from train: {config.val_ratio:.0%} of each class, seeded (seed {config.seed}), "
                "the same files on every rerun")
    return "the CSV's split column" if index.layout == "csv" else "its own folder"


def _phases(config, phases) -> str:
    steps = ["LP-FT: the new head fitted on features cached once (epoch 0, a candidate for the best)"] \
        if config.head_on_features else []
    for phase in phases:
        first, last = phase.start_epoch + 1, phase.start_epoch + phase.epochs
        span = f"epoch {first}" if first == last else f"epochs {first}-{last}"
        what = {"head": "the head only", "all": "every layer"}.get(phase.trainable) or \
            f"the last {phase.last_stages} stages and the head"
        lr = config.lr if config.lr == "auto" else f"{config.lr * phase.lr_scale:g}"
        steps.append(f"{span}: {what}, lr {lr}" + (f", layer decay {phase.layer_decay:g}" if phase.layer_decay else ""))
    return "; then ".join(steps)


def _settings(values: dict, shown: int | None = None) -> str:
    """``epochs=3, track=false``, values as a recipe writes them; after ``shown`` keys, how many more."""
    import yaml

    items = [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
             for key, value in values.items()]
    more = len(items) - shown if shown is not None and len(items) > shown else 0
    return ", ".join(items[:len(items) - more]) + (f", … {more} more" if more else "") or "no keys"
