"""`transferkit export`: ONNX and TorchScript files that reproduce the torch model on real images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SHARED_PHOTOS, SHARED_WEIGHTS, requires_shared_weights

from transferkit.cli import main
from transferkit.errors import TransferkitError
from transferkit.use.export import export, sidecar_path
from transferkit.use.predict import predict


def _preprocess_like_a_deployment(sidecar: dict, paths) -> np.ndarray:
    """What a consumer of the export does: rebuild the eval transform from the JSON alone, with timm."""
    from PIL import Image
    from timm.data import create_transform

    transform = create_transform(**sidecar["data_config"], is_training=False)
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]).numpy()


@pytest.mark.slow
def test_onnx_export_parity_on_real_images(runner, tiny_classifier, tiny_data, tmp_path):
    import onnxruntime

    out = tmp_path / "model.onnx"
    result = runner.invoke(main, ["export", "--model", str(tiny_classifier), "--format", "onnx", "--dynamic-batch",
                                  "--out", str(out), "--check-data", str(tiny_data / "val")])
    assert result.exit_code == 0, result.output
    assert "parity check (onnxruntime vs torch, 8 check images): max |logit difference|" in result.output
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["class_names"] == ["cat", "dog"]
    assert sidecar["data_config"]["input_size"] == [3, 64, 64]
    assert sidecar["input"]["shape"] == ["batch", 3, 64, 64]
    assert sidecar["parity"]["max_abs_diff"] <= 1e-3 and isinstance(sidecar["opset"], int)

    paths = sorted((tiny_data / "val").rglob("*.png"))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input": _preprocess_like_a_deployment(sidecar, paths)})[0]
    onnx_probs = torch.tensor(logits).softmax(-1).numpy()
    rows = predict(tiny_classifier, paths, topk=2, workers=0)
    torch_probs = np.array([[r["top1_prob"], r["top2_prob"]] if r["top1_class"] == "cat" else [r["top2_prob"], r["top1_prob"]]
                            for r in rows])
    np.testing.assert_allclose(onnx_probs, torch_probs, atol=1e-5)


def test_torchscript_export_parity(tiny_classifier, tmp_path):
    out = export(tiny_classifier, "torchscript", out=tmp_path / "model.pt").path
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["parity"]["source"] == "generated images" and sidecar["parity"]["max_abs_diff"] <= 1e-3
    assert sidecar["opset"] is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(out))
    from transferkit.models.predictors import load_predictor

    model = load_predictor(tiny_classifier).model
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-4, rtol=0)


def test_export_default_out_is_beside_the_checkpoint(tiny_classifier):
    out = export(tiny_classifier, "torchscript").path
    try:
        assert out == tiny_classifier / "model.torchscript.pt" and sidecar_path(out).is_file()
    finally:
        out.unlink()
        sidecar_path(out).unlink()


def test_failed_parity_writes_nothing(tiny_classifier, tmp_path, monkeypatch):
    import transferkit.use.export as export_module

    monkeypatch.setattr(export_module, "PARITY_TOLERANCE", -1.0)
    with pytest.raises(TransferkitError, match="does not match torch"):
        export(tiny_classifier, "torchscript", out=tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


def test_svm_model_cannot_be_exported(runner, tiny_weights, tmp_path):
    from conftest import TINY_BACKBONE

    from transferkit.models.backbones import load_backbone
    from transferkit.models.saved_model import checkpoint_metadata, save_checkpoint

    model, preprocessing = load_backbone(TINY_BACKBONE, weights=tiny_weights, num_classes=0)
    save_checkpoint(tmp_path / "svm" / "model", model,
                    checkpoint_metadata(model, kind="svm", class_names=["cat", "dog"], preprocessing=preprocessing))
    result = runner.invoke(main, ["export", "--model", str(tmp_path / "svm"), "--format", "onnx"])
    assert result.exit_code == 2
    assert "only finetuned classifiers can be exported" in result.output and "scikit-learn" in result.output


def test_opset_needs_onnx(tiny_classifier):
    with pytest.raises(TransferkitError, match="--opset applies to --format onnx"):
        export(tiny_classifier, "torchscript", opset=17)


ACCEPTABLE_TOP5 = {
    "chelsea_cat": {"tabby", "tiger cat", "Egyptian cat"}, "cat_720p": {"tabby", "tiger cat", "Egyptian cat"},
    "coffee_espresso": {"espresso", "cup", "coffee mug"}, "parrot_macaw": {"macaw"}, "hot_dog": {"hotdog"},
    "bird_chickadee": {"chickadee"}, "dragonfly": {"dragonfly"}, "owl_great_grey": {"great grey owl"},
}


@pytest.mark.slow
@requires_shared_weights
def test_real_lite0_imagenet_model_predicts_and_exports(runner, tmp_path):
    """The real ImageNet lite0 as a transferkit classifier: sane top-5 on the sanity photos, ONNX parity on them."""
    from timm.data import ImageNetInfo

    from transferkit.models.backbones import load_backbone
    from transferkit.models.saved_model import checkpoint_metadata, save_checkpoint

    model, preprocessing = load_backbone("tf_efficientnet_lite0", weights=SHARED_WEIGHTS / "tf_efficientnet_lite0.safetensors")
    info = ImageNetInfo()
    names = [info.index_to_description(i) for i in range(1000)]
    save_checkpoint(tmp_path / "imagenet" / "model", model,
                    checkpoint_metadata(model, kind="classifier", class_names=names, preprocessing=preprocessing))
    photos = sorted(p for p in SHARED_PHOTOS.glob("*.jpg") if p.stem in ACCEPTABLE_TOP5)
    rows = predict(tmp_path / "imagenet", photos, topk=5, workers=0)
    for row in rows:
        top5 = {row[f"top{k}_class"] for k in range(1, 6)}
        acceptable = ACCEPTABLE_TOP5[row["path"].rsplit("/", 1)[1][:-4]]
        assert any(name in acceptable or any(a in name.split(", ") for a in acceptable) for name in top5), row
    out = tmp_path / "lite0.onnx"
    result = runner.invoke(main, ["export", "--model", str(tmp_path / "imagenet"), "--out", str(out),
                                  *(arg for p in photos[:4] for arg in ("--check-data", str(p)))])
    assert result.exit_code == 0, result.output
    parity = json.loads(sidecar_path(out).read_text())["parity"]
    assert parity["images"] == 4 and parity["max_abs_diff"] < 1e-3


@pytest.mark.slow
def test_export_never_replaces_a_file_it_did_not_write(runner, tiny_classifier, tmp_path):
    """The checkpoint, its metadata and a user's file are refused even with --overwrite; a previous export of the
    same format is replaced only with --overwrite, and one edited since (its hash differs) is not."""
    import shutil

    from transferkit.core.fileio import sha256_file

    model = tmp_path / "victim"
    shutil.copytree(tiny_classifier, model)
    checkpoint = next(model.glob("*.safetensors"))
    before = sha256_file(checkpoint)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for out, extra in ((checkpoint, []), (checkpoint, ["--overwrite"]), (checkpoint.with_suffix(""), []),
                       (checkpoint.with_suffix(""), ["--overwrite"]), (notes, []), (notes, ["--overwrite"])):
        result = runner.invoke(main, ["export", "--model", str(model), "--format", "torchscript", "--out", str(out), *extra])
        assert result.exit_code == 2, result.output
        assert "already exists" in result.output or "is not a previous torchscript export" in result.output
    assert sha256_file(checkpoint) == before and notes.read_text() == "mine"
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in tiny_classifier.iterdir())

    out = tmp_path / "model.pt"
    export(model, "torchscript", out=out)
    with pytest.raises(TransferkitError, match="already exists; export never replaces"):
        export(model, "torchscript", out=out)
    export(model, "torchscript", out=out, overwrite=True)  # its own previous export: replaced
    assert json.loads(sidecar_path(out).read_text())["sha256"] == sha256_file(out)
    with pytest.raises(TransferkitError, match="not a previous onnx export"):
        export(model, "onnx", out=out, overwrite=True)  # another format's file is not "the same kind"
    out.write_bytes(b"edited since")
    with pytest.raises(TransferkitError, match="not a previous torchscript export"):
        export(model, "torchscript", out=out, overwrite=True)
    assert out.read_bytes() == b"edited since"


@pytest.mark.slow
@pytest.mark.parametrize("opset", [13, 20])
def test_opset_is_written_exactly(runner, tiny_classifier, tmp_path, opset):
    """Below 18 the dynamo exporter would write 18 (after a traceback); the TorchScript-based one honours it."""
    import onnx

    out = tmp_path / "model.onnx"
    result = runner.invoke(main, ["export", "--model", str(tiny_classifier), "--out", str(out), "--opset", str(opset),
                                  "--dynamic-batch"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["opset"] == opset and sidecar["parity"]["max_abs_diff"] <= 1e-3
    assert [o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")] == [opset]
    assert sidecar["exporter"].endswith(f"dynamo={opset >= 18})")


def test_opset_out_of_range_is_refused_before_any_work(tiny_classifier, tmp_path, monkeypatch):
    import onnx.defs

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the opset was checked")

    monkeypatch.setattr("transferkit.models.predictors.load_predictor", no_model)
    for opset, message in ((6, "it must be an int >= 7"), (onnx.defs.onnx_opset_version() + 1, "is newer than")):
        with pytest.raises(TransferkitError, match=message):
            export(tiny_classifier, "onnx", out=tmp_path / "m.onnx", opset=opset)
    assert list(tmp_path.iterdir()) == []


def test_an_opset_the_exporter_does_not_write_is_refused(tiny_classifier, tmp_path, monkeypatch):
    import transferkit.use.export as export_module

    monkeypatch.setattr(export_module, "_onnx_opset", lambda path: 18)  # as the dynamo path silently does
    with pytest.raises(TransferkitError, match="wrote opset 18, not the requested --opset 13; nothing written"):
        export(tiny_classifier, "onnx", out=tmp_path / "m.onnx", opset=13)
    assert list(tmp_path.iterdir()) == []
