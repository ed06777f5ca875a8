"""The MLflow model: images in, class / probability / top-k out, preprocessing inside.

Logged with MLflow's *models from code*: this file itself is the model's code (MLflow runs it at
load time and it calls ``set_model``), so nothing is pickled. The weights travel as the transferkit
safetensors checkpoint (plus its JSON, and the sklearn head of an SVM model) in the model's
``artifacts/model/`` folder, and the transferkit package is bundled with ``code_paths`` so the model
loads with the same preprocessing code it was trained with. Loading goes through
:func:`transferkit.models.predictors.load_predictor`, which handles every model kind.

Inputs accepted by ``predict``: a DataFrame with an ``image`` column (or ``{"image": [...]}``) of
encoded image bytes, base64 strings (``data:`` URLs too) or uint8 arrays (HxWx3, HxW or HxWx4).
Served models receive base64 in JSON (``dataframe_split`` / ``instances``), which MLflow decodes
to bytes because the signature declares the column binary. Those bytes come from whoever can reach the server, so
they are decoded within fixed pixel bounds (:mod:`transferkit.data.untrusted`), a batch at a time.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array
from PIL import Image

from transferkit.core.fileio import write_json
from transferkit.data.decode import ImageDecodeError, to_rgb_array
from transferkit.data.untrusted import decode_untrusted
from transferkit.errors import TransferkitError
from transferkit.tasks import task_of

INPUT_COLUMN = "image"
DEFAULT_TOP_K = 5
BATCH_SIZE = 32  # images decoded and predicted together
MODEL_ARTIFACT = "model"  # name of the logged model and of its checkpoint folder under artifacts/
_BASE64_TEXT = re.compile(rb"(data:[\w/+.-]*;base64,)?[A-Za-z0-9+/=\s]+")
PACKAGE_DIR = Path(__file__).resolve().parents[1]


class TransferkitImageModel(mlflow.pyfunc.PythonModel):
    """Stateless until ``load_context``; the predictor comes from the logged checkpoint."""

    def load_context(self, context):
        from transferkit.models.predictors import load_predictor

        self.predictor = load_predictor(context.artifacts[MODEL_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params=None):
        """Decoded and predicted BATCH_SIZE images at a time, so a request of many images never holds them all."""
        top_k = int((params or {}).get("top_k") or DEFAULT_TOP_K)
        values, short_side = image_values(model_input), self.predictor.preprocessing.decode_short_side
        probs = [self.predictor.predict_proba([decode_image(value, short_side) for value in values[i:i + BATCH_SIZE]])
                 for i in range(0, len(values), BATCH_SIZE)]
        probs = np.concatenate(probs) if probs else np.zeros((0, len(self.predictor.class_names)), dtype=np.float32)
        return predictions_frame(self.predictor.task, probs, self.predictor.class_names, top_k)


def image_values(model_input: pd.DataFrame) -> list:
    """The ``image`` column (MLflow has already turned lists/dicts into a DataFrame per the signature)."""
    return list(model_input[INPUT_COLUMN])


def decode_image(value, min_short_side: int | None = None) -> np.ndarray:
    """One input value → HxWx3 uint8 RGB. Bytes come from whoever calls the model, so they are decoded within
    :mod:`transferkit.data.untrusted`'s pixel bounds (at no less than ``min_short_side``, as training decodes)."""
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or value.ndim not in (2, 3) or (value.ndim == 3 and value.shape[2] not in (1, 3, 4)):
            raise TransferkitError(f"image array must be uint8 HxW, HxWx3 or HxWx4, got {value.dtype} {value.shape}")
        return to_rgb_array(Image.fromarray(value[..., 0] if value.ndim == 3 and value.shape[2] == 1 else value))
    if isinstance(value, str):
        value = value.encode("ascii", errors="replace")
    if not isinstance(value, (bytes, bytearray)):
        raise TransferkitError(f"unsupported image value of type {type(value).__name__}; send bytes, base64 or a uint8 array")
    value = bytes(value)
    if _BASE64_TEXT.fullmatch(value):  # base64 that reached us undecoded (``instances`` payloads, plain strings)
        try:
            value = base64.b64decode(value.split(b",", 1)[-1])
        except binascii.Error as exc:
            raise TransferkitError(f"cannot decode image ({len(value)} bytes): it is text but not valid base64 ({exc}); "
                                   "send the image's bytes or their base64 encoding") from None
    try:
        return decode_untrusted(value, min_short_side).image
    except ImageDecodeError as exc:
        raise TransferkitError(f"cannot decode image ({len(value)} bytes): {exc}") from None


def predictions_frame(task, probs: np.ndarray, class_names, top_k: int = DEFAULT_TOP_K) -> pd.DataFrame:
    """Probabilities → one row per image, in the task's output columns (single-label: best class, its
    probability, and the top-k lists)."""
    return pd.DataFrame(task.prediction_columns(probs, class_names, top_k), columns=list(task.output_columns))


def model_signature(task) -> ModelSignature:
    def column(name: str, kind: str) -> ColSpec:
        return ColSpec(Array(kind[:-2]), name) if kind.endswith("[]") else ColSpec(kind, name)

    return ModelSignature(
        inputs=Schema([ColSpec("binary", INPUT_COLUMN)]),
        outputs=Schema([column(name, kind) for name, kind in task.output_columns.items()]),
        params=ParamSchema([ParamSpec("top_k", "long", DEFAULT_TOP_K)]),
    )


def example_input(preprocessing) -> pd.DataFrame:
    """A small grey PNG at the model's input size: a valid request that documents the format."""
    height, width = preprocessing.input_hw
    buffer = io.BytesIO()
    Image.new("RGB", (int(width), int(height)), (128, 128, 128)).save(buffer, format="PNG")
    return pd.DataFrame({INPUT_COLUMN: [buffer.getvalue()]})


def log_model(checkpoint_path: str | os.PathLike, *, name: str = MODEL_ARTIFACT, register: str | None = None):
    """Log a transferkit checkpoint as a pyfunc model in the active run; returns MLflow's ``ModelInfo``.

    ``register`` also registers it under that name in the model registry.
    """
    from transferkit.models.preprocessing import Preprocessing  # torch: imported only when logging
    from transferkit.models.saved_model import find_checkpoint, read_checkpoint_metadata

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # MLflow's input-example check downloads
    checkpoint = find_checkpoint(checkpoint_path)
    metadata = read_checkpoint_metadata(checkpoint)
    preprocessing = Preprocessing.from_metadata(metadata)
    with tempfile.TemporaryDirectory(prefix="transferkit-model-") as tmp:
        folder = stage_checkpoint(checkpoint, metadata, Path(tmp) / MODEL_ARTIFACT)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=__file__,
            artifacts={MODEL_ARTIFACT: str(folder)},
            code_paths=[str(PACKAGE_DIR)],
            signature=model_signature(task_of(metadata)),
            input_example=example_input(preprocessing),
            pip_requirements=pip_requirements(),
            registered_model_name=register,
            metadata={"transferkit": {**{k: metadata.get(k) for k in ("kind", "backbone", "class_names")},
                                      "resize_mode": preprocessing.resize_mode}},
        )


def pip_requirements() -> list[str] | None:
    """transferkit's own dependencies pinned to the installed versions (None: let MLflow infer them)."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    try:
        needed = [Requirement(line) for line in requires("transferkit") or []]
        return [f"{req.name}=={version(req.name)}" for req in needed if req.marker is None]
    except PackageNotFoundError:
        return None


def stage_checkpoint(checkpoint: Path, metadata, folder: Path) -> Path:
    """Copy a checkpoint into ``folder`` as ``model.safetensors``/``model.json`` (+ an SVM's ``head_file``).

    ``model.safetensors`` is a name :func:`transferkit.models.saved_model.find_checkpoint` looks for, so a downloaded
    ``runs:/<id>/model`` resolves to it.
    """
    folder.mkdir(parents=True)
    shutil.copy2(checkpoint, folder / "model.safetensors")
    write_json(folder / "model.json", metadata)
    if metadata.get("head_file"):
        shutil.copy2(checkpoint.with_name(metadata["head_file"]), folder / metadata["head_file"])
    return folder


if __name__ != "transferkit.tracking.pyfunc_model":  # executed by MLflow as the model's code
    mlflow.models.set_model(TransferkitImageModel())
