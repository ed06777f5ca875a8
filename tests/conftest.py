"""Shared fixtures: tiny generated image folders, tiny timm models saved as local weights.

Every test runs offline: HF_HUB_OFFLINE stops any hub retry, and no test reaches the network.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_WEIGHTS = SHARED / "weights"
SHARED_PHOTOS = SHARED / "photos"
SHARED_ROADS = SHARED / "data" / "roads"
TINY_BACKBONE = "test_efficientnet"
TINY_IMG = 64
CLASS_COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "fox": (40, 40, 200)}

requires_shared_weights = pytest.mark.skipif(
    not (SHARED_WEIGHTS / "tf_efficientnet_lite0.safetensors").is_file(),
    reason="real weights in ../shared/weights are absent",
)
requires_shared_roads = pytest.mark.skipif(not SHARED_ROADS.is_dir(), reason="../shared/data/roads is absent")


def make_image(path: Path, colour, size=(48, 40), seed=0, fmt=None) -> Path:
    """A learnable image: the class colour plus noise, so classes separate after a few steps."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour, dtype=np.int16) + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path, format=fmt)
    return path


def make_dataset(root: Path, per_class=8, classes=("cat", "dog"), splits=None, size=(48, 40)) -> Path:
    """``root/<class>/*.jpg`` or, with ``splits={'train': 8, 'val': 4}``, ``root/<split>/<class>/*``."""
    seed = 0
    layout = splits or {None: per_class}
    for split, count in layout.items():
        for cls in classes:
            for i in range(count):
                base = root / split / cls if split else root / cls
                make_image(base / f"{cls}_{i}.png", CLASS_COLOURS[cls], size=size, seed=seed)
                seed += 1
    return root


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """Two classes, train/val split folders, PNGs 48x40."""
    return make_dataset(tmp_path / "data", classes=("cat", "dog"), splits={"train": 8, "val": 4})


@pytest.fixture
def tiny_data3(tmp_path) -> Path:
    """Three classes, class folders only (val carved by transferkit)."""
    return make_dataset(tmp_path / "data3", classes=("cat", "dog", "fox"), per_class=6)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A random-init tiny timm backbone saved as safetensors with a sidecar JSON shrinking its input size."""
    import json

    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(TINY_BACKBONE, pretrained=False)
    folder = tmp_path_factory.mktemp("weights")
    path = folder / f"{TINY_BACKBONE}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    (folder / f"{TINY_BACKBONE}.json").write_text(json.dumps({"data_config": {"input_size": [3, TINY_IMG, TINY_IMG]}}))
    return path


@pytest.fixture
def runner():
    from click.testing import CliRunner

    return CliRunner()
