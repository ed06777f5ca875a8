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
