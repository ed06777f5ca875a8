"""Augmentation presets and user YAML (package data), and the preview grid of what training sees.

The fit of an augmented image to the model input is the Preprocessing's: see tests/test_preprocessing.py.
"""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
import yaml
from conftest import DATA_CONFIG, SQUARE_DATA_CONFIG
from PIL import Image

from transferkit.choices import AUG_PRESETS
from transferkit.data.augment import load_augmentation
from transferkit.data.decode import load_image
from transferkit.errors import TransferkitError
from transferkit.models.preprocessing import Preprocessing
from transferkit.reports.plots import augmentation_preview_png


def test_presets_state_every_probability_and_actually_augment(photo):
    import warnings

    for preset in AUG_PRESETS:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # albumentations warns when it has to assume p=0.5
            load_augmentation(preset)
    transform = Preprocessing.resolve(DATA_CONFIG).train_transform("heavy")
    views = []
    for seed in range(4):
        transform.set_random_seed(seed)
        views.append(transform(photo))
    assert not all(torch.equal(views[0], v) for v in views[1:])


def test_user_yaml_round_trips_and_its_crop_size_comes_from_the_backbone(tmp_path, photo):
    user = A.Compose([A.RandomResizedCrop(size=(999, 999), scale=(0.6, 1.0), p=1.0), A.VerticalFlip(p=1.0),
                      A.ToGray(p=1.0)])
    path = tmp_path / "my_aug.yaml"
    A.save(user, str(path), data_format="yaml")
    loaded = load_augmentation(path)
    assert A.to_dict(loaded) == A.to_dict(user)
    out = Preprocessing.resolve(DATA_CONFIG).train_transform(path)(photo)
    assert out.shape == (3, 48, 64)
    grey = out * torch.tensor(DATA_CONFIG["std"]).view(3, 1, 1) + torch.tensor(DATA_CONFIG["mean"]).view(3, 1, 1)
    assert torch.allclose(grey[0], grey[1], atol=1e-5)  # ToGray from the file ran
    assert load_augmentation(path).transforms[0].size == (999, 999)  # the file itself is not modified


def test_handwritten_yaml_may_omit_the_crop_size(tmp_path, photo):
    path = tmp_path / "short.yml"
    path.write_text(yaml.safe_dump({"transform": {"__class_fullname__": "Compose", "p": 1.0, "transforms": [
        {"__class_fullname__": "RandomResizedCrop", "scale": [0.5, 1.0], "p": 1.0}]}}))
    assert Preprocessing.resolve(SQUARE_DATA_CONFIG).train_transform(path)(photo).shape == (3, 64, 64)


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


def test_unknown_aug_is_refused():
    with pytest.raises(TransferkitError, match="neither a preset"):
        load_augmentation("extreme")


def test_preview_grid_puts_each_original_beside_its_augmented_versions(tiny_data, tmp_path):
    square = Preprocessing.resolve(SQUARE_DATA_CONFIG)
    out = augmentation_preview_png(tiny_data, "heavy", square, tmp_path / "grid.png", n=5, seed=1, versions=4)
    with Image.open(out) as img:
        assert img.format == "PNG"
        # 5 augmented → 2 originals: rows of 1 + 4 and 1 + 1 tiles of 64 px inputs shown at 192 px + captions
        assert 5 * 192 < img.width < 6 * 192 and 2 * 192 < img.height < 3 * 192
        grid = np.asarray(img.convert("RGB"))
    rows = [slice(4 + 18, 4 + 18 + 192), slice(4 + 192 + 18 + 4 + 18, 4 + 2 * (192 + 18) + 4)]
    first = grid[rows[0], 4:4 + 192]
    # the first tile of a row is an original as validation sees it (the eval transform, no augmentation) ...
    plain = square.eval_transform()
    originals = [np.asarray(Image.fromarray(square.denormalize(plain(load_image(path, square.decode_short_side))))
                            .resize((192, 192), Image.NEAREST)) for path in sorted(tiny_data.rglob("*")) if path.is_file()]
    assert any(np.array_equal(first, original) for original in originals)
    # ... and the tiles beside it are augmented draws of it, none equal to an original
    for column in range(1, 5):
        x = 4 + column * (192 + 4) + 8
        assert not any(np.array_equal(grid[rows[0], x:x + 192], original) for original in originals)
    assert (grid[rows[1], 2 * (192 + 4) + 8 + 50] == 255).all()  # the short second row: 1 + 1 tiles, then blank
    again = augmentation_preview_png(tiny_data, "heavy", square, tmp_path / "again.png", n=5, seed=1, versions=4)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


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
    assert bad.exit_code == 2 and bad.output.strip().splitlines()[-1].startswith("error: --aug 'nope'")
    assert not (tmp_path / "x.png").exists()
    mine = tmp_path / "holiday.png"
    mine.write_bytes(b"a user's photo")
    refused = runner.invoke(main, ["augment", "preview", "--data", str(tiny_data), "--out", str(mine),
                                   "--backbone", "test_efficientnet", "--weights", str(tiny_weights)])
    assert refused.exit_code == 2 and "already exists and is not an earlier figure" in refused.output
    assert mine.read_bytes() == b"a user's photo"


def test_augment_show_cli_prints_a_loadable_preset(runner, tmp_path):
    from transferkit.cli import main

    result = runner.invoke(main, ["augment", "show", "medium"])
    assert result.exit_code == 0, result.output
    copy = tmp_path / "mine.yaml"
    copy.write_text(result.output)
    assert A.to_dict(load_augmentation(copy)) == A.to_dict(load_augmentation("medium"))
