"""Predictors: a saved model of any kind turned back into "images in, class probabilities out".

The saved-model format itself lives in :mod:`transferkit.models.saved_model`; this module picks the predictor
class for a checkpoint's ``kind`` and rebuilds the model with its own preprocessing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from transferkit.errors import TransferkitError
from transferkit.models.backbones import load_backbone
from transferkit.models.embedding import build_feature_model, embed, resolve_layer
from transferkit.models.preprocessing import Preprocessing
from transferkit.models.saved_model import find_checkpoint, read_checkpoint_metadata
from transferkit.models.svm_head import head_probabilities, load_head
from transferkit.tasks import task_of


def load_predictor(spec: str | os.PathLike, device: str | torch.device = "cpu") -> Predictor:
    """Any saved transferkit model → a :class:`Predictor` of the right kind."""
    path = find_checkpoint(spec)
    metadata = read_checkpoint_metadata(path)
    kind = metadata.get("kind")
    if kind == "classifier":
        return ClassifierPredictor.from_checkpoint(path, metadata, torch.device(device))
    if kind == "svm":
        return SVMPredictor.from_checkpoint(path, metadata, torch.device(device))
    if kind == "ensemble":
        return EnsemblePredictor.from_checkpoint(path, metadata, torch.device(device))
    raise TransferkitError(f"{path} has unknown model kind {kind!r}; expected classifier, svm or ensemble")


class Predictor:
    """Images in, class probabilities out, with the model's own preprocessing."""

    members: tuple[Predictor, ...] = ()  # an ensemble's models, each with its own preprocessing

    def __init__(self, metadata: Mapping, device: torch.device):
        self.metadata = dict(metadata)
        self.class_names: list[str] = list(metadata["class_names"])
        self.task = task_of(metadata)  # how probabilities are made and decided
        self.preprocessing = Preprocessing.from_metadata(metadata)
        self.device = device

    def predict_proba_tensor(self, batch: torch.Tensor) -> np.ndarray:
        """Probabilities for an already preprocessed NCHW batch."""
        raise NotImplementedError

    def predict_proba(self, images, batch_size: int = 32) -> np.ndarray:
        """Probabilities for uint8 HWC arrays or image paths, in order."""
        out = [self.predict_proba_tensor(batch) for batch in self.preprocessing.batches(list(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.class_names)), dtype=np.float32)


class ClassifierPredictor(Predictor):
    """A finetuned timm model; ``model`` is exposed for export and CAMs."""

    def __init__(self, model: torch.nn.Module, metadata: Mapping, device: torch.device):
        super().__init__(metadata, device)
        from transferkit.core.runtime import prepare_model

        self.model = prepare_model(model, device).eval()

    @classmethod
    def from_checkpoint(cls, path: Path, metadata: Mapping, device: torch.device) -> ClassifierPredictor:
        model, _ = load_backbone(metadata["backbone"], weights=path, num_classes=len(metadata["class_names"]),
                                 **metadata.get("model_kwargs", {}))
        return cls(model, metadata, device)

    @property
    def temperature(self) -> float:
        """The softmax temperature fitted on val after training (1 when the model was not calibrated)."""
        return float(self.metadata.get("temperature", 1.0))

    @torch.inference_mode()
    def predict_proba_tensor(self, batch: torch.Tensor) -> np.ndarray:
        from transferkit.core.runtime import autocast, to_device

        with autocast(self.device):
            logits = self.model(to_device(batch, self.device))
        return self.probabilities(logits).cpu().numpy()

    def probabilities(self, logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The task's probabilities with the model's fitted temperature: every use of this model is calibrated
        the same way."""
        return self.task.probabilities(logits, self.temperature, dim)


class SVMPredictor(Predictor):
    """Images → frozen backbone → pooled vector → scikit-learn head (see :mod:`transferkit.models.svm_head`)."""

    def __init__(self, model: torch.nn.Module, head, metadata: Mapping, device: torch.device):
        from transferkit.core.runtime import prepare_model

        super().__init__(metadata, device)
        self.model = prepare_model(model, device).eval()
        self.head = head
        self.layer_index = resolve_layer(self.model, metadata.get("layer"))

    @classmethod
    def from_checkpoint(cls, path: Path, metadata: Mapping, device: torch.device) -> SVMPredictor:
        """The backbone from the checkpoint, the head from the ``head_file`` beside it."""
        head_path = Path(path).with_name(metadata["head_file"])
        if not head_path.is_file():
            raise TransferkitError(f"SVM model {path} lacks its head {head_path.name}; copy the whole model folder")
        model, _ = build_feature_model(metadata["backbone"], weights=path, **metadata.get("model_kwargs", {}))
        return cls(model, load_head(head_path, metadata), metadata, device)

    @torch.inference_mode()
    def predict_proba_tensor(self, batch: torch.Tensor) -> np.ndarray:
        from transferkit.core.runtime import autocast, to_device

        with autocast(self.device):
            vectors = embed(self.model, to_device(batch, self.device), pool=self.metadata["pool"],
                            layer=self.layer_index, tta=self.metadata.get("tta", "none"))
        return head_probabilities(self.head, vectors.float().cpu().numpy(), len(self.class_names))


class EnsemblePredictor(Predictor):
    """Several saved models, each with its own preprocessing, averaged on calibrated probabilities.

    The ensemble's checkpoint holds no weights: its metadata names the members (paths relative to it) with
    the sha256 they had when the ensemble was made, and their weights in the average.
    """

    def __init__(self, members: list[Predictor], weights: np.ndarray, metadata: Mapping):
        self.metadata = dict(metadata)
        self.class_names = list(metadata["class_names"])
        self.task = task_of(metadata)
        self.members = tuple(members)
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        # the first member's, for what needs one input (a CAM, a served page); scoring uses each member's own
        self.preprocessing = members[0].preprocessing
        self.device = members[0].device

    @classmethod
    def from_checkpoint(cls, path: Path, metadata: Mapping, device: torch.device) -> EnsemblePredictor:
        members = [load_predictor(check_member(path.parent, entry), device) for entry in metadata["members"]]
        return cls(members, [entry["weight"] for entry in metadata["members"]], metadata)

    def combine(self, member_probabilities) -> np.ndarray:
        """The weighted mean of the members' probabilities (each ``[N, C]``, in the ensemble's class order),
        re-scaled by the ensemble's own temperature (1 unless fitted on a val split)."""
        mean = np.tensordot(self.weights, np.stack(member_probabilities), axes=1)
        return rescale(mean, float(self.metadata.get("temperature", 1.0))).astype(np.float32)

    def predict_proba(self, images, batch_size: int = 32) -> np.ndarray:
        images = list(images)
        return self.combine([member.predict_proba(images, batch_size) for member in self.members])

    def predict_proba_tensor(self, batch: torch.Tensor) -> np.ndarray:
        raise TransferkitError("an ensemble's members each preprocess images their own way; pass images, "
                               "not a preprocessed batch")


def rescale(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(p) / T)`` row by row: probabilities re-scaled as logits are by a temperature."""
    if temperature == 1.0:
        return probabilities
    logits = np.log(np.clip(probabilities, 1e-12, None)) / temperature
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def member_fingerprint(checkpoint: Path) -> str:
    """sha256 of a member's checkpoint, and of an SVM member's head file with it: what must not change."""
    from transferkit.core.fileio import sha256_file

    digest = sha256_file(checkpoint)
    head = read_checkpoint_metadata(checkpoint).get("head_file")
    return digest + (":" + sha256_file(checkpoint.with_name(head)) if head else "")


def check_member(folder: Path, entry: Mapping) -> Path:
    """An ensemble member's checkpoint, refused when it is gone or changed since the ensemble was made."""
    checkpoint = (folder / entry["path"]).resolve()
    if not checkpoint.is_file():
        raise TransferkitError(f"ensemble member {checkpoint} is missing; the ensemble in {folder} needs it "
                               "where it was (rebuild the ensemble to use other members)")
    if member_fingerprint(checkpoint) != entry["sha256"]:
        raise TransferkitError(f"ensemble member {checkpoint} changed since the ensemble in {folder} was made "
                               "(sha256 differs); rebuild the ensemble with `transferkit ensemble`")
    return checkpoint
