"""`transferkit export --precision fp16|int8`: converted ONNX models that are written only when they keep their accuracy."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest
import torch

from transferkit.cli import main
from transferkit.errors import TransferkitError
from transferkit.use import precision as precision_lib
from transferkit.use.export import check_batch, export, sidecar_path

pytestmark = pytest.mark.slow  # each exports, converts and scores an ONNX model: ~2.5 s


def test_fp16_runs_and_matches_fp32_loosely(runner, tiny_classifier, tiny_data, tmp_path):
    from transferkit.models.predictors import load_predictor

    out = tmp_path / "model.fp16.onnx"
    result = runner.invoke(main, ["export", "--model", str(tiny_classifier), "--precision", "fp16", "--dynamic-batch",
                                  "--out", str(out), "--check-data", str(tiny_data / "val")])
    assert result.exit_code == 0, result.output
    assert "accuracy on 8 labelled images" in result.output and "top-1 agreement with fp32: 100.00%" in result.output
    assert "size on disk: fp32" in result.output and "images/s" in result.output
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["precision"] == "fp16" and sidecar["precision_check"]["drop"] <= 1.0
    assert sidecar["precision_check"]["bytes"] < 0.7 * sidecar["precision_check"]["fp32_bytes"]

    predictor = load_predictor(tiny_classifier)
    batch = check_batch(predictor, [tiny_data / "val"])
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)"  # float32 in and out: same preprocessing as fp32
    logits = session.run(["logits"], {"input": batch.numpy()})[0]
    with torch.inference_mode():
        expected = predictor.model(batch).numpy()
    np.testing.assert_allclose(logits, expected, atol=0.05 * np.abs(expected).max())
    assert (logits.argmax(1) == expected.argmax(1)).all()


def test_int8_is_calibrated_and_written_when_accuracy_holds(tiny_classifier, tiny_data, tmp_path):
    out = export(tiny_classifier, "onnx", out=tmp_path / "model.int8.onnx", precision="int8",
                 check_images=[tiny_data / "val"], calibration=tiny_data / "train", calibration_images=10).path
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["calibration"]["images"] == 10 and sidecar["calibration"]["method"] == "minmax"
    check = sidecar["precision_check"]
    assert check["precision"] == "int8" and check["images"] == 8 and check["drop"] <= 1.0 and not check["forced"]
    import onnx

    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ static quantization, not a renamed fp32 graph


def _losing_report(*args, **kwargs):
    precision, max_drop = args[2], args[-1]
    return precision_lib.PrecisionReport(precision, 8, "fake", 100.0, 75.0, 75.0, 1000, 300, 10.0, 20.0, max_drop)


def test_max_drop_refuses_to_write_unless_forced(runner, tiny_classifier, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(precision_lib, "compare_on_labelled", _losing_report)
    out = tmp_path / "out" / "model.int8.onnx"
    args = ["export", "--model", str(tiny_classifier), "--precision", "int8", "--out", str(out),
            "--check-data", str(tiny_data / "val"), "--calibration", str(tiny_data / "train"), "--calibration-images", "4"]
    result = runner.invoke(main, args)
    assert result.exit_code == 2
    assert "fp32 100.00%  int8 75.00%  (drop +25.00 points, allowed 1)" in result.output
    assert "more than --max-drop 1; nothing written (pass --force" in result.output
    assert list(out.parent.iterdir()) == []

    result = runner.invoke(main, [*args, "--force"])
    assert result.exit_code == 0, result.output
    assert "written because of --force" in result.output
    assert json.loads(sidecar_path(out).read_text())["precision_check"]["forced"] is True


def test_reduced_precision_needs_labelled_images(tiny_classifier, tiny_data, tmp_path):
    """Checked before anything is exported: no labelled images, no calibration images, wrong format."""
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    with pytest.raises(TransferkitError, match="records no readable validation split; pass --check-data"):
        export(tiny_classifier, "onnx", out=tmp_path / "m.onnx", precision="fp16")
    with pytest.raises(TransferkitError, match="records no readable training split; pass --calibration"):
        export(tiny_classifier, "onnx", out=tmp_path / "m.onnx", precision="int8", check_images=[tiny_data / "val"])
    with pytest.raises(TransferkitError, match="applies to --format onnx only"):
        export(tiny_classifier, "torchscript", precision="int8")
    with pytest.raises(TransferkitError, match="must be >= 0"):
        export(tiny_classifier, "onnx", precision="int8", max_drop=-1)
    assert list(tmp_path.iterdir()) == []
