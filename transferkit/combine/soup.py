"""Weight soups (Wortsman et al. 2022, "Model soups"): finetuned runs of one backbone from the same pretrained
weights, averaged weight by weight into one model at the cost of one.

``greedy`` (the paper's recommendation) ranks the runs by val accuracy and adds each to the soup only if the
soup's val accuracy does not drop; ``uniform`` averages all. Where the members' BatchNorm running statistics
differ, the averaged weights have no statistics of their own: they are re-estimated on the training images
(``torch.optim.swa_utils.update_bn``, as for SWA). The soup's softmax temperature is fitted again on val. The
result is an ordinary ``classifier`` checkpoint: export, serve and the MLflow model take it as any run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from transferkit import params
from transferkit.combine.members import Member, labelled_split, read_members, scores
from transferkit.core.fileio import atomic_dir, refuse_non_empty
from transferkit.errors import TransferkitError
from transferkit.models.saved_model import save_checkpoint

# what members must share for their weights to be averaged: one architecture, one starting point, one output
SHARED_KEYS = ("backbone", "model_kwargs", "pretrained_weights", "class_names", "preprocessing")


def make_soup(models: Sequence[str | os.PathLike], out: str | os.PathLike, *, data, recipe: str = "greedy",
              batch_size: int = 32, workers: int | None = None, device: str = "auto") -> Path:
    """Average the finetuned ``models`` into one checkpoint in the folder ``out`` (scored on ``data``'s val)."""
    from transferkit.core.runtime import select_device

    params.SOUP_RECIPE.check("recipe", recipe)
    params.BATCH_SIZE.check("batch_size", batch_size)
    out = Path(out)
    refuse_non_empty(out)
    members = read_members(models)
    _check_soupable(members)
    states = [load_file(str(m.checkpoint)) for m in members]
    _check_same_tensors(members, states)
    judge = _Judge(members[0], data, batch_size, workers, select_device(device))
    member_scores = [judge.score(state) for state in states]
    order = sorted(range(len(members)), key=lambda i: (-member_scores[i]["accuracy"], member_scores[i]["nll"]))
    ingredients = [order[0]] if recipe == "greedy" else order
    soup_scores = judge.score(judge.average([states[i] for i in ingredients]))
    if recipe == "greedy":
        for i in order[1:]:
            candidate = judge.score(judge.average([states[j] for j in [*ingredients, i]]))
            if candidate["accuracy"] >= soup_scores["accuracy"]:
                ingredients, soup_scores = [*ingredients, i], candidate
    state = judge.average([states[i] for i in ingredients])
    soup_scores, calibration = judge.finish(state, [states[i] for i in ingredients])
    metadata = {
        **{k: v for k, v in members[0].metadata.items() if k not in ("epoch", "metrics", "recipe")},
        "temperature": calibration.temperature,
        "calibration": calibration.metrics(),
        "soup": {"recipe": recipe, "data": str(data), "split": judge.val.name, "images": len(judge.val.paths),
                 "members": [{"path": str(m.checkpoint), "val": s, "in_soup": i in ingredients}
                             for i, (m, s) in enumerate(zip(members, member_scores))],
                 "val": soup_scores, "bn_reestimated": judge.bn_reestimated},
    }
    with atomic_dir(out) as tmp:
        save_checkpoint(tmp / "model", judge.model, metadata)
    return out


def _check_soupable(members: list[Member]) -> None:
    first = members[0]
    for member in members:
        if member.metadata.get("kind") != "classifier":
            raise TransferkitError(f"{member.spec} is of kind {member.metadata.get('kind')}; a soup averages the "
                                   "weights of finetuned runs (use `transferkit ensemble` to combine other models)")
        differ = [key for key in SHARED_KEYS if member.metadata.get(key) != first.metadata.get(key)]
        if differ:
            raise TransferkitError(
                f"{member.spec} and {first.spec} differ in {', '.join(differ)}: only runs of one backbone "
                "finetuned from the same pretrained weights can be averaged (use `transferkit ensemble` instead)")


def _check_same_tensors(members: list[Member], states: list[dict]) -> None:
    for member, state in zip(members[1:], states[1:]):
        if state.keys() != states[0].keys() or any(state[k].shape != states[0][k].shape for k in state):
            raise TransferkitError(f"{member.spec} has other layers than {members[0].spec}; they cannot be averaged")


class _Judge:
    """One model, loaded once, that takes each candidate's weights in turn and scores them on val."""

    def __init__(self, first: Member, data, batch_size: int, workers, device: torch.device):
        from transferkit.models.backbones import load_backbone
        from transferkit.models.predictors import ClassifierPredictor

        meta = first.metadata
        model, _ = load_backbone(meta["backbone"], weights=first.checkpoint, num_classes=len(meta["class_names"]),
                                 **meta.get("model_kwargs", {}))
        self.predictor = ClassifierPredictor(model, {**meta, "temperature": 1.0}, device)
        self.model = self.predictor.model
        self.data, self.batch_size, self.workers = data, batch_size, workers
        self.val = labelled_split(self.predictor, data, "val")
        self.bn_reestimated = False

    @staticmethod
    def average(states: list[dict]) -> dict:
        """The mean of each floating-point tensor; counters (BatchNorm's num_batches_tracked) from the first."""
        return {key: torch.stack([s[key].float() for s in states]).mean(0).to(tensor.dtype)
                if tensor.is_floating_point() else tensor for key, tensor in states[0].items()}

    def score(self, state: dict) -> dict:
        return scores(self._probabilities(state), self.val.labels)

    def finish(self, state: dict, ingredients: list[dict]):
        """Load the soup for good: fresh BatchNorm statistics where the ingredients' differ, a new temperature."""
        from transferkit.train.calibration import calibrate

        self.model.load_state_dict(state)
        if _batchnorm_stats_differ(self.model, ingredients):
            self._reestimate_batchnorm()
            self.bn_reestimated = True
        probs = self._probabilities(None)
        calibration = calibrate(torch.from_numpy(np.log(np.clip(probs, 1e-12, None))), torch.from_numpy(self.val.labels))
        return scores(probs, self.val.labels), calibration

    def _probabilities(self, state: dict | None) -> np.ndarray:
        from transferkit.use.predict import predict_paths

        if state is not None:
            self.model.load_state_dict(state)
        probs, errors = predict_paths(self.predictor, self.val.paths, batch_size=self.batch_size, workers=self.workers)
        if any(errors):
            raise TransferkitError(f"cannot read {sum(map(bool, errors))} val images (e.g. {next(e for e in errors if e)})")
        return probs.astype(np.float64)

    def _reestimate_batchnorm(self) -> None:
        from transferkit.core.runtime import to_device

        train = labelled_split(self.predictor, self.data, "train")
        device = self.predictor.device
        batches = (to_device(batch, device) for batch in self.predictor.preprocessing.batches(train.paths, self.batch_size))
        torch.optim.swa_utils.update_bn(batches, self.model)
        self.model.eval()


def _batchnorm_stats_differ(model: torch.nn.Module, states: list[dict]) -> bool:
    names = [f"{name}.running_mean" for name, module in model.named_modules()
             if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None]
    return any(not torch.equal(s[name], states[0][name]) for s in states[1:] for name in names)
