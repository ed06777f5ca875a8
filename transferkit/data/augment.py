"""Training augmentation (albumentations YAML presets or user files) and test-time augmentation.

A pipeline is two parts. The *user part* is any albumentations pipeline in albumentations' own
serialization (``A.to_dict`` / ``A.from_dict``, YAML): the presets in ``recipes/augment/`` or a
user's file passed as ``--aug my.yaml``. The *fixed tail* belongs to the backbone: fit to its input
size, ``Normalize`` with its own mean/std, ``ToTensorV2``. So a YAML never needs the model's size or
statistics: a ``RandomResizedCrop`` / ``RandomSizedCrop`` may omit ``size`` and is re-targeted to the
backbone's input size and interpolation. Without such a crop the image is fitted exactly as at eval
time, so ``--aug none`` trains on the eval preprocessing itself.

With ``--resize-mode squash|letterbox`` the image is first brought into that geometry (at the
enlarged eval size), so training sees the same aspect distortion or padding as evaluation.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import albumentations as A
import numpy as np
import torch
import yaml

from transferkit.choices import AUG_PRESETS, TTA_MODES, TTA_VIEWS, check_choice
from transferkit.errors import TransferkitError
from transferkit.models.preprocessing import (
    build_eval_transform,
    eval_resize,
    input_hw,
    interpolation_flag,
    normalize_to_tensor,
    working_short_side,
)

_SOURCE_RECIPES = Path(__file__).resolve().parents[2] / "recipes"  # a checkout / editable install
_INSTALLED_RECIPES = Path(sys.prefix) / "share" / "transferkit" / "recipes"  # a wheel's data_files
PRESET_DIR = (_SOURCE_RECIPES if _SOURCE_RECIPES.is_dir() else _INSTALLED_RECIPES) / "augment"
SIZED_CROPS = ("RandomResizedCrop", "RandomSizedCrop")  # their output *is* the model input
TAIL_ONLY = ("Normalize", "ToTensorV2")  # added by the fixed tail, from the backbone
PLACEHOLDER_SIZE = [224, 224]  # replaced by the backbone's input size in build_train_transform
MIN_ENLARGE = 1 / 0.875  # five-crop / squash training zoom when the backbone's crop_pct is 1


def preset_path(spec: str | os.PathLike) -> Path:
    """A preset name or a YAML path → the YAML file."""
    if str(spec) in AUG_PRESETS:
        return PRESET_DIR / f"{spec}.yaml"
    path = Path(spec).expanduser()
    if path.suffix.lower() not in (".yaml", ".yml", ".json") or not path.is_file():
        raise TransferkitError(
            f"--aug {spec!r} is neither a preset ({', '.join(AUG_PRESETS)}) nor an existing .yaml/.json file"
        )
    return path


def load_augmentation(spec: str | os.PathLike) -> A.Compose:
    """The user part of a train pipeline from a preset name or an albumentations YAML (or JSON) file."""
    path = preset_path(spec)
    try:
        data = yaml.safe_load(path.read_text())  # JSON is YAML too
    except (OSError, yaml.YAMLError) as exc:
        raise TransferkitError(f"cannot read augmentation file {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("transform"), dict):
        raise TransferkitError(
            f"{path} is not an albumentations pipeline: expected a top-level 'transform:' mapping "
            "(the format A.save(pipeline, path, data_format='yaml') writes)"
        )
    _check_nodes(data["transform"], path)
    try:
        pipeline = A.from_dict(data)
    except (KeyError, ValueError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TransferkitError(f"{path}: invalid albumentations pipeline: {first_line}") from exc
    return pipeline if isinstance(pipeline, A.Compose) else A.Compose([pipeline])


def build_train_transform(data_config: Mapping, aug: str | os.PathLike = "light", resize_mode: str = "crop") -> A.Compose:
    """User augmentation, then the fixed tail: fit to input size, Normalize(backbone mean/std), ToTensorV2."""
    height, width = input_hw(data_config)
    interpolation = interpolation_flag(data_config["interpolation"])
    user = load_augmentation(aug)
    eval_fit = eval_resize(data_config, resize_mode)  # also validates resize_mode
    if _retarget_sized_crops(user, (height, width), interpolation):
        head = [] if resize_mode == "crop" else enlarged_fit(data_config, resize_mode)
        tail = [A.Resize(height, width, interpolation=interpolation)]  # a guarantee; returns the image as is at size
    else:
        head, tail = [], eval_fit
    return A.Compose([*head, user, *tail, *normalize_to_tensor(data_config)])


def enlarged_fit(data_config: Mapping, resize_mode: str = "crop") -> list:
    """The eval fit at size / crop_pct, before any crop: where five-crop views and squash/letterbox training crop from."""
    height, width = input_hw(data_config)
    crop_pct = float(data_config.get("crop_pct", 1.0))
    if resize_mode == "crop" and crop_pct < 1.0:
        return eval_resize(data_config, "crop")[:-1]  # exactly the eval resize, so the centre view is the eval view
    zoom = max(1.0 / crop_pct, MIN_ENLARGE)
    enlarged = {**data_config, "input_size": [3, math.floor(height * zoom), math.floor(width * zoom)], "crop_pct": 1.0}
    steps = eval_resize(enlarged, resize_mode)
    return steps[:-1] if resize_mode == "crop" else steps


class TTATransform:
    """``f(image_uint8_hwc) -> Tensor[K, 3, H, W]``: the views test-time augmentation averages over.

    A class rather than a closure so it pickles into DataLoader workers. Also callable as
    ``f(image=...)`` like an albumentations pipeline, so it drops into :class:`ImageDataset`.
    """

    def __init__(self, data_config: Mapping, resize_mode: str = "crop", mode: str = "none"):
        check_choice("--tta", mode, TTA_MODES)
        self.mode = mode
        self.views = TTA_VIEWS[mode]
        self.crop_hw = input_hw(data_config)
        if mode in ("none", "hflip"):
            self.transform = build_eval_transform(data_config, resize_mode)
        else:
            self.transform = A.Compose([*enlarged_fit(data_config, resize_mode), *normalize_to_tensor(data_config)])

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        tensor = self.transform(image=image)["image"]
        views = tensor[None] if self.mode in ("none", "hflip") else five_crop(tensor, *self.crop_hw)
        if self.mode in ("hflip", "ten-crop"):  # normalisation is per pixel, so flipping after it is exact
            views = torch.cat([views, views.flip(-1)])
        return views


def build_tta_transform(data_config: Mapping, resize_mode: str = "crop", mode: str = "none") -> TTATransform:
    """'none' is exactly the eval transform; hflip adds its mirror; five/ten-crop take corners + centre of the enlarged fit."""
    return TTATransform(data_config, resize_mode, mode)


def five_crop(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's order: top-left, top-right, bottom-left, bottom-right, centre (albumentations' centre rounding)."""
    full_h, full_w = tensor.shape[-2:]
    top, left = (full_h - height) // 2, (full_w - width) // 2
    corners = [(0, 0), (0, full_w - width), (full_h - height, 0), (full_h - height, full_w - width), (top, left)]
    return torch.stack([tensor[..., y:y + height, x:x + width] for y, x in corners])


def tta_predict_proba(predict_proba_tensor: Callable[[torch.Tensor], np.ndarray], batch: torch.Tensor) -> np.ndarray:
    """Probabilities averaged over views for a ``[B, K, 3, H, W]`` batch (a plain ``[B, 3, H, W]`` passes through)."""
    if batch.ndim == 4:
        return predict_proba_tensor(batch)
    n, views = batch.shape[:2]
    probs = predict_proba_tensor(batch.flatten(0, 1))
    return probs.reshape(n, views, -1).mean(axis=1)


def denormalize(tensor: torch.Tensor, data_config: Mapping) -> np.ndarray:
    """A normalised CHW tensor back to a displayable HWC uint8 image."""
    mean = torch.tensor(data_config["mean"], dtype=tensor.dtype).view(-1, 1, 1)
    std = torch.tensor(data_config["std"], dtype=tensor.dtype).view(-1, 1, 1)
    image = (tensor * std + mean).clamp(0, 1).mul(255).round().byte()
    return image.permute(1, 2, 0).numpy()


def preview_grid(index_or_path, aug: str | os.PathLike, data_config: Mapping, n: int = 16, seed: int = 0,
                 out: str | os.PathLike = "augment_preview.png", resize_mode: str = "crop") -> Path:
    """A PNG grid of ``n`` augmented training samples captioned with their class, to eyeball a pipeline."""
    from PIL import Image

    from transferkit.core.fileio import atomic_path
    from transferkit.data.decode import load_image
    from transferkit.data.discover import DatasetIndex, discover

    if n < 1:
        raise TransferkitError(f"-n must be at least 1, got {n}")
    index = index_or_path if isinstance(index_or_path, DatasetIndex) else discover(index_or_path, val_ratio=0.0)
    samples = index.split("train") or index.samples
    transform = build_train_transform(data_config, aug, resize_mode)
    transform.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(samples), size=n, replace=len(samples) < n)
    short_side = working_short_side(data_config, resize_mode)
    tiles = []
    for i in picks:
        sample = samples[int(i)]
        image = transform(image=load_image(sample.path, short_side))["image"]
        tiles.append((Image.fromarray(denormalize(image, data_config)), index.classes[sample.label]))
    canvas = _grid(tiles)
    with atomic_path(out) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(out)


def _grid(tiles: list, min_tile: int = 160, caption: int = 18, gap: int = 4):
    from PIL import Image, ImageDraw, ImageFont

    columns = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    width, height = tiles[0][0].size
    zoom = max(1, math.ceil(min_tile / max(width, height)))  # tiny inputs are enlarged so captions fit
    cell_w, cell_h = width * zoom, height * zoom + caption
    canvas = Image.new("RGB", (columns * (cell_w + gap) + gap, rows * (cell_h + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=caption - 4)
    for k, (tile, label) in enumerate(tiles):
        x, y = gap + (k % columns) * (cell_w + gap), gap + (k // columns) * (cell_h + gap)
        canvas.paste(tile.resize((cell_w, height * zoom), Image.NEAREST), (x, y + caption))
        draw.text((x + 2, y + 1), label, fill=(0, 0, 0), font=font)
    return canvas


def _check_nodes(node: dict, path: Path) -> None:
    """Refuse what would silently misbehave: a missing p (albumentations assumes 0.5), a Normalize of the user's own."""
    name = node.get("__class_fullname__", "?")
    short = name.rsplit(".", 1)[-1]
    if short in TAIL_ONLY:
        raise TransferkitError(
            f"{path}: remove {short}; transferkit appends Normalize with the backbone's own mean/std and ToTensorV2"
        )
    if "p" not in node:
        raise TransferkitError(f"{path}: {short} has no 'p'; state its probability (p: 1.0 to always apply it)")
    if short in SIZED_CROPS:
        node.setdefault("size", PLACEHOLDER_SIZE)
    for child in node.get("transforms", []) or []:
        if not isinstance(child, dict):
            raise TransferkitError(f"{path}: every entry under 'transforms' of {short} must be a mapping")
        _check_nodes(child, path)


def _retarget_sized_crops(pipeline, size: tuple[int, int], interpolation: int) -> int:
    """Point every RandomResizedCrop-like step at the backbone's input size and interpolation; returns how many."""
    count = 0
    for transform in getattr(pipeline, "transforms", []):
        if type(transform).__name__ in SIZED_CROPS:
            transform.size = size
            transform.interpolation = interpolation
            count += 1
        count += _retarget_sized_crops(transform, size, interpolation)
    return count


__all__ = [
    "TTATransform", "build_train_transform", "build_tta_transform", "denormalize",
    "enlarged_fit", "five_crop", "load_augmentation", "preview_grid", "tta_predict_proba",
]
