"""How images become a model's input: one object, resolved once per backbone, saved with every model.

:class:`Preprocessing` is timm's resolved data config (input size, interpolation, mean, std, crop_pct,
crop_mode) with transferkit's name for the crop mode (``resize_mode``: crop = timm's ``center``, squash,
letterbox = timm's ``border``). :func:`transferkit.models.backbones.load_backbone` resolves it, every checkpoint
and feature file stores it (:meth:`Preprocessing.to_metadata`), and everything that feeds a model asks it for
its transform: validation, evaluate, predict, feature extraction, the scikit-learn extractor, the MLflow model,
export checks and CAMs.

The eval transform *is* timm's own (``timm.data.create_transform(**data_config, is_training=False)``: PIL
resize with antialiasing, centre crop or pad, normalize), so features match what the backbone was
benchmarked with. It runs fused (:class:`EvalTransform`): timm's resize and crop become one antialiased PIL
resize of the region the crop keeps, planned on the full-resolution frame even when a JPEG was draft-decoded
(:attr:`decode_short_side`, :func:`transferkit.data.decode.load_scaled`), within a grey level or two of timm's.

Loaders carry uint8 pixels: a transform's :meth:`~EvalTransform.pixels` is what DataLoader workers compute and
batch (a quarter of the bytes of float32, no float work in the workers), and :meth:`Preprocessing.normalize` —
timm's ``ToTensor`` + ``Normalize`` on the whole batch, after it reached the device — turns a batch into the
model's input (:func:`transferkit.data.dataset.make_loader` does it). Called on one image, a transform returns
that normalised tensor itself, so what every other consumer (predict, export, the MLflow model, serve) feeds
the model is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

from transferkit import params
from transferkit.data.decode import ScaledImage
from transferkit.errors import TransferkitError

CROP_MODES = {"crop": "center", "squash": "squash", "letterbox": "border"}  # resize mode -> timm crop_mode
RESIZE_MODE_OF = {crop_mode: mode for mode, crop_mode in CROP_MODES.items()}
MIN_ENLARGE = 1 / 0.875  # five-crop / squash-letterbox training zoom when crop_pct is 1
# PIL's reducing_gap for the eval resize: a downscale of 6x or more (a large PNG, or any image decoded at full scale)
# is first box-reduced by an integer factor. Halves that resize's cost at a mean cosine of 0.99985 to timm's on 8 MP
# photos (docs/benchmarks/input.md); a draft-decoded JPEG never gets there (its DCT scale did the reducing).
REDUCING_GAP = 3.0


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

    def eval_transform(self) -> EvalTransform:
        """timm's own eval transform, fused; takes an HWC uint8 array, a PIL image or a
        :class:`~transferkit.data.decode.ScaledImage`, returns a normalised CHW float tensor (``.pixels``: uint8)."""
        return EvalTransform(self)

    def reference_transform(self):
        """timm's eval transform as timm builds it (torchvision Compose): what :meth:`eval_transform` reproduces."""
        from timm.data import create_transform

        return create_transform(**self.data_config, is_training=False)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``[..., 3, H, W]`` pixels → the model's float32 input, on their device and in their memory format:
        exactly timm's ``ToTensor`` + ``Normalize``, for a whole batch at once."""
        mean = torch.tensor(self.mean, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(3, 1, 1)
        return pixels.float().div_(255).sub_(mean).div_(std)

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
            steps = enlarged.reference_transform().transforms[:-2]
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
                else repr(step) for step in self.reference_transform().transforms]


class EvalTransform:
    """timm's eval transform run as one antialiased PIL resize of the region its crop keeps.

    timm resizes the whole frame, then crops (or pads) the centre; resizing only the kept region with PIL's
    ``box`` gives the same pixels — PIL's filter reads outside the box as a full resize does — for about half the
    work. The geometry is planned from timm's own steps on the full-resolution size, so a draft-decoded JPEG is
    cut exactly where a full decode would be (``docs/benchmarks/input.md``: cost and parity of each step).
    Steps this plan does not know run as timm's own transform.
    """

    def __init__(self, preprocessing: Preprocessing):
        from torchvision import transforms

        self.reference = preprocessing.reference_transform()
        self.geometry = transforms.Compose(self.reference.transforms[:-2])  # timm's own, for an unknown plan
        self.normalize = preprocessing.normalize
        self.plan = _fused_plan(self.reference.transforms[:-2])

    def pixels(self, image) -> torch.Tensor:
        """The uint8 ``(3, H, W)`` pixels of timm's eval transform (before its ToTensor + Normalize)."""
        scaled = image if isinstance(image, ScaledImage) else None
        img = as_pil(image.image if scaled else image)
        if img.mode != "RGB":
            img = img.convert("RGB")
        if self.plan is None:
            return chw_pixels(self.geometry(img))
        full = scaled.full_size if scaled else img.size
        per_pixel = scaled.scale if scaled else 1
        return chw_pixels(np.asarray(self.plan.apply(img, full, per_pixel)))

    def __call__(self, image) -> torch.Tensor:
        return self.normalize(self.pixels(image))


@dataclass(frozen=True)
class _FusedPlan:
    """timm's resize step (to a size computed from the frame) and centre crop/pad step, as numbers."""

    resize: object  # the torchvision Resize or timm ResizeKeepRatio
    crop_hw: tuple[int, int]
    fill: tuple[int, int, int]
    resample: int  # PIL filter
    reducing_gap: float | None = REDUCING_GAP  # None: exactly timm's resize

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) timm's resize step gives a ``width x height`` frame."""
        from torchvision import transforms

        if isinstance(self.resize, transforms.Resize):
            size = self.resize.size
            if isinstance(size, int) or len(size) == 1:
                short = size if isinstance(size, int) else size[0]
                long = int(short * max(width, height) / min(width, height))
                return (short, long) if width <= height else (long, short)
            return int(size[1]), int(size[0])
        target_h, target_w = self.resize.size  # ResizeKeepRatio.get_params without its random factors
        ratio_h, ratio_w = height / target_h, width / target_w
        ratio = max(ratio_h, ratio_w) * self.resize.longest + min(ratio_h, ratio_w) * (1.0 - self.resize.longest)
        return round(width / ratio), round(height / ratio)

    def window(self, width: int, height: int) -> tuple[int, int]:
        """(left, top) of the crop in the resized frame (negative where it pads), as center_crop_or_pad has it."""
        crop_h, crop_w = self.crop_hw
        pad_l, pad_t = max(0, (crop_w - width) // 2), max(0, (crop_h - height) // 2)
        padded_w = width + pad_l + max(0, (crop_w - width + 1) // 2)
        padded_h = height + pad_t + max(0, (crop_h - height + 1) // 2)
        return int(round((padded_w - crop_w) / 2.0)) - pad_l, int(round((padded_h - crop_h) / 2.0)) - pad_t

    def apply(self, img, full_size: tuple[int, int], per_pixel: int):
        """``img`` (the frame of ``full_size``, decoded at 1/``per_pixel``) resized + cropped in one resample."""
        from PIL import Image

        full_w, full_h = full_size
        resized_w, resized_h = self.resized_size(full_w, full_h)
        left, top = self.window(resized_w, resized_h)
        crop_h, crop_w = self.crop_hw
        x0, y0 = max(0, left), max(0, top)
        x1, y1 = min(resized_w, left + crop_w), min(resized_h, top + crop_h)
        sx, sy = full_w / resized_w / per_pixel, full_h / resized_h / per_pixel
        if (resized_w, resized_h) == img.size:  # timm's resize is a no-op here
            part = img.crop((x0, y0, x1, y1))
        else:
            part = img.resize((x1 - x0, y1 - y0), self.resample, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy),
                              reducing_gap=self.reducing_gap)
        if (x0, y0, x1 - x0, y1 - y0) == (left, top, crop_w, crop_h):
            return part
        canvas = Image.new("RGB", (crop_w, crop_h), self.fill)
        canvas.paste(part, (x0 - left, y0 - top))
        return canvas


def _fused_plan(steps) -> _FusedPlan | None:
    """The plan of timm's geometric eval steps, or None for a sequence other than one resize + one centre crop."""
    from timm.data.transforms import CenterCropOrPad, ResizeKeepRatio
    from torchvision import transforms
    from torchvision.transforms.functional import pil_modes_mapping

    if len(steps) != 2:
        return None
    resize, crop = steps
    plain_resize = isinstance(resize, transforms.Resize) and resize.max_size is None
    keep_ratio = isinstance(resize, ResizeKeepRatio) and resize.random_scale_prob == resize.random_aspect_prob == 0
    if not (plain_resize or keep_ratio) or type(crop) not in (transforms.CenterCrop, CenterCropOrPad):
        return None
    if isinstance(resize.interpolation, (tuple, list)):
        return None
    fill = getattr(crop, "fill", 0)
    fill = tuple(int(v) for v in fill) if isinstance(fill, (tuple, list)) else (int(fill),) * 3
    return _FusedPlan(resize, tuple(int(v) for v in crop.size), fill, pil_modes_mapping[resize.interpolation])


class ImageTransform:
    """A torchvision/timm transform callable like an albumentations one (``f(image=array)``), so the datasets
    and DataLoader workers take either. Returns the tensor itself."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image) -> torch.Tensor:
        return self.transform(as_pil(image))


class TrainTransform:
    """User augmentation (albumentations, on the decoded array), then the fit to the model input; ``pixels``
    stops before normalisation, as :meth:`EvalTransform.pixels` does."""

    def __init__(self, preprocessing: Preprocessing, augmentation):
        import albumentations as A

        from transferkit.data.augment import retarget_sized_crops

        height, width = preprocessing.input_hw
        interpolation = cv2_interpolation(preprocessing.interpolation)
        self.augmentation = augmentation
        self.normalize = preprocessing.normalize
        sized = retarget_sized_crops(augmentation, (height, width), interpolation)
        self.head = preprocessing.enlarged_fit(tensor=False) if sized and preprocessing.resize_mode != "crop" else None
        # the crop already gives the input size; the resize is a guarantee, a no-op at that size
        self.tail = A.Compose([A.Resize(height, width, interpolation=interpolation)]) if sized else None
        self.fit = None if sized else preprocessing.eval_transform()

    def pixels(self, image) -> torch.Tensor:
        scaled = image if isinstance(image, ScaledImage) else None
        array = scaled.array() if scaled else np.asarray(image)
        image = np.asarray(self.head(array) if self.head is not None else array)
        augmented = self.augmentation(image=image)["image"]
        if self.tail is not None:
            return chw_pixels(self.tail(image=augmented)["image"])
        if scaled is not None and augmented.shape == array.shape:  # flips and colour keep the draft's geometry
            augmented = scaled._replace(image=as_pil(augmented))
        return self.fit.pixels(augmented)

    def __call__(self, image) -> torch.Tensor:
        return self.normalize(self.pixels(image))

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


def chw_pixels(image) -> torch.Tensor:
    """An HWC uint8 array (or PIL image) as a contiguous ``(3, H, W)`` uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)))


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
