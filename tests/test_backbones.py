"""Backbone loading: local weights, sidecar configs, clear errors, and real ImageNet weights."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch
from conftest import SHARED_PHOTOS, SHARED_WEIGHTS, TINY_BACKBONE, TINY_IMG, requires_shared_weights
from safetensors.torch import save_file

from transferkit.data import load_image
from transferkit.errors import TransferkitError
from transferkit.models.backbones import backbone_identity, backbone_info, load_backbone


def test_local_safetensors_loads_exact_weights_and_sidecar_config(tiny_weights):
    from safetensors.torch import load_file

    model, cfg = load_backbone(TINY_BACKBONE, weights=tiny_weights)
    saved = load_file(str(tiny_weights))
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert cfg.data_config["input_size"] == [3, TINY_IMG, TINY_IMG]  # from the sidecar JSON
    assert backbone_identity(model)["weights"].startswith("sha256:")


def test_new_head_and_feature_extractor(tiny_weights):
    model, _ = load_backbone(TINY_BACKBONE, weights=tiny_weights, num_classes=3)
    assert model(torch.zeros(2, 3, TINY_IMG, TINY_IMG)).shape == (2, 3)
    pooled, _ = load_backbone(TINY_BACKBONE, weights=tiny_weights, num_classes=0)
    assert pooled(torch.zeros(2, 3, TINY_IMG, TINY_IMG)).shape == (2, pooled.num_features)


def test_pth_state_dict_loads_with_weights_only(tiny_weights, tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "w.pth"
    torch.save({"state_dict": load_file(str(tiny_weights))}, path)
    model, _ = load_backbone(TINY_BACKBONE, weights=path, num_classes=2)
    assert backbone_identity(model)["weights"].startswith("sha256:")


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save(torch.nn.Linear(2, 2), path)  # a whole pickled module, not a state dict
    with pytest.raises(TransferkitError, match="weights_only"):
        load_backbone(TINY_BACKBONE, weights=path)


def test_mismatched_weights_name_keys(tmp_path):
    path = tmp_path / "resnet.safetensors"
    import timm

    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, str(path))
    with pytest.raises(TransferkitError, match=r"do not fit backbone .*unexpected \(e\.g\."):
        load_backbone(TINY_BACKBONE, weights=path)


def test_weights_config_overrides_and_explicit_overrides_win(tiny_weights, tmp_path):
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"data_config": {"mean": [0.5] * 3, "std": [0.25] * 3}}))
    _, cfg = load_backbone(TINY_BACKBONE, weights=tiny_weights, weights_config=config)
    assert cfg.data_config["mean"] == [0.5] * 3 and cfg.data_config["std"] == [0.25] * 3
    _, cfg = load_backbone(TINY_BACKBONE, weights=tiny_weights, weights_config=config, data_overrides={"img_size": 32})
    assert cfg.data_config["input_size"] == [3, 32, 32] and cfg.data_config["mean"] == [0.5] * 3


def test_weights_dir_is_searched(tiny_weights, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_WEIGHTS_DIR", str(tiny_weights.parent))
    model, cfg = load_backbone(TINY_BACKBONE)
    assert backbone_identity(model)["weights"].startswith("sha256:")
    assert cfg.data_config["input_size"] == [3, TINY_IMG, TINY_IMG]


def test_no_weights_anywhere_fails_fast_with_the_three_ways(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFERKIT_WEIGHTS_DIR", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(TransferkitError) as err:
        load_backbone("resnet18")
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "--weights" in message and "TRANSFERKIT_WEIGHTS_DIR" in message and "hub" in message
    assert "--no-pretrained" in message and "\n" not in message


def test_unknown_backbone_and_bad_data_config():
    with pytest.raises(TransferkitError, match="unknown backbone"):
        load_backbone("not_a_model_xyz", pretrained=False)
    with pytest.raises(TransferkitError, match="unknown data config key"):
        load_backbone(TINY_BACKBONE, pretrained=False, data_overrides={"colour": 1})


def test_backbone_info_reports_size_and_config(tiny_weights):
    info = backbone_info(TINY_BACKBONE, weights=tiny_weights)
    assert info["feature_dim"] == 256 and info["params"] > 10_000
    assert info["data_config"]["interpolation"] in ("bicubic", "bilinear")


ACCEPTABLE = {
    "chelsea_cat.jpg": ("tabby", "tiger cat", "Egyptian cat"),
    "cat_720p.jpg": ("tabby", "tiger cat", "Egyptian cat"),
    "coffee_espresso.jpg": ("espresso", "cup", "coffee mug"),
    "parrot_macaw.jpg": ("macaw",),
    "hot_dog.jpg": ("hotdog",),
    "bird_chickadee.jpg": ("chickadee",),
    "dragonfly.jpg": ("dragonfly",),
    "owl_great_grey.jpg": ("great grey owl",),
}
SIDECARS = {
    "tf_efficientnet_lite0": None,
    # The README of ../shared/weights: these weights need 'same' padding and mean=std=0.5.
    "mobilenetv2_100": {"model_kwargs": {"pad_type": "same"}, "data_config": {"mean": [0.5] * 3, "std": [0.5] * 3}},
}


@pytest.mark.integration
@requires_shared_weights
@pytest.mark.parametrize("name", list(SIDECARS))
def test_real_weights_classify_real_photos(name):
    """The test that proves normalization: every photo has an acceptable ImageNet class in its top 5."""
    from timm.data import ImageNetInfo

    model, preprocessing = load_backbone(name, weights=SHARED_WEIGHTS / f"{name}.safetensors", weights_config=SIDECARS[name])
    model.eval()
    transform = preprocessing.eval_transform()
    info = ImageNetInfo()
    images = sorted(ACCEPTABLE)
    batch = torch.stack([transform(load_image(SHARED_PHOTOS / f, preprocessing.decode_short_side)) for f in images])
    with torch.inference_mode():
        top5 = model(batch).topk(5).indices.numpy()
    for photo, indices in zip(images, top5):
        names = [info.index_to_description(int(i)).lower() for i in indices]
        assert any(ok.lower() in n for n in names for ok in ACCEPTABLE[photo]), (photo, names)


@pytest.mark.integration
@requires_shared_weights
def test_wrong_normalization_is_detectable(tmp_path):
    """ImageNet mean/std on mean=std=0.5 weights changes the logits: the sidecar really matters."""
    model, right = load_backbone("mobilenetv2_100", weights=SHARED_WEIGHTS / "mobilenetv2_100.safetensors")
    bare = tmp_path / "mobilenetv2_100.safetensors"  # the same weights without their sidecar: timm's defaults
    shutil.copyfile(SHARED_WEIGHTS / "mobilenetv2_100.safetensors", bare)
    _, wrong = load_backbone("mobilenetv2_100", weights=bare, pad_type="same")
    assert right.mean == (0.5, 0.5, 0.5) and wrong.mean != right.mean
    image = load_image(SHARED_PHOTOS / "hot_dog.jpg")
    model.eval()
    with torch.inference_mode():
        a = model(right.eval_transform()(image)[None]).softmax(-1).numpy()
        b = model(wrong.eval_transform()(image)[None]).softmax(-1).numpy()
    assert not np.allclose(a, b, atol=1e-3)
