"""LP-FT's head phase: fit the new linear head on features cached once, before the body unfreezes.

Fine-tuning a pretrained body under a random head distorts the features in the first updates, while the head
is still wrong (Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution", ICLR 2022). Training the head first is fastai's ``fine_tune`` too, but an epoch over the
images with a frozen body spends nearly all its time in the backbone to train a few thousand parameters. Here
the backbone runs once over train and val (no augmentation), and the head trains on those vectors to
convergence with its own early stopping on val loss: many epochs in seconds, costing none of ``epochs``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

HEAD_LR = 1e-2  # a linear head on fixed features tolerates (and needs) a larger LR than the body
HEAD_BATCH = 64
MAX_HEAD_EPOCHS = 200
HEAD_PATIENCE = 10  # epochs without a better val loss before the head phase stops


@dataclass
class HeadFit:
    epochs: int
    best_epoch: int
    val_loss: float
    val_accuracy: float
    seconds: float

    def summary(self) -> str:
        return (f"head fitted on cached features (LP-FT): {self.epochs} epochs in {self.seconds:.1f} s, best epoch "
                f"{self.best_epoch}: val_loss {self.val_loss:.4f}, val_accuracy {self.val_accuracy:.3f}")


def fit_head_on_features(head: nn.Module, train: TensorDataset, val: TensorDataset, *, task, weight_decay: float,
                         label_smoothing: float, seed: int, lr: float = HEAD_LR, max_epochs: int = MAX_HEAD_EPOCHS,
                         patience: int = HEAD_PATIENCE) -> HeadFit:
    """Train ``head`` in place on feature vectors; it ends with the weights of its best val-loss epoch."""
    started = time.perf_counter()
    device = next(head.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=HEAD_BATCH, shuffle=True, generator=generator)
    val_x, val_y = (t.to(device) for t in val.tensors)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_state, epoch = None, None, 0
    for epoch in range(1, max_epochs + 1):
        head.train()
        for features, labels in loader:
            loss = task.head_loss(head(features.to(device)), labels.to(device), label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        head.eval()
        with torch.no_grad():
            logits = head(val_x)
        val_loss = task.val_loss(logits, val_y)
        if best is None or val_loss < best[1]:
            best = (epoch, val_loss, task.count_correct(logits, val_y) / len(val_y))
            best_state = copy.deepcopy(head.state_dict())
        elif epoch - best[0] >= patience:
            break
    head.load_state_dict(best_state)
    return HeadFit(epoch, best[0], best[1], best[2], time.perf_counter() - started)


@torch.inference_mode()
def probe_row(head: nn.Module, val: TensorDataset, *, task, class_names, device: torch.device) -> dict:
    """The LP-FT model (pretrained body, fitted head) as epoch 0's row, scored on the cached val vectors, which
    are exactly what the model computes on the val images."""
    val_x, val_y = val.tensors
    head.eval()
    return {"epoch": 0, **task.val_scores(val_y, head(val_x.to(device)).float().cpu(), class_names)}
