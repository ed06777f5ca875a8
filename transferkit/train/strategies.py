"""Which parameters train, in which phase, and how frozen BatchNorm behaves.

A strategy is a list of phases; each phase says which layer groups train and the LR scale. Layer groups
are timm's own coarse grouping of a model (stem, each stage, head), so ``partial:N`` means the same thing
for every backbone timm knows. Frozen parts keep BatchNorm in inference mode: a frozen layer was trained
with its running statistics, and updating them from a few small batches of new data silently shifts the
features the head sees (Keras' fine-tuning guide gives the same advice). ``train_bn`` lets them adapt.
"""

from __future__ import annotations

from dataclasses import dataclass

from timm.models import group_parameters
from torch import nn

from transferkit.models.backbones import classifier_prefixes
from transferkit.train.config import TrainConfig


@dataclass(frozen=True)
class Phase:
    index: int
    start_epoch: int
    epochs: int
    trainable: str  # "head", "all" or "last:N"
    lr_scale: float = 1.0
    layer_decay: float | None = None

    @property
    def last_stages(self) -> int:
        """N of ``last:N``."""
        return int(self.trainable.partition(":")[2])


def phases(config: TrainConfig) -> list[Phase]:
    """The epochs of ``config`` as phases. Every strategy takes any ``epochs`` >= 1: freeze-unfreeze's head
    phase is fitted on cached features before epoch 1 (LP-FT, see :mod:`.head_phase`) unless ``freeze_epochs``
    asks for head-only epochs over the images, which config validation keeps below ``epochs``."""
    strategy = config.parsed_strategy
    if strategy.name == "linear-probe":
        return [Phase(0, 0, config.epochs, "head")]
    if strategy.name == "full":
        return [Phase(0, 0, config.epochs, "all")]
    if strategy.name == "discriminative":
        return [Phase(0, 0, config.epochs, "all", layer_decay=config.layer_decay)]
    if strategy.name == "partial":
        return [Phase(0, 0, config.epochs, f"last:{strategy.stages}")]
    # freeze-unfreeze, fastai's fine_tune: the head alone, then everything with discriminative LRs
    k = config.freeze_epochs
    unfrozen = Phase(1, k, config.epochs - k, "all", lr_scale=config.unfreeze_lr_scale, layer_decay=config.layer_decay)
    return [Phase(0, 0, k, "head"), unfrozen] if k else [unfrozen]


def phase_at(all_phases: list[Phase], epoch: int) -> Phase:
    return [p for p in all_phases if p.start_epoch <= epoch][-1]


def stage_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names per layer group, stem first, classifier excluded."""
    groups = group_parameters(model, model.group_matcher(coarse=True))
    heads = classifier_prefixes(model)
    result = []
    for names in groups.values():
        body = [n for n in names if not _in(n, heads)]
        if body:
            result.append(body)
    return result


def apply_trainable(model: nn.Module, phase: Phase, train_bn: bool) -> int:
    """Set ``requires_grad`` for ``phase``; returns the number of trainable parameters."""
    heads = classifier_prefixes(model)
    if phase.trainable == "all":
        chosen = {n for n, _ in model.named_parameters()}
    else:
        chosen = {n for n, _ in model.named_parameters() if _in(n, heads)}
        if phase.trainable.startswith("last:"):
            stages = stage_groups(model)
            for names in stages[-phase.last_stages:]:
                chosen.update(names)
    if train_bn:
        chosen.update(f"{m}.{p}" for m, module in model.named_modules() if _is_bn(module)
                      for p, _ in module.named_parameters(recurse=False))
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def set_train_mode(model: nn.Module, train_bn: bool, frozen_stats: bool = False) -> None:
    """``model.train()``, except BatchNorm layers whose parameters are frozen stay in eval mode, and every
    BatchNorm layer with ``frozen_stats`` (its affine weights still train; its running statistics stay)."""
    model.train()
    for module in model.modules():
        if not _is_bn(module):
            continue
        trains = train_bn or any(p.requires_grad for p in module.parameters(recurse=False))
        if frozen_stats or not trains:
            module.eval()


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def _in(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def reset_head(model: nn.Module) -> None:
    """Small initial weights for the new linear head (as in MAE / DINO linear probes).

    timm initialises some heads for training from scratch (EfficientNet: uniform ±1/sqrt(num_classes)),
    which on pretrained features gives logits around ±10 and a loss of ~10 the first epochs only undo.
    """
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        nn.init.trunc_normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
