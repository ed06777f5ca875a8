"""What the model looks at: class-activation maps (grad-cam package) and first-layer filters.

The CAM target layer is the last spatial feature map, chosen per timm family (ResNet ``layer4[-1]``,
EfficientNet/MobileNetV2 ``bn2``, ConvNeXt ``stages[-1]``, ViT ``blocks[-1].norm1`` with its tokens
reshaped to a grid) and otherwise the last entry of timm's own ``feature_info``. ``target_layer``
overrides it with a dotted module name.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transferkit import params
from transferkit.core.fileio import ensure_writable_dir, safe_name
from transferkit.errors import TransferkitError, require_extra


def explain(model_spec, images: Sequence[str | os.PathLike], out_dir: str | os.PathLike, method: str = "gradcam",
            target_layer: str | None = None, class_name: str | None = None, device: str = "auto") -> list[Path]:
    """One overlay PNG per image in ``out_dir`` named ``<image stem>.<predicted class>.<method>.png``.

    The map explains ``class_name`` when given, else each image's predicted class.
    """
    from transferkit.core.runtime import select_device
    from transferkit.data import load_image
    from transferkit.models.predictors import load_predictor
    from transferkit.reports.plots import cam_overlay_png
    from transferkit.use.predict import expand_inputs

    params.CAM_METHOD.check("CAM method", method)
    paths = expand_inputs(images)
    predictor = load_predictor(model_spec, select_device(device))
    if class_name is not None and class_name not in predictor.class_names:
        raise TransferkitError(f"unknown class {class_name!r}; the model's classes are {', '.join(predictor.class_names)}")
    out_dir = ensure_writable_dir(out_dir)
    target = None if class_name is None else predictor.class_names.index(class_name)
    explained = explained_models(predictor)
    decided = predictor.predict_proba(paths) if predictor.members else None  # the ensemble's own answer
    written = []
    for tag, model in explained:
        with ClassActivationMaps(model, method, target_layer) as cams:
            for i, (path, stem) in enumerate(zip(paths, unique_stems(paths))):
                result = cams(load_image(path), target if target is not None or decided is None
                              else int(predictor.task.decide(decided[i])))
                probabilities = result.probabilities if decided is None else decided[i]
                pred = int(predictor.task.decide(probabilities))
                title = (f"predicted {predictor.class_names[pred]} ({probabilities[pred]:.2f}); "
                         f"{method} for {predictor.class_names[result.target]} at {tag}{cams.layer_name}")
                name = f"{stem}.{safe_name(predictor.class_names[pred])}.{safe_name(method)}"
                out = out_dir / (f"{name}.{safe_name(tag.rstrip(': '))}.png" if tag else f"{name}.png")
                written.append(cam_overlay_png(result.view, result.heatmap, out, title))
    return written


def explained_models(predictor) -> list[tuple[str, object]]:
    """``[(tag, classifier)]``: the model itself, or an ensemble's finetuned members, each with its own map
    (tagged ``member-N: ``), explaining the class the ensemble predicts."""
    from transferkit.models.predictors import ClassifierPredictor

    if not predictor.members:
        return [("", predictor)]
    members = [(f"member-{i}: ", m) for i, m in enumerate(predictor.members) if isinstance(m, ClassifierPredictor)]
    if not members:
        raise TransferkitError("none of this ensemble's members is a finetuned classifier; class activation maps "
                               "need gradients through a network's head")
    return members


@dataclass
class CamResult:
    view: np.ndarray  # uint8 HWC: the image after the eval resize, as the model saw it
    heatmap: np.ndarray  # [H, W] in [0, 1] over ``view``
    probabilities: np.ndarray  # class probabilities from the CAM's own forward pass (model temperature applied)
    target: int  # the class the map explains


class ClassActivationMaps:
    """A classifier with a CAM method attached (hooks held until :meth:`close`): image in, :class:`CamResult` out."""

    def __init__(self, predictor, method: str = "gradcam", target_layer: str | None = None):
        from transferkit.models.predictors import ClassifierPredictor

        params.CAM_METHOD.check("CAM method", method)
        require_extra("pytorch_grad_cam")
        if not isinstance(predictor, ClassifierPredictor):
            raise TransferkitError(
                f"class activation maps need a finetuned classifier (gradients through its head); this model is kind "
                f"{predictor.metadata.get('kind')!r} with a scikit-learn head"
            )
        model = predictor.model
        self.predictor = predictor
        self.layer_name, reshape = default_target_layer(model) if target_layer is None else (target_layer, None)
        layer = _submodule(model, self.layer_name)
        if reshape is None and target_layer is not None and is_token_model(model):
            reshape = _token_grid_reshape(model)
        self._transform = predictor.preprocessing.eval_transform()
        self._cam = _cam_class(method)(model=model, target_layers=[layer], reshape_transform=reshape)

    def __call__(self, image: np.ndarray, target: int | None = None) -> CamResult:
        """The map for class ``target`` (default: the predicted class) of one uint8 RGB image."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        tensor = self._transform(image)
        batch = tensor.unsqueeze(0).to(self.predictor.device)
        heatmap = self._cam(input_tensor=batch, targets=None if target is None else [ClassifierOutputTarget(target)])[0]
        logits = self._cam.outputs.detach().float()[0]  # the CAM's own forward pass
        probabilities = self.predictor.probabilities(logits).cpu().numpy()
        return CamResult(self.predictor.preprocessing.denormalize(tensor), heatmap, probabilities,  # the pixels seen
                         int(self.predictor.task.decide(probabilities)) if target is None else target)

    def close(self) -> None:
        self._cam.activations_and_grads.release()

    def __enter__(self) -> ClassActivationMaps:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def default_target_layer(model: torch.nn.Module) -> tuple[str, Callable | None]:
    """(dotted module name, reshape_transform or None) of the layer whose activations a CAM should use."""
    if is_token_model(model):
        return f"blocks.{len(model.blocks) - 1}.norm1", _token_grid_reshape(model)
    kind = type(model).__name__
    if kind == "ResNet":
        return f"layer4.{len(model.layer4) - 1}", None
    if kind == "EfficientNet":  # also MobileNetV2/MnasNet in timm; bn2 is the last map before pooling
        return "bn2", None
    if kind == "ConvNeXt":
        return f"stages.{len(model.stages) - 1}", None
    feature_info = getattr(model, "feature_info", None)
    if feature_info:
        return feature_info[-1]["module"], None
    raise TransferkitError(f"no default CAM layer for {kind}; pass --target-layer NAME (a module name from model.named_modules())")


def first_conv_weight(model: torch.nn.Module) -> torch.Tensor:
    """The first convolution's weight ``[out, in, kh, kw]``, located by timm's ``pretrained_cfg['first_conv']``."""
    name = model.pretrained_cfg.get("first_conv")
    if not name:
        raise TransferkitError(f"{type(model).__name__} does not name its first convolution in timm's pretrained config")
    weight = getattr(_submodule(model, name), "weight", None)
    if weight is None or weight.dim() != 4:
        raise TransferkitError(f"first_conv {name} of {type(model).__name__} is not a 2-d convolution")
    return weight.detach()


def _cam_class(method: str):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM

    return {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "scorecam": ScoreCAM}[method]


def is_token_model(model: torch.nn.Module) -> bool:
    """ViT-style: transformer blocks over patch tokens (timm's VisionTransformer, DeiT, ...)."""
    return hasattr(model, "patch_embed") and hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens")


def _token_grid_reshape(model: torch.nn.Module) -> Callable:
    """Tokens ``[B, prefix + h*w, C]`` → ``[B, C, h, w]`` so CAM methods can treat them as a feature map."""
    prefix = int(model.num_prefix_tokens)
    height, width = model.patch_embed.grid_size

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 3:  # an overriding --target-layer may already be a [B, C, h, w] map (patch_embed.proj)
            return tokens
        grid = tokens[:, prefix:, :].reshape(tokens.size(0), height, width, tokens.size(2))
        return grid.permute(0, 3, 1, 2)

    return reshape


def _submodule(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        candidates = [n for n, _ in model.named_children()]
        raise TransferkitError(
            f"model has no module {name!r}; use a dotted name from model.named_modules(), e.g. {', '.join(candidates[-4:])}"
        ) from None


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """Image stems, prefixed with a counter where two inputs share one, so no overlay overwrites another."""
    stems = [p.stem for p in paths]
    return [f"{i:04d}_{s}" if stems.count(s) > 1 else s for i, s in enumerate(stems)]

