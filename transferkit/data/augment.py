"""Training augmentation: albumentations YAML presets (package data) and user files.

An augmentation is any albumentations pipeline in albumentations' own serialization (``A.to_dict`` /
``A.from_dict``, YAML): a preset (``none``, ``light``, ``medium``, ``heavy``) or a user's file passed as
``--aug my.yaml``. It never needs the model's size or statistics: the fit to the input, ``Normalize`` with the
backbone's mean/std and the tensor conversion belong to the model's
:class:`transferkit.models.preprocessing.Preprocessing` (``preprocessing.train_transform(aug)``). A
``RandomResizedCrop`` / ``RandomSizedCrop`` may omit ``size``; it is re-targeted to the backbone's input size
and interpolation by :func:`retarget_sized_crops`.
"""

from __future__ import annotations

import os
from pathlib import Path

import albumentations as A
import yaml

from transferkit.choices import AUG_PRESETS
from transferkit.errors import TransferkitError

SIZED_CROPS = ("RandomResizedCrop", "RandomSizedCrop")  # their output *is* the model input
TAIL_ONLY = ("Normalize", "ToTensorV2")  # added by the fixed tail, from the backbone
PLACEHOLDER_SIZE = [224, 224]  # replaced by the backbone's input size in retarget_sized_crops


def preset_path(spec: str | os.PathLike):
    """A preset name (package data from the top-level ``recipes/augment/``) or a YAML/JSON path → the file."""
    from transferkit.core.bundled import bundled_folder

    if str(spec) in AUG_PRESETS:
        return bundled_folder("recipes/augment").joinpath(f"{spec}.yaml")
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


def retarget_sized_crops(pipeline, size: tuple[int, int], interpolation: int) -> int:
    """Point every RandomResizedCrop-like step at the backbone's input size and interpolation; returns how many."""
    count = 0
    for transform in getattr(pipeline, "transforms", []):
        if type(transform).__name__ in SIZED_CROPS:
            transform.size = size
            transform.interpolation = interpolation
            count += 1
        count += retarget_sized_crops(transform, size, interpolation)
    return count
