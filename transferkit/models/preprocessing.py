"""Preprocessing built from a backbone's data config, with albumentations.

The eval transform here is the single definition used by validation, evaluate, predict, feature
extraction, export checks and the MLflow model, so they all see byte-for-byte the same tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from transferkit.choices import RESIZE_MODES, check_choice
from transferkit.errors import TransferkitError

INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
    "area": cv2.INTER_AREA,
}


def interpolation_flag(name: str) -> int:
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        raise TransferkitError(f"unknown interpolation {name!r}; use one of {', '.join(INTERPOLATIONS)}") from None


def input_hw(data_config: Mapping) -> tuple[int, int]:
    _, height, width = data_config["input_size"]
    return int(height), int(width)


def working_short_side(data_config: Mapping, resize_mode: str = "crop") -> int:
    """The smallest short side a decoded image needs before the eval resize (used for draft decode)."""
    height, width = input_hw(data_config)
    crop_pct = data_config.get("crop_pct", 1.0) if resize_mode == "crop" else 1.0
    return int(math.floor(min(height, width) / crop_pct))


def eval_resize(data_config: Mapping, resize_mode: str = "crop") -> list:
    """Resize steps (no normalization) that bring an image to the model's input size at eval time."""
    check_choice("resize mode", resize_mode, RESIZE_MODES)
    height, width = input_hw(data_config)
    interpolation = interpolation_flag(data_config["interpolation"])
    if resize_mode == "squash":
        return [A.Resize(height, width, interpolation=interpolation)]
    if resize_mode == "letterbox":
        fill = tuple(int(round(m * 255)) for m in data_config["mean"])
        return [
            A.LongestMaxSize(max_size_hw=(height, width), interpolation=interpolation),
            A.PadIfNeeded(height, width, border_mode=cv2.BORDER_CONSTANT, fill=fill, position="center"),
        ]
    crop_pct = float(data_config.get("crop_pct", 1.0))
    if height == width:
        resize = A.SmallestMaxSize(max_size=int(math.floor(height / crop_pct)), interpolation=interpolation)
    else:
        resize = A.Resize(int(math.floor(height / crop_pct)), int(math.floor(width / crop_pct)), interpolation=interpolation)
    return [resize, A.CenterCrop(height, width)]


def normalize_to_tensor(data_config: Mapping) -> list:
    """The backbone's own mean/std, then CHW float tensor."""
    return [A.Normalize(mean=data_config["mean"], std=data_config["std"], max_pixel_value=255.0), ToTensorV2()]


def build_eval_transform(data_config: Mapping, resize_mode: str = "crop") -> A.Compose:
    """timm's eval convention (resize to size / crop_pct, centre crop) or squash / letterbox for wide frames."""
    return A.Compose([*eval_resize(data_config, resize_mode), *normalize_to_tensor(data_config)])
