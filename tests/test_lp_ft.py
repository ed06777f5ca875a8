"""LP-FT: the head phase fits the head on cached features from one backbone pass, the linear-probe model is
kept when unfreezing does worse, and BatchNorm statistics stay pretrained after a fitted head."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import config_for

from transferkit.train import finetune

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_lp_ft_fits_the_head_on_features_from_one_backbone_pass(tiny_data, tiny_weights, tmp_path, monkeypatch):
    import transferkit.features.extract as extract
    import transferkit.train.head_phase as head_phase

    batches, fits = [], []
    embed, fit = extract.embed, head_phase.fit_head_on_features
    monkeypatch.setattr(extract, "embed", lambda *a, **k: batches.append(len(a[1])) or embed(*a, **k))
    monkeypatch.setattr(head_phase, "fit_head_on_features", lambda *a, **k: fits.append(fit(*a, **k)) or fits[-1])
    result = finetune(config_for(tiny_data, tiny_weights, tmp_path, epochs=1), progress=False)
    assert sum(batches) == 16 + 8  # every train and val image through the backbone exactly once
    assert fits[0].epochs > 1 and fits[0].val_accuracy > 0  # many head epochs on those vectors
    assert [r["epoch"] for r in result.history] == [1]  # costing none of the epoch budget
    # calibration (on by default) lands in the best checkpoint, the run's result and the predictor
    from transferkit.models.predictors import load_predictor

    best = json.loads((result.run_dir / "best.json").read_text())
    summary = json.loads((result.run_dir / "result.json").read_text())["calibration"]
    assert best["temperature"] == summary["temperature"] == load_predictor(result.run_dir).temperature
    # 8 val images are too few to fit a temperature (issue 24): T stays 1 and the result says why
    assert summary["temperature_fitted"] == 0.0 and summary["temperature"] == 1.0
    assert "too few to fit a temperature" in summary["temperature_reason"]
    assert summary["val_nll_calibrated"] <= summary["val_nll_uncalibrated"]
    assert {"val_ece_uncalibrated", "val_ece_calibrated"} <= set(summary)


def test_lp_ft_model_is_kept_when_unfreezing_does_worse(tiny_data, tiny_weights, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from transferkit.train import loop

    validate = loop.validate
    monkeypatch.setattr(loop, "validate",  # as if every full epoch lost what the linear probe had
                        lambda module, data, **kwargs: {**validate(module, data, **kwargs), "val_loss": 50.0})
    result = finetune(config_for(tiny_data, tiny_weights, tmp_path, epochs=2, early_stopping=0), progress=False)
    assert result.best_epoch == 0 and len(result.history) == 2 and result.best["val_loss"] < 50
    saved = json.loads((result.run_dir / "result.json").read_text())
    assert saved["best_epoch"] == 0 and json.loads((result.run_dir / "best.json").read_text())["epoch"] == 0
    best, last = (load_file(str(result.run_dir / f"{stem}.safetensors")) for stem in ("best", "last"))
    pretrained = load_file(str(tiny_weights))
    assert torch.equal(best["conv_stem.weight"], pretrained["conv_stem.weight"])  # the untouched body...
    assert not torch.equal(last["conv_stem.weight"], pretrained["conv_stem.weight"])  # ...that training moved


@pytest.mark.parametrize("strategy,bn_stats,frozen", [("freeze-unfreeze", "auto", True), ("full", "auto", False),
                                                      ("freeze-unfreeze", "update", False), ("full", "frozen", True)])
def test_bn_statistics_stay_pretrained_after_a_fitted_head(tiny_data, tiny_weights, tmp_path, strategy, bn_stats,
                                                           frozen):
    from safetensors.torch import load_file

    config = config_for(tiny_data, tiny_weights, tmp_path, strategy=strategy, bn_stats=bn_stats, calibrate=False)
    assert config.frozen_bn_stats is frozen
    result = finetune(config, progress=False)
    last, pretrained = load_file(str(result.run_dir / "last.safetensors")), load_file(str(tiny_weights))
    stats = [k for k in pretrained if k.endswith("running_mean")]
    assert stats and all(torch.equal(last[k], pretrained[k]) for k in stats) is frozen
    assert not torch.equal(last["conv_stem.weight"], pretrained["conv_stem.weight"])  # the body trained either way
