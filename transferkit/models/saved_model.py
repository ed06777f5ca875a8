"""Saved models: a safetensors file whose metadata carries everything needed to use it again.

A checkpoint is ``<stem>.safetensors`` (weights, with the metadata JSON also in its header) plus
``<stem>.json`` (the same metadata, readable by people). The metadata holds the backbone name, model
kwargs, class names and the model's preprocessing (timm's data config, whose ``crop_mode`` is the resize
mode; see :class:`transferkit.models.preprocessing.Preprocessing`, which also reads the older ``data_config`` +
``resize_mode`` pair), so evaluate / predict / export / the MLflow model need no flags about preprocessing. Kinds:

- ``classifier``: a finetuned timm model with its own head (``transferkit finetune``).
- ``svm``: a frozen backbone (``num_classes=0``) + a scikit-learn head stored beside it
  (``transferkit svm``); loaded by :class:`transferkit.models.predictors.SVMPredictor`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from transferkit.core.fileio import atomic_path, write_json
from transferkit.errors import TransferkitError
from transferkit.version import __version__

if TYPE_CHECKING:
    from transferkit.models.preprocessing import Preprocessing

FORMAT = "transferkit-model"
CHECKPOINT_NAMES = ("best", "model", "last")
CHECKPOINT_METADATA_KEY = "transferkit"


def checkpoint_metadata(model: torch.nn.Module, *, kind: str, class_names, preprocessing: Preprocessing,
                        **extra) -> dict:
    """Metadata for a checkpoint of ``model`` (built by :func:`transferkit.models.backbones.load_backbone`)."""
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
        **preprocessing.to_metadata(),
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


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def _download_mlflow_model(uri: str) -> str:
    import mlflow

    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except Exception as exc:
        raise TransferkitError(f"cannot fetch MLflow model {uri}: {exc}") from exc


def read_checkpoint_metadata(path: Path) -> dict:
    """The JSON transferkit stores in its own safetensors headers; {} for any other file."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(CHECKPOINT_METADATA_KEY)
    except Exception as exc:
        raise TransferkitError(f"{path} is not a readable safetensors file ({exc})") from exc
    return json.loads(raw) if raw else {}
