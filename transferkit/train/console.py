"""What a finetune run prints: one line per event on stderr, and a tqdm bar on a terminal.

Only the main process prints (under torchrun every rank runs the same code), and a run started with
``progress=False`` (the sweep's trials, notebooks) prints nothing.
"""

from __future__ import annotations

import sys

from transferkit.core import distributed


class Console:
    def __init__(self, progress: bool, epochs: int, task):
        self.enabled = progress and distributed.is_main()
        self.epochs = epochs
        self.task = task

    def say(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stderr, flush=True)

    def bar(self, epoch: int, steps: int):
        """A tqdm bar on a terminal; on a pipe or log file only the per-epoch line is printed."""
        if not (self.enabled and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=steps, desc=f"epoch {epoch + 1}/{self.epochs}", unit="batch", leave=False)

    def epoch(self, row: dict, improved: bool) -> None:
        self.say(f"epoch {row['epoch']}/{self.epochs}  {scores_line(row, ('train_loss', self.task.train_metric))}  "
                 f"{scores_line(row, self.task.checkpoint_columns)}  lr {row['lr']:.2e}  "
                 f"{row['epoch_seconds']:.1f} s  {row['images_per_s']:.1f} img/s"
                 + ("  (EMA weights)" if row.get("val_weights_ema") else "") + ("  *best" if improved else ""))


def scores_line(row: dict, keys) -> str:
    """``val_loss 0.1234  val_accuracy 0.951``: losses to 4 decimals, scores to 3."""
    return "  ".join(f"{key} {row[key]:.{4 if key.endswith('_loss') else 3}f}" for key in keys)
