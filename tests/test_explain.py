"""`transferkit explain` (CAM overlays) and `transferkit backbones filters`."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import SHARED_WEIGHTS, TINY_BACKBONE, make_image, requires_shared_weights
from PIL import Image

from transferkit.cli import main
from transferkit.errors import TransferkitError
from transferkit.use.explain import default_target_layer, explain


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_explain_cli_writes_one_overlay_per_image(runner, tiny_classifier, tiny_data, tmp_path, method):
    images = [tiny_data / "val" / "cat" / "cat_0.png", tiny_data / "val" / "dog" / "dog_0.png",
              tiny_data / "train" / "dog" / "dog_0.png"]  # two share the stem dog_0
    out = tmp_path / "cams"
    result = runner.invoke(main, ["explain", "--model", str(tiny_classifier), *map(str, images), "--out", str(out),
                                  "--method", method, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 3, names
    assert any(n.startswith("cat_0.cat.") for n in names)  # predicted class in the file name
    assert all(n.endswith(f".{method}.png") for n in names)
    for path in out.iterdir():
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] > 300


def test_explain_class_and_target_layer_override(tiny_classifier, tiny_data, tmp_path):
    image = tiny_data / "val" / "cat" / "cat_1.png"
    (written,) = explain(tiny_classifier, [image], tmp_path, method="scorecam", target_layer="blocks.4",
                         class_name="dog", device="cpu")
    assert written.name.startswith("cat_1.") and written.is_file()
    with pytest.raises(TransferkitError, match="no module 'layer9'"):
        explain(tiny_classifier, [image], tmp_path, target_layer="layer9", device="cpu")
    with pytest.raises(TransferkitError, match="unknown class 'fox'; the model's classes are cat, dog"):
        explain(tiny_classifier, [image], tmp_path, class_name="fox", device="cpu")


@pytest.mark.parametrize("name, layer", [
    ("test_resnet", "layer4.0"), ("test_efficientnet", "bn2"), ("test_convnext", "stages.3"),
    ("test_vit", "blocks.5.norm1"),
])
def test_default_target_layer_gives_a_spatial_cam(name, layer):
    from pytorch_grad_cam import GradCAM

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3).eval()
    chosen, reshape = default_target_layer(model)
    assert chosen == layer
    size = model.pretrained_cfg["input_size"][1:]
    with GradCAM(model=model, target_layers=[model.get_submodule(chosen)], reshape_transform=reshape) as cam:
        heatmap = cam(input_tensor=torch.randn(1, 3, *size), targets=None)
    assert heatmap.shape == (1, *size) and heatmap.max() > 0


def test_backbones_filters_cli(runner, tiny_weights, tmp_path):
    out = tmp_path / "filters.png"
    result = runner.invoke(main, ["backbones", "filters", TINY_BACKBONE, "--weights", str(tiny_weights), "--out", str(out)])
    assert result.exit_code == 0, result.output
    model = timm.create_model(TINY_BACKBONE)
    assert f"{model.conv_stem.out_channels} filters" in result.output
    with Image.open(out) as img:
        assert img.format == "PNG"
    again = runner.invoke(main, ["backbones", "filters", TINY_BACKBONE, "--weights", str(tiny_weights), "--out", str(out)])
    assert again.exit_code == 0, again.output  # its own earlier figure may be replaced
    notes = tmp_path / "notes.png"
    notes.write_bytes(b"a user's file")
    refused = runner.invoke(main, ["backbones", "filters", TINY_BACKBONE, "--out", str(notes)])
    assert refused.exit_code == 2 and "already exists and is not an earlier figure" in refused.output
    assert notes.read_bytes() == b"a user's file"


@requires_shared_weights
def test_backbones_filters_real_weights(runner, tmp_path):
    out = tmp_path / "lite0.png"
    result = runner.invoke(main, ["backbones", "filters", "tf_efficientnet_lite0",
                                  "--weights", str(SHARED_WEIGHTS / "tf_efficientnet_lite0.safetensors"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "32 filters 3x3" in result.output and "sha256:" in result.output
    with Image.open(out) as img:
        assert img.size[0] > 300


def test_explain_input_images_are_checked(tiny_classifier, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    make_image(tmp_path / "ok.png", (10, 200, 10))
    with pytest.raises(TransferkitError, match="cannot decode image"):
        explain(tiny_classifier, [tmp_path / "ok.png", bad], tmp_path / "out", device="cpu")
