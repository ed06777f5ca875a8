"""How images become a model's input: one object, resolved once per backbone, saved with every model.

:class:`Preprocessing` is timm's resolved data config (input size, interpolation, mean, std, crop_pct,
crop_mode) with transferkit's name for the crop mode (``resize_mode``: crop = timm's ``center``, squash,
letterbox = timm's ``border``). :func:`transferkit.models.backbones.load_backbone` resolves it, every checkpoint
and feature file stores it (:meth:`Preprocessing.to_metadata`), and everything that feeds a model asks it for
its transform: validation, evaluate, predict, feature extraction, the scikit-learn extractor, the MLflow model,
export checks and CAMs.

The eval transform *is* timm's own (``timm.data.create_transform(**data_config, is_training=False)``: PIL
resize with antialiasing, centre crop or pad, normalize), so features match what the backbone was
benchmarked with. The only step of ours in front of it is the JPEG draft decode (:attr:`decode_short_side`,
see :func:`transferkit.data.decode.load_image`), which decodes large JPEGs at a reduced DCT scale that still
leaves a margin above the pixels the resize reads (``docs/benchmarks/preprocessing.md``: what it costs and saves).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

from transferkit import params
from transferkit.errors import TransferkitError

CROP_MODES = {"crop": "center", "squash": "squash", "letterbox": "border"}  # resize mode -> timm crop_mode
RESIZE_MODE_OF = {crop_mode: mode for mode, crop_mode in CROP_MODES.items()}
MIN_ENLARGE = 1 / 0.875  # five-crop / squash-letterbox training zoom when crop_pct is 1


@dataclass(frozen=True)
class Preprocessing:
    """A backbone's input preprocessing. Build it with :meth:`resolve` or :meth:`from_metadata`."""

    input_size: tuple[int, int, int]
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    crop_mode: str  # timm's: center | squash | border

    # ------------------------------------------------------------------ building, saving, restoring

    @classmethod
    def resolve(cls, data_config: Mapping, resize_mode: str | None = None) -> Preprocessing:
        """timm's data config + an optional resize mode (None: the config's own ``crop_mode``, else crop).

        Squash and letterbox chosen over the backbone's own mode keep the whole frame (``crop_pct`` 1), which
        is what they are for; the backbone's own mode keeps its own ``crop_pct``, as timm does.
        """
        own = RESIZE_MODE_OF.get(data_config.get("crop_mode") or "center")
        if own is None:
            raise TransferkitError(f"unknown crop_mode {data_config['crop_mode']!r}; use one of {', '.join(RESIZE_MODE_OF)}")
        mode = own if resize_mode is None else resize_mode
        params.RESIZE_MODE.check("resize mode", mode)
        crop_pct = float(data_config.get("crop_pct") or 1.0)
        if mode != own and mode != "crop":
            crop_pct = 1.0
        mean, std = tuple(float(v) for v in data_config["mean"]), tuple(float(v) for v in data_config["std"])
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise TransferkitError(f"data config needs 3 means and 3 positive stds, got mean={list(mean)} std={list(std)}")
        input_size = tuple(int(v) for v in data_config["input_size"])
        if len(input_size) != 3 or min(input_size) < 1:
            raise TransferkitError(f"input_size must be [3, height, width], got {list(input_size)}")
        params.INTERPOLATION.check("interpolation", data_config["interpolation"])
        if not 0 < crop_pct <= 1:
            raise TransferkitError(f"crop_pct must be in (0, 1], got {crop_pct}")
        return cls(input_size, str(data_config["interpolation"]), mean, std, crop_pct, CROP_MODES[mode])

    @classmethod
    def from_metadata(cls, metadata: Mapping) -> Preprocessing:
        """From a checkpoint's or feature file's metadata; older files store ``data_config`` + ``resize_mode``."""
        if "preprocessing" in metadata:
            return cls.resolve(metadata["preprocessing"])
        return cls.resolve(metadata["data_config"], metadata.get("resize_mode", "crop"))

    def to_metadata(self) -> dict:
        """What a checkpoint stores: ``{"preprocessing": data_config}`` (crop_mode carries the resize mode)."""
        return {"preprocessing": self.data_config}

    @property
    def data_config(self) -> dict:
        """timm's data config as JSON types: the keyword arguments of ``timm.data.create_transform``."""
        return {"input_size": list(self.input_size), "interpolation": self.interpolation, "mean": list(self.mean),
                "std": list(self.std), "crop_pct": self.crop_pct, "crop_mode": self.crop_mode}

    @property
    def resize_mode(self) -> str:
        return RESIZE_MODE_OF[self.crop_mode]

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.input_size[1], self.input_size[2]

    @property
    def decode_short_side(self) -> int:
        """A short side from which the eval resize never upsamples (for a non-square input, squash or a wide
        image it may read either side at full scale): a large JPEG need not be decoded beyond it (draft decode)."""
        return math.floor(max(self.input_hw) / self.crop_pct)

    def describe(self) -> str:
        height, width = self.input_hw
        return f"{height}x{width} {self.resize_mode} (crop_pct {self.crop_pct:g}, {self.interpolation}), mean {list(self.mean)}"

    # ------------------------------------------------------------------ transforms

    def eval_transform(self) -> ImageTransform:
        """timm's own eval transform; takes an HWC uint8 array or a PIL image, returns a CHW float tensor."""
        from timm.data import create_transform

        return ImageTransform(create_transform(**self.data_config, is_training=False))

    def train_transform(self, augmentation) -> TrainTransform:
        """``augmentation`` (an albumentations pipeline, a preset name or a YAML path), then the fit to the input.

        Without a RandomResizedCrop-like step the augmented image goes through the eval transform itself, so
        ``aug none`` trains on exactly what validation sees. Such a crop is re-targeted to the input size and
        interpolation; in squash/letterbox mode the image is first fitted into that geometry at an enlarged
        size, so training sees the same distortion or padding as evaluation.
        """
        from transferkit.data.augment import load_augmentation

        if not callable(augmentation):
            augmentation = load_augmentation(augmentation)
        return TrainTransform(self, augmentation)

    def tta_views(self, mode: str = "none") -> TTAViews:
        """``f(image) -> Tensor[K, 3, H, W]``: none (the eval view), hflip (+ mirror), five-crop, ten-crop."""
        return TTAViews(self, mode)

    def enlarged_fit(self, tensor: bool = True):
        """The eval resize at size / crop_pct (at least × :data:`MIN_ENLARGE`), before any crop: what five-crop
        views and squash/letterbox training crops are cut from. A tensor transform, or PIL → PIL."""
        from timm.data.transforms import ResizeKeepRatio
        from torchvision import transforms

        zoom = 1 / self.crop_pct if self.crop_pct < 1 and self.crop_mode == "center" else max(1 / self.crop_pct, MIN_ENLARGE)
        height, width = (math.floor(side * zoom) for side in self.input_hw)
        if self.crop_mode == "center":
            steps = [transforms.Resize(height, interpolation=transforms.InterpolationMode(self.interpolation))
                     if height == width else ResizeKeepRatio((height, width), interpolation=self.interpolation)]
        else:  # squash / border at the enlarged size: timm's own steps without the tensor tail
            enlarged = replace(self, input_size=(3, height, width), crop_pct=1.0)
            steps = enlarged.eval_transform().transform.transforms[:-2]
        return ImageTransform(transforms.Compose([*steps, *(self._to_normalized_tensor() if tensor else [])]))

    def full_frame_transform(self, short_side: int) -> ImageTransform:
        """The whole image, short side resized to ``short_side`` (aspect kept, no crop), normalised: for dense maps."""
        from torchvision import transforms

        resize = transforms.Resize(short_side, interpolation=transforms.InterpolationMode(self.interpolation))
        return ImageTransform(transforms.Compose([resize, *self._to_normalized_tensor()]))

    def _to_normalized_tensor(self) -> list:
        from timm.data.transforms import MaybeToTensor
        from torchvision import transforms

        return [MaybeToTensor(), transforms.Normalize(self.mean, self.std)]

    def batches(self, images, batch_size: int):
        """Image paths or HxWx3 uint8 arrays → eval-preprocessed batches, in order, in this process."""
        from transferkit.data.dataset import preprocessed_batches

        return preprocessed_batches(images, self.eval_transform(), batch_size, self.decode_short_side)

    def denormalize(self, tensor: torch.Tensor) -> np.ndarray:
        """A normalised CHW tensor back to a displayable HWC uint8 image."""
        mean = torch.tensor(self.mean, dtype=tensor.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=tensor.dtype).view(-1, 1, 1)
        return (tensor * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()

    def export_steps(self) -> list[str]:
        """The eval transform as readable steps (torchvision/timm reprs), for an exported model's sidecar JSON."""
        from torchvision import transforms

        return [f"Normalize(mean={list(self.mean)}, std={list(self.std)})" if isinstance(step, transforms.Normalize)
                else repr(step) for step in self.eval_transform().transform.transforms]


class ImageTransform:
    """A torchvision/timm transform callable like an albumentations one (``f(image=array)``), so the datasets
    and DataLoader workers take either. Returns the tensor itself."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image) -> torch.Tensor:
        return self.transform(as_pil(image))


class TrainTransform:
    """User augmentation (albumentations, on the decoded array), then the fit to the model input."""

    def __init__(self, preprocessing: Preprocessing, augmentation):
        import albumentations as A
        from torchvision import transforms

        from transferkit.data.augment import retarget_sized_crops

        height, width = preprocessing.input_hw
        interpolation = cv2_interpolation(preprocessing.interpolation)
        self.augmentation = augmentation
        sized = retarget_sized_crops(augmentation, (height, width), interpolation)
        self.head = preprocessing.enlarged_fit(tensor=False) if sized and preprocessing.resize_mode != "crop" else None
        if sized:  # the crop already gives the input size; the resize is a guarantee, a no-op at that size
            self.tail = A.Compose([A.Resize(height, width, interpolation=interpolation)])
            self.to_tensor = transforms.Compose(preprocessing._to_normalized_tensor())
        else:
            self.tail, self.to_tensor = None, preprocessing.eval_transform()

    def __call__(self, image) -> torch.Tensor:
        image = np.asarray(self.head(image) if self.head is not None else image)
        image = self.augmentation(image=image)["image"]
        if self.tail is not None:
            image = self.tail(image=image)["image"]
        return self.to_tensor(image)

    def set_random_seed(self, seed: int) -> None:
        """Albumentations keeps one random stream per pipeline; DataLoader workers reseed it."""
        self.augmentation.set_random_seed(seed)


class TTAViews:
    """``f(image) -> Tensor[K, 3, H, W]``: the views test-time augmentation averages over (picklable)."""

    def __init__(self, preprocessing: Preprocessing, mode: str = "none"):
        from transferkit.choices import TTA_VIEWS

        params.TTA.check("--tta", mode)
        self.mode = mode
        self.views = TTA_VIEWS[mode]
        self.crop_hw = preprocessing.input_hw
        crops = mode in ("five-crop", "ten-crop")
        self.transform = preprocessing.enlarged_fit() if crops else preprocessing.eval_transform()
        zoom = MIN_ENLARGE if crops else 1.0  # the enlarged fit reads up to this much more of the image
        self.decode_short_side = math.ceil(preprocessing.decode_short_side * zoom)

    def __call__(self, image) -> torch.Tensor:
        from torchvision.transforms.functional import five_crop

        tensor = self.transform(image)
        views = torch.stack(five_crop(tensor, list(self.crop_hw))) if self.mode in ("five-crop", "ten-crop") else tensor[None]
        if self.mode in ("hflip", "ten-crop"):  # normalisation is per pixel, so flipping after it is exact
            views = torch.cat([views, views.flip(-1)])
        return views


def as_pil(image):
    """An HWC uint8 RGB array (or a PIL image) as a PIL image, for the PIL-based transforms."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    return Image.fromarray(np.ascontiguousarray(image))


def cv2_interpolation(name: str) -> int:
    """The cv2 flag of an interpolation name, for the albumentations steps of training."""
    import cv2

    return {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
            "lanczos": cv2.INTER_LANCZOS4, "area": cv2.INTER_AREA}[name]
