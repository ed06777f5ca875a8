"""The step loop and validation, as functions that receive every collaborator (timm's ``train_one_epoch`` and
``validate``): what a phase trains with is a :class:`PhaseOptimizer`, what the epoch reads is a
:class:`TrainingData`, and the task says what the loss and the scores are.

Under torchrun every rank runs these on its share of each batch; sums and val logits are gathered across
ranks, so every rank returns the same numbers.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from transferkit.core import distributed
from transferkit.core.runtime import amp_dtype, autocast, to_device
from transferkit.errors import TransferkitError
from transferkit.train.optim import Schedule, build_optimizer
from transferkit.train.strategies import Phase, apply_trainable, set_train_mode


@dataclass
class TrainingData:
    """What the epochs read: loaders over images (or cached features) and the loss that scores them."""

    train_loader: object
    val_loader: object
    n_val: int
    train_labels: np.ndarray
    forward: nn.Module  # what a batch goes through: the model, or its head alone on cached features
    criterion: nn.Module
    mixup: object | None  # timm's Mixup/CutMix, or None
    ema: object | None  # a WeightAverage of ``forward``, or None


@dataclass
class PhaseOptimizer:
    """What one training phase updates the weights with."""

    phase: Phase
    net: nn.Module  # ``forward`` as the step calls it (DDP and/or compiled)
    ddp: nn.Module | None
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler
    updates_per_epoch: int

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if state["scaler"]:  # empty when saved without fp16 (e.g. a CPU run resumed on a GPU)
            self.scaler.load_state_dict(state["scaler"])


def start_phase(model: nn.Module, data: TrainingData, phase: Phase, config, device: torch.device,
                amp: bool) -> tuple[PhaseOptimizer, int]:
    """Freeze/unfreeze ``model`` for ``phase`` and build its optimizer and schedule; also returns the number of
    parameters that train."""
    trainable = apply_trainable(model, phase, config.train_bn)
    ddp = None
    if distributed.world_size() > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(data.forward, device_ids=[device] if device.type == "cuda" else None)
    net = ddp or data.forward
    if config.compile and not config.uses_feature_cache:
        net = torch.compile(net)
    optimizer = build_optimizer(data.forward, config, phase)
    updates_per_epoch = math.ceil(len(data.train_loader) / config.accum_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype(device) == torch.float16)
    return PhaseOptimizer(phase, net, ddp, optimizer, Schedule(optimizer, config, phase, updates_per_epoch), scaler,
                          updates_per_epoch), trainable


def train_one_epoch(epoch: int, model: nn.Module, data: TrainingData, opt: PhaseOptimizer, *, config, task,
                    device: torch.device, amp: bool, bar=None) -> tuple[float, float, int]:
    """One pass over the train loader; returns (mean loss, task's train score, images seen) over every rank."""
    data.train_loader.sampler.set_epoch(epoch)
    set_train_mode(model, config.train_bn, config.frozen_bn_stats)
    updates = (epoch - opt.phase.start_epoch) * opt.updates_per_epoch
    totals = [0.0, 0.0, 0.0]  # loss sum, correct, count (this rank)
    steps = len(data.train_loader)
    opt.optimizer.zero_grad(set_to_none=True)
    for step, (images, labels) in enumerate(data.train_loader):
        images, labels = to_device(images, device), labels.to(device)
        inputs, targets = data.mixup(images, labels) if data.mixup else (images, labels)
        sync = (step + 1) % config.accum_steps == 0 or step + 1 == steps
        with opt.ddp.no_sync() if opt.ddp is not None and not sync else contextlib.nullcontext():
            with autocast(device, amp):
                logits = opt.net(inputs)
                loss = data.criterion(logits.float(), targets)
            stop_if_not_finite(loss, epoch, step, device)
            opt.scaler.scale(loss / config.accum_steps).backward()
        if sync:
            _update(model, data, opt, config.grad_clip)
            updates += 1
            opt.schedule.after_update(updates)
        totals[0] += loss.item() * len(labels)
        totals[1] += task.count_correct(logits, labels)
        totals[2] += len(labels)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{totals[0] / totals[2]:.4f}", acc=f"{totals[1] / totals[2]:.3f}",
                            img_s=f"{totals[2] * distributed.world_size() / bar.format_dict['elapsed']:.1f}")
    loss_sum, correct, count = distributed.all_reduce_sum(totals, device)
    return loss_sum / count, correct / count, int(count)


def _update(model: nn.Module, data: TrainingData, opt: PhaseOptimizer, grad_clip: float | None) -> None:
    """One optimizer step from the accumulated gradients (clipped, unscaled under fp16), then the EMA."""
    if grad_clip:
        opt.scaler.unscale_(opt.optimizer)
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.optimizer.zero_grad(set_to_none=True)
    if data.ema is not None:
        data.ema.update(data.forward)


def stop_if_not_finite(loss: torch.Tensor, epoch: int, step: int, device: torch.device) -> None:
    """A NaN/inf loss ends the run before it reaches the weights; the last committed epoch stays resumable.
    Under torchrun every rank learns of it (a sum across ranks), so none waits forever in backward."""
    value = loss.item()
    bad = not math.isfinite(value)
    if distributed.world_size() > 1:
        bad = distributed.all_reduce_sum([float(bad)], device)[0] > 0
    if bad:
        raise TransferkitError(
            f"the training loss became {value} at epoch {epoch + 1}, batch {step + 1}; lower --lr, set grad_clip, "
            "or check the data (the last completed epoch's checkpoint is kept)", exit_code=1)


def validate(module: nn.Module, data: TrainingData, *, task, class_names, device: torch.device, amp: bool) -> dict:
    """The task's val scores of ``module`` over the whole val split, on every rank."""
    return task.val_scores(*val_logits(module, data, num_classes=len(class_names), device=device, amp=amp),
                           class_names)


@torch.inference_mode()
def val_logits(module: nn.Module, data: TrainingData, *, num_classes: int, device: torch.device,
               amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, logits)`` of the whole val split in order, gathered from every rank."""
    module.eval()
    rows = []
    offset = 0
    shard = distributed.shard_indices(data.n_val)
    for images, labels in data.val_loader:
        with autocast(device, amp):
            logits = module(to_device(images, device)).float().cpu()
        index = torch.tensor(shard[offset:offset + len(labels)], dtype=torch.float32)
        offset += len(labels)
        rows.append(torch.cat([index[:, None], labels[:, None].float(), logits], 1))
    width = num_classes + 2
    mine = torch.cat(rows).numpy() if rows else np.zeros((0, width), np.float32)
    gathered = np.concatenate(distributed.gather_rows(mine, math.ceil(data.n_val / distributed.world_size()),
                                                      width, device))
    gathered = gathered[np.argsort(gathered[:, 0], kind="stable")]
    return torch.from_numpy(gathered[:, 1]).long(), torch.from_numpy(np.ascontiguousarray(gathered[:, 2:]))
