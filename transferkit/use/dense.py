"""Dense class maps: a classifier run fully convolutionally over a frame larger than its training size.

The linear head is applied at every position of the last feature map (what turning the FC layer into a
1x1 convolution does), so a wide dashcam frame gets a class per ~32-pixel cell instead of one label.
For a backbone whose head is global average pooling + linear, the mean of the dense logits over positions
*is* the pooled logit (linearity); :func:`dense_logits` checks that identity on every frame, which also
rejects heads where it does not hold (max pooling, a norm or MLP after the pool) with a one-line error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transferkit import params
from transferkit.errors import TransferkitError

POOLED_MATCH_TOLERANCE = 1e-4  # relative to the largest |logit|; float32 summation order only
DENSE_SCALE = 2  # default frame short side: twice the training input size
# A resized frame's pixels: 2048x2048, 12x a 1080p frame at the default 448 px short side. The backbone's
# activations on it, not the input tensor, are what this bounds.
MAX_DENSE_PIXELS = 2048 * 2048


@dataclass
class DenseMap:
    view: np.ndarray  # uint8 HWC, the frame as the model saw it (resized)
    probabilities: np.ndarray  # [C, h, w] softmax (with the model's temperature) at every feature-map position
    class_names: list[str]

    @property
    def class_map(self) -> np.ndarray:
        return self.probabilities.argmax(0)

    def fractions(self) -> dict[str, float]:
        """Share of the frame (feature-map positions) where each class wins."""
        counts = np.bincount(self.class_map.ravel(), minlength=len(self.class_names))
        return {name: float(c) / self.class_map.size for name, c in zip(self.class_names, counts)}


def dense_logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` logits: the model's linear head applied at each position of its last feature map."""
    from transferkit.use.explain import is_token_model

    name = type(model).__name__
    if is_token_model(model):
        raise TransferkitError(f"dense maps need a convolutional backbone; {name} is a token (ViT-style) model")
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    pool_type = str(getattr(getattr(model, "global_pool", None), "pool_type", ""))
    if not isinstance(classifier, torch.nn.Linear) or "avg" not in pool_type or "max" in pool_type:
        raise TransferkitError(f"dense maps do not apply to {name}: its head is not global average pooling + linear "
                               f"(pooling {pool_type or 'inside the head'}, classifier {type(classifier).__name__})")
    features = model.forward_features(batch)
    if features.dim() != 4:
        raise TransferkitError(f"dense maps need a [B, C, h, w] feature map; {name} gives shape {tuple(features.shape)}")
    logits = torch.nn.functional.conv2d(features, classifier.weight[:, :, None, None], classifier.bias)
    pooled = model.forward_head(features)
    if not torch.allclose(logits.mean((2, 3)), pooled, rtol=0, atol=POOLED_MATCH_TOLERANCE * max(pooled.abs().max(), 1)):
        raise TransferkitError(f"dense maps do not apply to {name}: its head is not average pooling + linear "
                               "(the position-averaged dense logits differ from the pooled ones)")
    return logits


def dense_map(predictor, image: np.ndarray, short_side: int | None = None) -> DenseMap:
    """The class map of one uint8 RGB frame, resized so its short side is ``short_side`` pixels
    (default: twice the model's input size), aspect ratio kept."""
    preprocessing = predictor.preprocessing
    short_side = dense_short_side(predictor, short_side)
    check_frame(image.shape[1], image.shape[0], short_side)
    tensor = preprocessing.full_frame_transform(short_side)(image)
    view = preprocessing.denormalize(tensor)  # the pixels the map is computed on
    tensor = tensor.unsqueeze(0)
    with torch.inference_mode():
        logits = dense_logits(predictor.model, tensor.to(predictor.device).float())
    probabilities = predictor.probabilities(logits[0], dim=0)  # calibrated like ordinary predictions
    return DenseMap(view, probabilities.cpu().numpy(), list(predictor.class_names))


def dense_short_side(predictor, short_side: int | None) -> int:
    """The frame short side asked for (checked), or the default: DENSE_SCALE x the model's input size."""
    return params.DENSE_SHORT_SIDE.check("dense_size", short_side or DENSE_SCALE * min(predictor.preprocessing.input_hw))


def check_frame(width: int, height: int, short_side: int, name: str = "the frame") -> None:
    """Refuse a frame that, resized to ``short_side`` as :meth:`full_frame_transform` does, would be over
    MAX_DENSE_PIXELS: checked before the resized frame (and the backbone's activations on it) is allocated."""
    scale = short_side / min(width, height)
    resized = round(width * scale) * round(height * scale)
    if resized > MAX_DENSE_PIXELS:
        raise TransferkitError(f"{name} ({width}x{height}) would be {resized:,} pixels with its short side resized to "
                               f"{short_side}, above the {MAX_DENSE_PIXELS:,}-pixel limit for dense maps; pass a smaller "
                               "--dense-size or crop the frame")


def predict_dense(model_spec, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  short_side: int | None = None, device: str = "auto") -> list[dict]:
    """For each image: ``<stem>.classmap.png`` (class map over the frame) in ``out_dir``; returns rows
    ``{path, map_size, fractions, png}``, also written to ``out_dir/class_fractions.json``."""
    from PIL import Image

    from transferkit.core.fileio import ensure_writable_dir, write_json
    from transferkit.core.runtime import select_device
    from transferkit.data import load_image
    from transferkit.data.decode import image_size
    from transferkit.models.predictors import ClassifierPredictor, load_predictor
    from transferkit.reports.plots import class_map_png
    from transferkit.use.explain import unique_stems
    from transferkit.use.predict import expand_inputs

    paths = expand_inputs(inputs)
    predictor = load_predictor(model_spec, select_device(device))
    if not isinstance(predictor, ClassifierPredictor):
        raise TransferkitError(f"dense maps need a finetuned classifier; this model is kind {predictor.metadata.get('kind')!r}")
    short_side = dense_short_side(predictor, short_side)
    for path in paths:  # every frame's size from its header, before any output is written
        try:
            size = image_size(path)
        except (OSError, ValueError, Image.DecompressionBombError):
            continue  # not readable: load_image says why when its turn comes
        check_frame(*size, short_side, name=str(path))
    out_dir = ensure_writable_dir(out_dir)
    rows = []
    for path, stem in zip(paths, unique_stems(paths)):
        result = dense_map(predictor, load_image(path), short_side)
        fractions = result.fractions()
        png = class_map_png(result.view, result.class_map, result.class_names, fractions, out_dir / f"{stem}.classmap.png",
                            title=f"{Path(path).name}: class per {result.view.shape[0] // result.class_map.shape[0]}-px cell")
        rows.append({"path": str(path), "map_size": list(result.class_map.shape), "fractions": fractions, "png": str(png)})
    write_json(out_dir / "class_fractions.json", rows)
    return rows
