"""Temperature scaling: one scalar T fitted on the val split so that ``softmax(logits / T)`` is calibrated.

Fine-tuned networks are over-confident (or, with label smoothing, under-confident): a prediction made with
0.95 confidence is right less (or more) often than 95 % of the time. Dividing the logits by one temperature
fitted to minimise the val negative log-likelihood fixes most of it without changing a single prediction
(Guo et al., "On Calibration of Modern Neural Networks", ICML 2017). The temperature is stored in the
checkpoint metadata and applied by the predictors, so predict, evaluate, export and the MLflow model agree.

A temperature fitted to a handful of images is fitted to their noise: 2 val images gave T = 0.045 and turned
ECE 0.0085 into 0.434. So T stays 1, with the reason recorded, when val is under :data:`MIN_IMAGES` images,
when every val image is right, or when a temperature fitted on part of val does not lower the NLL of the rest
(:func:`cross_fitted_nll`, :data:`FOLDS`-fold cross-fitting).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MIN_IMAGES = 20  # below this a fitted T follows the few images' noise (and each held-out fold has < 4)
FOLDS = 5


@dataclass
class Calibration:
    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    images: int = 0
    nll_cross_fitted: float | None = None  # val NLL with each fold scaled by a T fitted on the other folds
    reason: str | None = None  # why T was left at 1 (None: fitted)

    @property
    def fitted(self) -> bool:
        return self.reason is None

    def summary(self) -> str:
        if not self.fitted:  # a notice (the val NLL and ECE are in the metrics)
            return f"skipped temperature scaling (temperature left at 1): {self.reason}"
        return (f"calibrated on val: temperature {self.temperature:.3f}, NLL {self.nll_before:.4f} -> "
                f"{self.nll_after:.4f} (held-out folds {self.nll_cross_fitted:.4f}), "
                f"ECE {self.ece_before:.4f} -> {self.ece_after:.4f}")

    def metrics(self) -> dict:
        """Numbers for MLflow; the reason (text) goes with them into result.json and the checkpoint metadata."""
        return {"temperature": self.temperature, "temperature_fitted": float(self.fitted),
                "temperature_reason": self.reason, "calibration_images": self.images,
                "val_nll_uncalibrated": self.nll_before, "val_nll_calibrated": self.nll_after,
                "val_nll_cross_fitted": self.nll_cross_fitted,
                "val_ece_uncalibrated": self.ece_before, "val_ece_calibrated": self.ece_after}


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising the NLL of ``softmax(logits / T)`` (LBFGS on log T, so T stays positive)."""
    logits, labels = logits.float().clone(), labels.long().clone()  # clones: no inference-mode tensors in autograd
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(1e-2, 1e2))


def _fit_or_one(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """With no error the NLL has no minimum at any T > 0 (each term falls as T -> 0): T stays 1."""
    return 1.0 if bool((logits.argmax(1) == labels).all()) else fit_temperature(logits, labels)


def cross_fitted_nll(logits: torch.Tensor, labels: torch.Tensor, folds: int = FOLDS, seed: int = 0) -> float:
    """Mean NLL of every image under a T fitted without it: a fit that helps only the images it saw scores worse
    than T = 1 here. Folds are a seeded shuffle, so the same logits always give the same answer."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    total = 0.0
    for held_out in order.tensor_split(folds):
        rest = order[~torch.isin(order, held_out)]
        temperature = _fit_or_one(logits[rest], labels[rest])
        total += F.cross_entropy(logits[held_out].float() / temperature, labels[held_out], reduction="sum").item()
    return total / len(labels)


def calibrate(logits: torch.Tensor, labels: torch.Tensor) -> Calibration:
    """Fit T on ``logits``/``labels`` when val can support one (see the module docstring); NLL and ECE before and
    after. Left at 1, the calibration says why."""
    from transferkit.reports.metrics import expected_calibration_error

    logits, labels = logits.float(), labels.long()
    images = len(labels)
    nll_before = F.cross_entropy(logits, labels).item()
    cross_fitted, reason = None, None
    if images < MIN_IMAGES:
        reason = f"the val split has {images} images, too few to fit a temperature (at least {MIN_IMAGES})"
    elif bool((logits.argmax(1) == labels).all()):
        reason = ("every val image is classified right, so the val NLL only falls as T -> 0 and says nothing of how "
                  "sure a wrong prediction would be")
    else:
        cross_fitted = cross_fitted_nll(logits, labels)
        if not cross_fitted < nll_before:
            reason = (f"a temperature fitted on {FOLDS - 1}/{FOLDS} of val does not lower the NLL of the held-out "
                      f"rest ({cross_fitted:.4f} vs {nll_before:.4f} at T=1)")
    temperature = 1.0 if reason else fit_temperature(logits, labels)
    scaled = logits / temperature
    return Calibration(temperature, nll_before, F.cross_entropy(scaled, labels).item(),
                       expected_calibration_error(labels.numpy(), logits.softmax(1).numpy()),
                       expected_calibration_error(labels.numpy(), scaled.softmax(1).numpy()),
                       images, cross_fitted, reason)
