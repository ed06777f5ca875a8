"""The Preprocessing object: resolved once, saved with every model, and the one source of every transform.

Parity: the eval transform must give the features timm's own eval transform gives for the same data config
(``timm.data.create_transform(**data_config, is_training=False)`` on a fully decoded PIL image).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import (
    DATA_CONFIG,
    SHARED_ROADS,
    SHARED_WEIGHTS,
    SQUARE_DATA_CONFIG,
    requires_shared_roads,
    requires_shared_weights,
)
from PIL import Image

from transferkit.choices import AUG_PRESETS, RESIZE_MODES, TTA_MODES
from transferkit.data.decode import load_image
from transferkit.errors import TransferkitError
from transferkit.models.preprocessing import Preprocessing


def _timm_eval(preprocessing: Preprocessing):
    from timm.data import create_transform

    return create_transform(**preprocessing.data_config, is_training=False)


def test_resize_modes_map_onto_timms_crop_mode():
    assert [Preprocessing.resolve(DATA_CONFIG, mode).crop_mode for mode in RESIZE_MODES] == ["center", "squash", "border"]
    assert Preprocessing.resolve(DATA_CONFIG).resize_mode == "crop"  # None: the config's own mode
    own_squash = Preprocessing.resolve({**DATA_CONFIG, "crop_mode": "squash", "crop_pct": 0.95})
    assert (own_squash.resize_mode, own_squash.crop_pct) == ("squash", 0.95)  # a backbone's own mode, as timm has it
    # squash / letterbox chosen over the backbone's centre crop keep the whole frame
    assert Preprocessing.resolve(DATA_CONFIG, "letterbox").crop_pct == 1.0
    assert Preprocessing.resolve(DATA_CONFIG, "crop").crop_pct == 0.875
    with pytest.raises(TransferkitError, match="unknown resize mode 'stretch'"):
        Preprocessing.resolve(DATA_CONFIG, "stretch")
    with pytest.raises(TransferkitError, match="3 positive stds"):
        Preprocessing.resolve({**DATA_CONFIG, "std": [0.1, 0.0, 0.3]})


def test_metadata_round_trip_and_older_checkpoints():
    for mode in RESIZE_MODES:
        preprocessing = Preprocessing.resolve(DATA_CONFIG, mode)
        assert Preprocessing.from_metadata(preprocessing.to_metadata()) == preprocessing
        # a checkpoint written before the Preprocessing object: data_config + resize_mode
        assert Preprocessing.from_metadata({"data_config": DATA_CONFIG, "resize_mode": mode}) == preprocessing
    assert Preprocessing.from_metadata({"data_config": DATA_CONFIG}).resize_mode == "crop"


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in grey levels, for uint8 pixels."""
    return (a.int() - b.int()).abs()


def _timm_pixels(preprocessing: Preprocessing, image) -> torch.Tensor:
    """timm's eval steps up to (not including) ToTensor + Normalize, as uint8 CHW."""
    from torchvision import transforms

    geometry = transforms.Compose(_timm_eval(preprocessing).transforms[:-2])
    return torch.from_numpy(np.array(geometry(image))).permute(2, 0, 1)


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_eval_transform_is_timms_own(mode, photo):
    """The fused resize gives timm's pixels within 2 grey levels (float box coordinates), and the normalisation is
    timm's ToTensor + Normalize bit for bit."""
    from torchvision import transforms

    preprocessing = Preprocessing.resolve(DATA_CONFIG, mode)
    transform = preprocessing.eval_transform()
    ours = transform(photo)
    assert ours.shape == (3, 48, 64) and ours.dtype == torch.float32
    pixels = transform.pixels(photo)
    reference = _timm_pixels(preprocessing, Image.fromarray(photo))
    assert pixels.dtype == torch.uint8 and _levels(pixels, reference).max() <= 2
    assert (_levels(pixels, reference) == 0).float().mean() > 0.9
    tail = transforms.Compose(_timm_eval(preprocessing).transforms[-2:])
    assert torch.equal(ours, tail(Image.fromarray(pixels.permute(1, 2, 0).numpy())))


@pytest.mark.parametrize("mode", ["center", "squash", "border"])
def test_the_fused_geometry_is_timms_for_any_frame_and_input_shape(mode):
    """Square and non-square inputs, crop_pct < 1 and 1, frames smaller (padded, enlarged) and larger than the input."""
    rng = np.random.default_rng(0)
    for input_hw in ((48, 48), (40, 56), (56, 40)):
        for crop_pct in (0.875, 1.0):
            preprocessing = Preprocessing.resolve({**DATA_CONFIG, "input_size": [3, *input_hw], "crop_pct": crop_pct,
                                                   "crop_mode": mode})
            transform = preprocessing.eval_transform()
            assert transform.plan is not None  # timm's steps are ones the plan knows
            exact = replace(transform.plan, reducing_gap=None)  # the default box-reduces a 6x+ downscale first
            transform.plan = exact
            for _ in range(6):
                width, height = (int(v) for v in rng.integers(20, 300, 2))
                y, x = np.mgrid[0:height, 0:width]
                image = (127 + 120 * np.sin(x[..., None] / 9 + y[..., None] / 13 + np.arange(3))).astype(np.uint8)
                reference = _timm_pixels(preprocessing, Image.fromarray(image))
                pixels = transform.pixels(image)
                assert pixels.shape == reference.shape == (3, *input_hw), (width, height)
                assert _levels(pixels, reference).max() <= 2, (width, height)


def test_a_large_downscale_is_box_reduced_first_within_a_grey_level():
    preprocessing = Preprocessing.resolve(SQUARE_DATA_CONFIG)
    y, x = np.mgrid[0:600, 0:800]
    image = (127 + 120 * np.sin(x[..., None] / 40 + y[..., None] / 55 + np.arange(3))).astype(np.uint8)
    reduced = preprocessing.eval_transform()
    exact = preprocessing.eval_transform()
    exact.plan = replace(exact.plan, reducing_gap=None)
    difference = _levels(reduced.pixels(image), exact.pixels(image))
    assert 0 < difference.float().mean() < 1


def test_a_draft_decoded_jpeg_is_cut_where_a_full_decode_is(tmp_path):
    """Odd frame sizes: the draft's own size rounds timm's resize differently (a one-pixel shift of the crop);
    planning on the full-resolution size keeps the crop where timm puts it."""
    from transferkit.data.decode import load_scaled

    preprocessing = Preprocessing.resolve(SQUARE_DATA_CONFIG)
    y, x = np.mgrid[0:757, 0:1003]
    image = (127 + 120 * np.sign(np.sin(x[..., None] / 6.0 + y[..., None] / 50.0 + np.arange(3)))).astype(np.uint8)
    path = tmp_path / "odd.jpg"
    Image.fromarray(image).save(path, quality=95)
    scaled = load_scaled(path, preprocessing.decode_short_side)
    assert scaled.full_size == (1003, 757) and scaled.scale > 1
    assert scaled.image.size == (-(-1003 // scaled.scale), -(-757 // scaled.scale))
    reference = _timm_pixels(preprocessing, Image.open(path).convert("RGB"))
    transform = preprocessing.eval_transform()
    planned_on_full = _levels(transform.pixels(scaled), reference).float().mean()
    planned_on_draft = _levels(transform.pixels(scaled.array()), reference).float().mean()
    assert planned_on_full < planned_on_draft


def test_full_scale_jpegs_decode_as_pil_does_exif_and_grey_included(tmp_path):
    """Full-scale JPEGs go through torchvision's decode_jpeg: the same pixels and orientation as PIL's decode."""
    from PIL import ImageOps

    from transferkit.data.decode import load_scaled

    rng = np.random.default_rng(2)
    colour = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    exif = colour.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: stored 80x60, shown 60x80
    colour.save(tmp_path / "rotated.jpg", quality=90, exif=exif)
    Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8)).save(tmp_path / "grey.jpg", quality=90)
    for name in ("rotated.jpg", "grey.jpg"):
        scaled = load_scaled(tmp_path / name)
        expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / name)).convert("RGB"))
        assert scaled.scale == 1 and scaled.full_size == (expected.shape[1], expected.shape[0])
        np.testing.assert_array_equal(scaled.array(), expected)
    assert load_scaled(tmp_path / "rotated.jpg").full_size == (60, 80)


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_feature_parity_with_timm_including_the_draft_decode(mode, tmp_path, tiny_weights):
    """A tiny model's features of large generated JPEGs: draft-decoded + ours vs full decode + timm's."""
    from transferkit.models.backbones import load_backbone

    model, preprocessing = load_backbone("test_efficientnet", weights=tiny_weights, num_classes=0, resize_mode=mode)
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:600, 0:900].astype(np.float32)
    paths = []
    for i in range(4):  # smooth photo-like content: noise would not survive any resize
        phase = rng.uniform(0, 6, 3)
        image = 127 + 120 * np.sin(x[..., None] / (20 + 15 * i) + y[..., None] / 37 + phase)
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(image.astype(np.uint8)).save(paths[-1], quality=92)
    ours = torch.stack([preprocessing.eval_transform()(load_image(p, preprocessing.decode_short_side)) for p in paths])
    assert load_image(paths[0], preprocessing.decode_short_side).shape[0] < 600  # the draft decode did happen
    reference = torch.stack([_timm_eval(preprocessing)(Image.open(p).convert("RGB")) for p in paths])
    with torch.inference_mode():
        cosine = torch.nn.functional.cosine_similarity(model.eval()(ours), model(reference))
    assert cosine.mean() >= 0.999, cosine


@pytest.mark.parametrize("preset", AUG_PRESETS)
@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_train_transforms_give_input_sized_tensors_normalised_with_the_backbone_stats(preset, mode, photo):
    preprocessing = Preprocessing.resolve(DATA_CONFIG, mode)
    transform = preprocessing.train_transform(preset)
    for seed in range(2):
        transform.set_random_seed(seed)
        out = transform(photo)
        assert out.shape == (3, 48, 64) and out.dtype == torch.float32
    # a uniform grey stays grey through geometry; its value is (v/255 - mean) / std per channel
    plain = preprocessing.train_transform(preset if preset in ("none", "light") else "light")
    plain.set_random_seed(0)
    grey = plain(np.full((70, 90, 3), 128, dtype=np.uint8))
    expected = (128 / 255 - torch.tensor(DATA_CONFIG["mean"])) / torch.tensor(DATA_CONFIG["std"])
    assert torch.allclose(grey[:, 20, 30], expected, atol=1e-5)


def test_none_preset_is_exactly_the_eval_transform(photo):
    for mode in RESIZE_MODES:
        preprocessing = Preprocessing.resolve(DATA_CONFIG, mode)
        assert torch.equal(preprocessing.train_transform("none")(photo), preprocessing.eval_transform()(photo))


@pytest.mark.parametrize("tta", TTA_MODES)
@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_tta_modes_give_the_right_number_of_views(tta, mode, photo):
    views = Preprocessing.resolve(DATA_CONFIG, mode).tta_views(tta)(photo)
    assert views.shape == ({"none": 1, "hflip": 2, "five-crop": 5, "ten-crop": 10}[tta], 3, 48, 64)


def test_tta_views_are_the_eval_view_its_mirror_and_distinct_crops(photo):
    preprocessing = Preprocessing.resolve(SQUARE_DATA_CONFIG)
    eval_view = preprocessing.eval_transform()(photo)
    assert torch.equal(preprocessing.tta_views("none")(photo)[0], eval_view)
    flips = preprocessing.tta_views("hflip")(photo)
    assert torch.equal(flips[0], eval_view) and torch.equal(flips[1], eval_view.flip(-1))
    ten = preprocessing.tta_views("ten-crop")(photo)
    std = torch.tensor(SQUARE_DATA_CONFIG["std"]).view(3, 1, 1)
    assert ((ten[4] - eval_view) * std * 255).abs().max() <= 2.01  # the centre crop of the eval resize: the eval view
    assert len({v.numpy().tobytes() for v in ten}) == 10
    assert torch.equal(ten[5:], ten[:5].flip(-1))
    with pytest.raises(TransferkitError, match="--tta"):
        preprocessing.tta_views("twenty-crop")


def test_denormalize_inverts_normalisation():
    preprocessing = Preprocessing.resolve(DATA_CONFIG, "squash")
    tensor = preprocessing.eval_transform()(np.full((48, 64, 3), 200, dtype=np.uint8))
    assert np.abs(preprocessing.denormalize(tensor).astype(int) - 200).max() <= 1


def test_export_steps_name_timms_steps():
    steps = Preprocessing.resolve(SQUARE_DATA_CONFIG, "letterbox").export_steps()
    assert steps[0].startswith("ResizeKeepRatio(") and steps[1].startswith("CenterCropOrPad(")
    assert steps[-1] == "Normalize(mean=[0.2, 0.4, 0.6], std=[0.1, 0.2, 0.3])"


def test_saved_models_restore_their_preprocessing(tmp_path, tiny_weights, photo):
    from transferkit.models.backbones import load_backbone
    from transferkit.models.predictors import load_predictor
    from transferkit.models.saved_model import checkpoint_metadata, read_checkpoint_metadata, save_checkpoint

    for mode in ("crop", "letterbox"):
        model, preprocessing = load_backbone("test_efficientnet", weights=tiny_weights, num_classes=2, resize_mode=mode)
        stem = tmp_path / mode / "best"
        stem.parent.mkdir()
        path = save_checkpoint(stem, model, checkpoint_metadata(model, kind="classifier", class_names=["a", "b"],
                                                                preprocessing=preprocessing))
        assert "data_config" not in read_checkpoint_metadata(path)  # held once, as "preprocessing"
        predictor = load_predictor(stem.parent)
        assert predictor.preprocessing == preprocessing
        assert torch.equal(predictor.preprocessing.eval_transform()(photo), preprocessing.eval_transform()(photo))
        # finetuning from the checkpoint keeps its resize mode unless told otherwise
        assert load_backbone("test_efficientnet", weights=path, num_classes=2)[1].resize_mode == mode


@pytest.mark.slow
@pytest.mark.integration
@requires_shared_weights
@requires_shared_roads
@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_real_features_match_timms_eval_transform_on_roads(mode):
    """tf_efficientnet_lite0 on the 89 road frames (up to 1280x960): mean cosine >= 0.999 with the draft decode."""
    from transferkit.models.embedding import build_feature_model

    model, preprocessing = build_feature_model("tf_efficientnet_lite0", resize_mode=mode,
                                               weights=SHARED_WEIGHTS / "tf_efficientnet_lite0.safetensors")
    paths = sorted(SHARED_ROADS.rglob("*.jpg"))
    model.eval()
    cosines = []
    with torch.inference_mode():
        for start in range(0, len(paths), 16):
            chunk = paths[start:start + 16]
            ours = next(iter(preprocessing.batches(chunk, len(chunk))))
            reference = torch.stack([_timm_eval(preprocessing)(Image.open(p).convert("RGB")) for p in chunk])
            cosines.append(torch.nn.functional.cosine_similarity(model(ours), model(reference)))
    assert torch.cat(cosines).mean() >= 0.999
