"""Temperature scaling: fitted on val logits when it lowers the NLL (left at 1 with no val error), and applied by
the predictor from the checkpoint's metadata."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_temperature_scaling_lowers_nll_of_an_over_confident_model():
    from transferkit.train.calibration import calibrate

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (400,), generator=generator)
    logits = torch.randn(400, 5, generator=generator)
    logits[torch.arange(400), labels] += 1.5  # right ~60 % of the time...
    fit = calibrate(logits * 8, labels)  # ...but ~100 % sure
    assert fit.temperature > 2 and fit.nll_after < fit.nll_before / 2 and fit.ece_after < fit.ece_before
    right = calibrate(torch.eye(5).repeat(4, 1) * 3, torch.arange(5).repeat(4))  # no val error: no finite optimum
    assert not right.fitted and right.temperature == 1.0 and right.nll_after == right.nll_before
    assert "every val image is classified right" in right.summary() and right.metrics()["temperature_fitted"] == 0.0


def test_predict_applies_the_stored_temperature(tiny_classifier, tiny_data):
    from transferkit.models.predictors import load_predictor

    images = [str(p) for p in sorted((tiny_data / "val").rglob("*.png"))]
    predictor = load_predictor(tiny_classifier)
    plain = predictor.predict_proba(images)
    predictor.metadata["temperature"] = 4.0  # as a calibrated checkpoint's metadata holds it
    scaled = predictor.predict_proba(images)
    expected = torch.from_numpy(np.log(plain) / 4.0).softmax(1).numpy()
    assert np.allclose(scaled, expected, atol=1e-5) and (scaled.argmax(1) == plain.argmax(1)).all()
    assert scaled.max() < plain.max()


def test_a_tiny_val_split_keeps_temperature_one_and_says_why():
    """Issue 24: 2 val images (one wrong by a hair) gave T = 0.045 and made the probabilities worse."""
    from transferkit.train.calibration import MIN_IMAGES, calibrate, fit_temperature

    logits, labels = torch.tensor([[1.0, 0.0], [0.001, 0.0]]), torch.tensor([0, 1])
    assert fit_temperature(logits, labels) < 0.2  # what a fit on them would keep
    fit = calibrate(logits, labels)
    assert not fit.fitted and fit.temperature == 1.0 and fit.nll_after == fit.nll_before
    assert fit.reason == f"the val split has 2 images, too few to fit a temperature (at least {MIN_IMAGES})"
    assert fit.reason in fit.summary() and fit.metrics()["temperature_reason"] == fit.reason
    assert fit.metrics()["calibration_images"] == 2 and fit.metrics()["temperature_fitted"] == 0.0


def test_a_temperature_that_does_not_help_held_out_folds_is_not_kept():
    """A calibrated model's val set: the fit lowers the NLL of the images it saw, not of the held-out ones."""
    from transferkit.train.calibration import calibrate, cross_fitted_nll, fit_temperature

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 3, generator=generator) * 2
    labels = torch.multinomial(logits.softmax(1), 1, generator=generator).squeeze(1)  # calibrated by construction
    in_sample = torch.nn.functional.cross_entropy(logits / fit_temperature(logits, labels), labels).item()
    fit = calibrate(logits, labels)
    assert in_sample < fit.nll_before < fit.nll_cross_fitted == cross_fitted_nll(logits, labels)
    assert not fit.fitted and fit.temperature == 1.0 and "held-out" in fit.reason

    over_confident = calibrate(logits * 4, labels)  # the same model 4x too sure: held-out folds gain, T is fitted
    assert over_confident.fitted and over_confident.reason is None and over_confident.temperature > 2
    assert over_confident.nll_cross_fitted < over_confident.nll_before
