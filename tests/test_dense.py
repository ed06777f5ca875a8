"""`transferkit predict --dense`: class maps from the classifier run fully convolutionally on large frames."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_image

from transferkit.cli import main
from transferkit.errors import TransferkitError
from transferkit.use.dense import dense_logits


def test_dense_logits_average_to_the_pooled_logits(tiny_classifier):
    from transferkit.models.predictors import load_predictor

    model = load_predictor(tiny_classifier).model
    frame = torch.randn(2, 3, 96, 224)  # wider and taller than the 64-px training size
    with torch.inference_mode():
        dense = dense_logits(model, frame)
        pooled = model(frame)
    assert dense.shape[:2] == (2, 2) and dense.shape[2] * dense.shape[3] > 1
    torch.testing.assert_close(dense.mean((2, 3)), pooled, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name, kwargs, message", [
    ("test_efficientnet", {"global_pool": "max"}, "do not apply to EfficientNet: its head is not global average pooling \\+ linear \\(pooling max"),
    ("test_vit", {}, "token \\(ViT-style\\) model"),
    ("test_convnext", {}, "do not apply to ConvNeXt: .*pooling inside the head"),
])
def test_dense_refuses_heads_where_it_does_not_hold(name, kwargs, message):
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs).eval()
    size = model.pretrained_cfg["input_size"][1:]
    with pytest.raises(TransferkitError, match=message), torch.inference_mode():
        dense_logits(model, torch.randn(1, 3, *size))


def test_predict_dense_writes_a_class_map_per_frame(runner, tiny_classifier, tmp_path):
    from conftest import CLASS_COLOURS

    frame = make_image(tmp_path / "frame.png", CLASS_COLOURS["cat"], size=(320, 120))
    out = tmp_path / "maps"
    result = runner.invoke(main, ["predict", "--model", str(tiny_classifier), str(frame), "--dense", "--out", str(out),
                                  "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "class_fractions.json").read_text())
    assert rows[0]["map_size"][1] > rows[0]["map_size"][0] > 1  # a wide frame gives a wide map
    assert sum(rows[0]["fractions"].values()) == pytest.approx(1.0)
    assert (out / "frame.classmap.png").stat().st_size > 5_000
    assert "cells)" in result.output and "%" in result.output

    refused = runner.invoke(main, ["predict", "--model", str(tiny_classifier), str(frame), "--dense"])
    assert refused.exit_code == 2 and "pass --out FOLDER" in refused.output


def test_dense_size_and_the_resized_frame_are_bounded(runner, tiny_classifier, tmp_path):
    """Issue 24: a 1280x64 strip at --dense-size 3000 asked for a 2.16 GB tensor, then gave a traceback."""
    from PIL import Image

    from transferkit.models.predictors import load_predictor
    from transferkit.use.dense import MAX_DENSE_PIXELS, dense_map

    strip = tmp_path / "strip.png"
    Image.new("RGB", (1280, 64), (200, 40, 40)).save(strip)
    out = tmp_path / "maps"
    base = ["predict", "--model", str(tiny_classifier), str(strip), "--dense", "--out", str(out), "--device", "cpu"]
    result = runner.invoke(main, [*base, "--dense-size", "3000"])
    assert result.exit_code == 2 and "bad value for dense_size: 3000; it must be an int in [32, 2048]" in result.output
    result = runner.invoke(main, [*base, "--dense-size", "1000"])  # 20000x1000: refused from the header, nothing written
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert f"would be 20,000,000 pixels with its short side resized to 1000, above the {MAX_DENSE_PIXELS:,}" in result.output
    assert not out.exists()
    with pytest.raises(TransferkitError, match="above the .*-pixel limit for dense maps"):  # the Python API checks too
        dense_map(load_predictor(tiny_classifier), np.zeros((64, 1280, 3), np.uint8), 1000)
