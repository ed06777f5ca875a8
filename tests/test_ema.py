"""EMA of the weights: the average is scored on val beside the raw weights and saved as best when it wins."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import config_for

from transferkit.train import finetune

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_ema_weights_differ_from_raw_and_are_saved_when_better(tiny_data, tiny_weights, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from transferkit.train import loop

    validate = loop.validate

    def averaged_scores_better(module, data, **kwargs):  # as if the average generalised better: its val loss halves
        scores = validate(module, data, **kwargs)
        return {**scores, "val_loss": scores["val_loss"] / 2} if module is not data.forward else scores

    monkeypatch.setattr(loop, "validate", averaged_scores_better)
    config = config_for(tiny_data, tiny_weights, tmp_path, strategy="linear-probe", epochs=2, ema=True,
                        calibrate=False, lr=0.05)
    result = finetune(config, progress=False)
    assert [row["val_weights_ema"] for row in result.history] == [1.0, 1.0]
    assert json.loads((result.run_dir / "best.json").read_text())["weights"] == "ema"
    best, raw = (load_file(str(result.run_dir / f"{stem}.safetensors")) for stem in ("best", "last"))
    assert not torch.equal(best["classifier.weight"], raw["classifier.weight"])  # the average, not the raw head
    assert torch.equal(best["conv_stem.weight"], raw["conv_stem.weight"])  # around the same frozen body
