"""Optimizer and LR schedule for one training phase.

Optimizers come from timm's factory (AdamW or SGD with momentum, no weight decay on biases and norms,
layer-wise LR decay for the discriminative strategy). Schedules: timm's cosine with linear warmup, stepped
every update; or torch's ReduceLROnPlateau (÷10 when val loss stalls, as in the seed decks). timm's own
plateau scheduler is not used because it does not checkpoint its patience state, which breaks resume.
"""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from transferkit.train.config import TrainConfig
from transferkit.train.strategies import Phase


def build_optimizer(module: nn.Module, config: TrainConfig, phase: Phase) -> torch.optim.Optimizer:
    """Only parameters with ``requires_grad`` are optimised (timm's param groups skip the rest).

    timm leaves layer decay as an ``lr_scale`` per group for its own schedulers to apply; it is folded
    into each group's LR here so every schedule (and the first step) sees the decayed LRs.
    """
    optimizer = create_optimizer_v2(
        module,
        opt=config.optimizer,
        lr=config.lr * phase.lr_scale,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        layer_decay=phase.layer_decay,
    )
    for group in optimizer.param_groups:
        group["lr"] *= group.pop("lr_scale", 1.0)
    return optimizer


class Schedule:
    """One interface for both kinds: ``after_update`` per optimizer step, ``after_epoch`` per epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: TrainConfig, phase: Phase, updates_per_epoch: int):
        self.kind = config.scheduler
        self.scheduler = None
        if self.kind == "cosine":
            self.scheduler, _ = create_scheduler_v2(
                optimizer, "cosine", num_epochs=phase.epochs, warmup_epochs=min(config.warmup_epochs, phase.epochs - 1),
                warmup_lr=config.lr * phase.lr_scale * 0.01, min_lr=config.min_lr,
                step_on_epochs=False, updates_per_epoch=updates_per_epoch,
            )
        elif self.kind == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=0.1, patience=config.plateau_patience, min_lr=config.min_lr,
            )

    def after_update(self, num_updates: int) -> None:
        if self.kind == "cosine":
            self.scheduler.step_update(num_updates)

    def after_epoch(self, val_loss: float) -> None:
        if self.kind == "plateau":
            self.scheduler.step(val_loss)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)
