"""Augmentation presets and user YAML, the fixed train tail, TTA views, eval parity with saved models, preview."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from transferkit.choices import AUG_PRESETS, TTA_MODES
from transferkit.data.augment import (
    build_train_transform,
    build_tta_transform,
    denormalize,
    load_augmentation,
    preview_grid,
    tta_predict_proba,
)
from transferkit.errors import TransferkitError
from transferkit.models.preprocessing import build_eval_transform

# Deliberately not ImageNet statistics and not square, so a hard-coded mean/std or size would show.
CONFIG = {"input_size": [3, 48, 64], "interpolation": "bicubic", "mean": [0.2, 0.4, 0.6], "std": [0.1, 0.2, 0.3],
          "crop_pct": 0.875, "crop_mode": "center"}
SQUARE = {**CONFIG, "input_size": [3, 64, 64]}


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)


def _uniform(value):
    return np.full((70, 90, 3), value, dtype=np.uint8)


@pytest.mark.parametrize("preset", AUG_PRESETS)
@pytest.mark.parametrize("resize_mode", ["crop", "squash", "letterbox"])
def test_presets_give_input_sized_tensors_normalised_with_the_backbone_stats(preset, resize_mode, photo):
    transform = build_train_transform(CONFIG, preset, resize_mode)
    assert isinstance(transform, A.Compose)
    assert [type(t).__name__ for t in transform.transforms[-2:]] == ["Normalize", "ToTensorV2"]
    for seed in range(3):
        transform.set_random_seed(seed)
        out = transform(image=photo)["image"]
        assert out.shape == (3, 48, 64) and out.dtype == torch.float32
    # a uniform grey stays grey through geometry; its value is (v/255 - mean) / std per channel
    plain = build_train_transform(CONFIG, preset if preset in ("none", "light") else "light", resize_mode)
    plain.set_random_seed(0)
    grey = plain(image=_uniform(128))["image"]
    expected = (128 / 255 - torch.tensor(CONFIG["mean"])) / torch.tensor(CONFIG["std"])
    assert torch.allclose(grey[:, 20, 30], expected, atol=1e-5)


def test_none_preset_is_exactly_the_eval_transform(photo):
    for mode in ("crop", "squash", "letterbox"):
        train = build_train_transform(CONFIG, "none", mode)(image=photo)["image"]
        assert torch.equal(train, build_eval_transform(CONFIG, mode)(image=photo)["image"])


def test_presets_state_every_probability_and_actually_augment(photo):
    import warnings

    for preset in AUG_PRESETS:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # albumentations warns when it has to assume p=0.5
            load_augmentation(preset)
    transform = build_train_transform(CONFIG, "heavy")
    views = []
    for seed in range(4):
        transform.set_random_seed(seed)
        views.append(transform(image=photo)["image"])
    assert not all(torch.equal(views[0], v) for v in views[1:])


def test_user_yaml_round_trips_and_its_crop_size_comes_from_the_backbone(tmp_path, photo):
    user = A.Compose([A.RandomResizedCrop(size=(999, 999), scale=(0.6, 1.0), p=1.0), A.VerticalFlip(p=1.0),
                      A.ToGray(p=1.0)])
    path = tmp_path / "my_aug.yaml"
    A.save(user, str(path), data_format="yaml")
    loaded = load_augmentation(path)
    assert A.to_dict(loaded) == A.to_dict(user)
    transform = build_train_transform(CONFIG, path)
    out = transform(image=photo)["image"]
    assert out.shape == (3, 48, 64)
    grey = out * torch.tensor(CONFIG["std"]).view(3, 1, 1) + torch.tensor(CONFIG["mean"]).view(3, 1, 1)
    assert torch.allclose(grey[0], grey[1], atol=1e-5)  # ToGray from the file ran
    assert load_augmentation(path).transforms[0].size == (999, 999)  # the file itself is not modified


def test_handwritten_yaml_may_omit_the_crop_size(tmp_path, photo):
    path = tmp_path / "short.yml"
    path.write_text(yaml.safe_dump({"transform": {"__class_fullname__": "Compose", "p": 1.0, "transforms": [
        {"__class_fullname__": "RandomResizedCrop", "scale": [0.5, 1.0], "p": 1.0}]}}))
    assert build_train_transform(SQUARE, path)(image=photo)["image"].shape == (3, 64, 64)


@pytest.mark.parametrize(("content", "message"), [
    ({"transform": {"__class_fullname__": "Compose", "p": 1.0, "transforms": [
        {"__class_fullname__": "HorizontalFlip"}]}}, "has no 'p'"),
    ({"transform": {"__class_fullname__": "Compose", "p": 1.0, "transforms": [
        {"__class_fullname__": "Normalize", "p": 1.0}]}}, "remove Normalize"),
    ({"transform": {"__class_fullname__": "Compose", "p": 1.0, "transforms": [
        {"__class_fullname__": "NoSuchTransform", "p": 1.0}]}}, "invalid albumentations pipeline"),
    ({"transforms": []}, "top-level 'transform:'"),
])
def test_bad_user_yaml_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(TransferkitError, match=message):
        load_augmentation(path)


def test_unknown_aug_and_resize_mode_are_refused():
    with pytest.raises(TransferkitError, match="neither a preset"):
        load_augmentation("extreme")
    with pytest.raises(TransferkitError, match="resize mode"):
        build_train_transform(CONFIG, "light", "stretch")
    with pytest.raises(TransferkitError, match="--tta"):
        build_tta_transform(CONFIG, "crop", "twenty-crop")


@pytest.mark.parametrize("mode", TTA_MODES)
@pytest.mark.parametrize("resize_mode", ["crop", "squash", "letterbox"])
def test_tta_modes_give_the_right_number_of_views(mode, resize_mode, photo):
    views = build_tta_transform(CONFIG, resize_mode, mode)(photo)
    assert views.shape == ({"none": 1, "hflip": 2, "five-crop": 5, "ten-crop": 10}[mode], 3, 48, 64)


def test_tta_views_are_the_eval_view_its_mirror_and_distinct_crops(photo):
    eval_view = build_eval_transform(SQUARE, "crop")(image=photo)["image"]
    assert torch.equal(build_tta_transform(SQUARE, "crop", "none")(photo)[0], eval_view)
    flips = build_tta_transform(SQUARE, "crop", "hflip")(photo)
    assert torch.equal(flips[0], eval_view) and torch.equal(flips[1], eval_view.flip(-1))
    ten = build_tta_transform(SQUARE, "crop", "ten-crop")(photo)
    assert torch.equal(ten[4], eval_view)  # the centre crop of the eval resize is the eval view
    assert len({v.numpy().tobytes() for v in ten}) == 10
    assert torch.equal(ten[5:], ten[:5].flip(-1))


def test_tta_predict_proba_averages_views():
    batch = torch.arange(2 * 3, dtype=torch.float32).view(2, 3, 1, 1, 1).expand(2, 3, 3, 2, 2)

    def probs(x):  # "probability" of class 0 = the view's pixel value
        v = x[:, 0, 0, 0].numpy()
        return np.stack([v, -v], axis=1)

    assert np.allclose(tta_predict_proba(probs, batch)[:, 0], [1.0, 4.0])


def test_eval_preprocessing_equals_the_saved_models(tmp_path, tiny_weights, photo):
    from transferkit.models.backbones import load_backbone
    from transferkit.models.predictors import load_predictor
    from transferkit.models.saved_model import checkpoint_metadata, save_checkpoint

    model, data_config = load_backbone("test_efficientnet", weights=tiny_weights, num_classes=2)
    for resize_mode in ("crop", "letterbox"):
        stem = tmp_path / resize_mode / "best"
        stem.parent.mkdir()
        save_checkpoint(stem, model, checkpoint_metadata(model, kind="classifier", class_names=["a", "b"],
                                                         data_config=data_config, resize_mode=resize_mode))
        predictor = load_predictor(stem.parent)
        saved = predictor.eval_transform()(image=photo)["image"]
        assert torch.equal(saved, build_eval_transform(data_config, resize_mode)(image=photo)["image"])
        assert torch.equal(saved, build_tta_transform(predictor.data_config, predictor.resize_mode, "none")(photo)[0])


def test_preview_grid_writes_a_png_with_one_tile_per_sample(tiny_data, tmp_path):
    out = preview_grid(tiny_data, "heavy", SQUARE, n=5, seed=1, out=tmp_path / "grid.png")
    with Image.open(out) as img:
        assert img.format == "PNG"
        # 5 tiles → 3 columns x 2 rows of 64 px inputs shown at 192 px + caption strip
        assert img.width > 3 * 192 and img.height > 2 * 192
    again = preview_grid(tiny_data, "heavy", SQUARE, n=5, seed=1, out=tmp_path / "again.png")
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_denormalize_inverts_normalisation():
    image = _uniform(200)[:48, :64]
    tensor = build_eval_transform({**CONFIG, "crop_pct": 1.0}, "squash")(image=image)["image"]
    assert np.abs(denormalize(tensor, CONFIG).astype(int) - 200).max() <= 1


def test_augment_preview_cli_writes_a_png(runner, tiny_data, tiny_weights, tmp_path):
    from transferkit.cli import main

    out = tmp_path / "preview.png"
    result = runner.invoke(main, ["augment", "preview", "--data", str(tiny_data), "--aug", "medium", "-n", "4",
                                  "--out", str(out), "--backbone", "test_efficientnet", "--weights", str(tiny_weights)])
    assert result.exit_code == 0, result.output
    assert "64x64" in result.output
    with Image.open(out) as img:
        assert img.format == "PNG"
    bad = runner.invoke(main, ["augment", "preview", "--data", str(tiny_data), "--aug", "nope",
                               "--out", str(tmp_path / "x.png"), "--backbone", "test_efficientnet"])
    assert bad.exit_code != 0 and "error: --aug 'nope'" in bad.output
    assert not (tmp_path / "x.png").exists()


def test_augment_show_cli_prints_a_loadable_preset(runner, tmp_path):
    from transferkit.cli import main

    result = runner.invoke(main, ["augment", "show", "medium"])
    assert result.exit_code == 0, result.output
    copy = tmp_path / "mine.yaml"
    copy.write_text(result.output)
    assert A.to_dict(load_augmentation(copy)) == A.to_dict(load_augmentation("medium"))
