"""The LR range test (Smith, "Cyclical Learning Rates", 2017; fastai's ``lr_find``): ``lr: auto``, `transferkit lr-find`.

The learning rate grows exponentially from ``START_LR`` to ``END_LR`` over at most ``MAX_STEPS`` updates of the
run's own model, data and strategy (the parameters and per-group LR ratios of its first training phase), and
the smoothed training loss is recorded at each step until it diverges. The suggestion is the LR of the
steepest descent of the smoothed loss, capped at a tenth of the LR of its minimum — fastai's ``steep`` and
``minimum/10`` rules, whichever is smaller. Model and optimizer are restored afterwards: the test changes
nothing but the LR the run then trains with.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from itertools import chain, repeat

import numpy as np
import torch

from transferkit.core.runtime import autocast, to_device
from transferkit.train.optim import build_optimizer
from transferkit.train.strategies import apply_trainable, set_train_mode

START_LR = 1e-7
END_LR = 10.0
MAX_STEPS = 100
SMOOTHING = 0.98  # exponential moving average of the loss, debiased as in fastai
DIVERGENCE = 4.0  # stop once the smoothed loss exceeds the best by this factor


@dataclass
class LRFinding:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # smoothed
    suggestion: float = float("nan")

    def summary(self) -> str:
        return f"LR range test: {len(self.lrs)} steps, suggested lr {self.suggestion:.2e}"


def range_test(step, param_groups: list[dict], batches, *, steps: int = MAX_STEPS) -> LRFinding:
    """Run ``step(batch) -> loss`` over ``batches`` with an exponentially growing LR multiplier.

    ``param_groups`` are the optimizer's groups, built for lr = 1 so their ``lr`` holds each group's ratio.
    """
    ratios = [group["lr"] for group in param_groups]
    gamma = (END_LR / START_LR) ** (1 / max(1, steps - 1))
    finding, average, best = LRFinding(), 0.0, math.inf
    for i, batch in enumerate(batches):
        if i >= steps:
            break
        lr = START_LR * gamma ** i
        for group, ratio in zip(param_groups, ratios):
            group["lr"] = lr * ratio
        loss = step(batch)
        if not math.isfinite(loss):
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        smoothed = average / (1 - SMOOTHING ** (i + 1))
        finding.lrs.append(lr)
        finding.losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > DIVERGENCE * best:
            break
    finding.suggestion = suggest(finding.lrs, finding.losses)
    return finding


def range_test_run(model: torch.nn.Module, data, phase, *, config, device: torch.device, amp: bool) -> LRFinding:
    """The range test on a run's ``model`` and :class:`~transferkit.train.loop.TrainingData`, over the
    parameters, LR ratios and loss of its first ``phase``; the model is left as it was."""
    apply_trainable(model, phase, config.train_bn)
    optimizer = build_optimizer(data.forward, dataclasses.replace(config, lr=1.0), phase)
    set_train_mode(model, config.train_bn, config.frozen_bn_stats)

    def step(batch) -> float:
        images, labels = to_device(batch[0], device), batch[1].to(device)
        inputs, targets = data.mixup(images, labels) if data.mixup else (images, labels)
        with autocast(device, amp):
            loss = data.criterion(data.forward(inputs).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    with restored(model, optimizer):
        return range_test(step, optimizer.param_groups, chain.from_iterable(repeat(data.train_loader)))


def suggest(lrs: list[float], losses: list[float]) -> float:
    """min(LR of the steepest descent, LR of the minimum / 10); finite whenever one point was recorded."""
    if not lrs:
        return START_LR
    values = np.asarray(losses)
    end = int(values.argmin())
    minimum = lrs[end] / 10
    if end < 2:
        return minimum
    slopes = np.gradient(values[:end + 1], np.log10(lrs[:end + 1]))
    return float(min(lrs[int(slopes.argmin())], minimum))


class restored:
    """Context manager: the model's and optimizer's state are put back on exit."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def __enter__(self):
        self.saved = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.optimizer.state_dict()))
        return self

    def __exit__(self, *exc):
        self.model.load_state_dict(self.saved[0])
        self.optimizer.load_state_dict(self.saved[1])
        return False
