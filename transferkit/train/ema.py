"""Weight EMA: an exponential moving average of the training weights, kept beside them (``ema: true``).

Averaged weights sit in a flatter part of the loss surface and often validate better than the last raw
weights, at the cost of one extra copy of the model and one extra val pass per epoch. timm's ``ModelEmaV3``
does the averaging; its decay warms up from 0 (``1 - (1 + step) ** -2/3``, capped at ``ema_decay``) so a
fine-tuning run of a few hundred updates is not dominated by the pretrained starting point.
"""

from __future__ import annotations

import copy

from timm.utils import ModelEmaV3
from torch import nn


class WeightAverage:
    """The EMA of ``module`` (the model, or the head alone when training on cached features)."""

    def __init__(self, module: nn.Module, decay: float, *, head_only: bool = False):
        self.average = ModelEmaV3(module, decay=decay, use_warmup=True)
        self.head_only = head_only
        self.updates = 0

    @property
    def module(self) -> nn.Module:
        return self.average.module

    def update(self, module: nn.Module) -> None:
        """After each optimizer step."""
        self.updates += 1
        self.average.update(module, step=self.updates)

    def full_model(self, model: nn.Module) -> nn.Module:
        """``model`` with the averaged weights: the average itself, or a copy of ``model`` with its head averaged."""
        if not self.head_only:
            return self.module
        merged = copy.deepcopy(model)
        merged.get_classifier().load_state_dict(self.module.state_dict())
        return merged

    def state_dict(self) -> dict:
        return {"weights": {k: v.detach().cpu() for k, v in self.module.state_dict().items()}, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
