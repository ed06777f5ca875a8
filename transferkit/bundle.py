"""Saved models: a safetensors file whose metadata carries everything needed to use it again.

A checkpoint is ``<stem>.safetensors`` (weights, with the metadata JSON also in its header) plus
``<stem>.json`` (the same metadata, readable by people). The metadata holds the backbone name, model
kwargs, class names, data config and resize mode, so evaluate / predict / export / the MLflow model
need no flags about preprocessing. Kinds:

- ``classifier``: a finetuned timm model with its own head (``transferkit finetune``).
- ``svm``: a frozen backbone (``num_classes=0``) + a scikit-learn head stored beside it
  (``transferkit svm``); loaded by :mod:`transferkit.heads`.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from . import __version__
from .backbones import CHECKPOINT_METADATA_KEY, load_backbone, read_checkpoint_metadata
from .errors import TransferkitError
from .fileio import atomic_path, write_json
from .transforms import build_eval_transform, working_short_side

FORMAT = "transferkit-model"
CHECKPOINT_NAMES = ("best", "model", "last")
PREDICTOR_LOADERS = {
    "classifier": "transferkit.bundle:ClassifierPredictor.from_checkpoint",
    "svm": "transferkit.heads:load_svm_predictor",
}


def checkpoint_metadata(model: torch.nn.Module, *, kind: str, class_names, data_config: Mapping,
                        resize_mode: str = "crop", **extra) -> dict:
    """Metadata for a checkpoint of ``model`` (built by :func:`transferkit.backbones.load_backbone`)."""
    info = getattr(model, "transferkit_info", None)
    if not info:
        raise TransferkitError("model was not built by transferkit.load_backbone; its backbone is unknown")
    return {
        "format": FORMAT,
        "kind": kind,
        "backbone": info["backbone"],
        "model_kwargs": info["model_kwargs"],
        "pretrained_weights": info["weights"],
        "class_names": list(class_names),
        "num_classes": len(class_names) if kind == "classifier" else 0,
        "data_config": dict(data_config),
        "resize_mode": resize_mode,
        "transferkit_version": __version__,
        **extra,
    }


def save_checkpoint(stem: str | os.PathLike, model: torch.nn.Module, metadata: Mapping) -> Path:
    """Write ``stem.safetensors`` and ``stem.json`` atomically; returns the safetensors path."""
    stem = Path(stem)
    weights_path = stem.with_name(stem.name + ".safetensors")
    state = {k: v.detach().to("cpu").contiguous() for k, v in _unwrap(model).state_dict().items()}
    with atomic_path(weights_path) as tmp:
        save_file(state, str(tmp), metadata={CHECKPOINT_METADATA_KEY: json.dumps(metadata)})
    write_json(stem.with_name(stem.name + ".json"), metadata)
    return weights_path


def find_checkpoint(spec: str | os.PathLike) -> Path:
    """A run folder, model folder, checkpoint file or MLflow model URI → the checkpoint's safetensors path."""
    spec = str(spec)
    if "://" in spec or spec.startswith(("runs:/", "models:/")):
        return find_checkpoint(_download_mlflow_model(spec))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".json":
            path = path.with_suffix(".safetensors")
        if path.suffix == ".safetensors" and read_checkpoint_metadata(path).get("format") == FORMAT:
            return path
        raise TransferkitError(f"{spec} is not a transferkit model; pass a run folder, a model folder or runs:/ID/model")
    if path.is_dir():
        for folder in (path, path / "weights", path / "model", path / "artifacts" / "model"):
            for name in CHECKPOINT_NAMES:
                candidate = folder / f"{name}.safetensors"
                if candidate.is_file():
                    return candidate
        raise TransferkitError(f"no transferkit model in {path}; expected best.safetensors or model.safetensors there")
    raise TransferkitError(f"model {spec} does not exist; pass a run folder, a model folder or runs:/ID/model")


def load_predictor(spec: str | os.PathLike, device: str | torch.device = "cpu") -> Predictor:
    """Any saved transferkit model → a :class:`Predictor` of the right kind."""
    path = find_checkpoint(spec)
    metadata = read_checkpoint_metadata(path)
    target = PREDICTOR_LOADERS.get(metadata.get("kind"))
    if target is None:
        raise TransferkitError(f"{path} has unknown model kind {metadata.get('kind')!r}")
    module_name, attr = target.split(":")
    factory = importlib.import_module(module_name)
    for part in attr.split("."):
        factory = getattr(factory, part)
    return factory(path, metadata, torch.device(device))


class Predictor:
    """Images in, class probabilities out, with the model's own preprocessing."""

    def __init__(self, metadata: Mapping, device: torch.device):
        self.metadata = dict(metadata)
        self.class_names: list[str] = list(metadata["class_names"])
        self.data_config: dict = dict(metadata["data_config"])
        self.resize_mode: str = metadata.get("resize_mode", "crop")
        self.device = device

    def eval_transform(self):
        return build_eval_transform(self.data_config, self.resize_mode)

    def predict_proba_tensor(self, batch: torch.Tensor) -> np.ndarray:
        """Probabilities for an already preprocessed NCHW batch."""
        raise NotImplementedError

    def predict_proba(self, images, batch_size: int = 32) -> np.ndarray:
        """Probabilities for uint8 HWC arrays or image paths, in order."""
        from .data.dataset import preprocessed_batches

        short_side = working_short_side(self.data_config, self.resize_mode)  # the same draft decode as validation
        out = [self.predict_proba_tensor(batch)
               for batch in preprocessed_batches(list(images), self.eval_transform(), batch_size, short_side)]
        return np.concatenate(out) if out else np.zeros((0, len(self.class_names)), dtype=np.float32)


class ClassifierPredictor(Predictor):
    """A finetuned timm model; ``model`` is exposed for export and CAMs."""

    def __init__(self, model: torch.nn.Module, metadata: Mapping, device: torch.device):
        super().__init__(metadata, device)
        from .runtime import prepare_model

        self.model = prepare_model(model, device).eval()

    @classmethod
    def from_checkpoint(cls, path: Path, metadata: Mapping, device: torch.device) -> ClassifierPredictor:
        model, _ = load_backbone(
            metadata["backbone"], weights=path, num_classes=len(metadata["class_names"]),
            data_overrides=metadata["data_config"], **metadata.get("model_kwargs", {}),
        )
        return cls(model, metadata, device)

    @torch.inference_mode()
    def predict_proba_tensor(self, batch: torch.Tensor) -> np.ndarray:
        from .runtime import autocast, to_device

        with autocast(self.device):
            logits = self.model(to_device(batch, self.device))
        return logits.float().softmax(-1).cpu().numpy()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def _download_mlflow_model(uri: str) -> str:
    import mlflow

    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except Exception as exc:
        raise TransferkitError(f"cannot fetch MLflow model {uri}: {exc}") from exc
