"""Features of the frozen backbone, computed once for a head that trains on vectors instead of images.

A linear probe without train-time augmentation, and LP-FT's head phase, both see every image the same way
every epoch: the backbone then runs once over train and val (or an ``extract`` file of exactly these weights,
preprocessing and images is reused) and the head trains on the vectors.
"""

from __future__ import annotations

import time
from pathlib import Path

from torch.utils.data import TensorDataset

from transferkit.data.dataset import make_loader
from transferkit.train import loaders


def cached_features(model, train_set, val_set, *, config, device, amp: bool, stored: Path | None, preprocessing,
                    index, fingerprint: str, say) -> list[TensorDataset]:
    """``[train, val]`` feature datasets of ``model``'s backbone: from ``stored`` when it matches, else computed."""
    from transferkit.features.extract import compute_features

    if stored is not None:
        reused = stored_features(stored, backbone_features_identity(model, preprocessing), index, fingerprint, say)
        if reused is not None:
            return reused
    started = time.perf_counter()
    sets = []
    for dataset in (train_set, val_set):
        loader = make_loader(dataset, config.batch_size, workers=config.workers, device=device)
        sets.append(loaders.feature_dataset(*compute_features(model, loader, device, amp=amp)))
    say(f"features extracted once for the head in {time.perf_counter() - started:.1f} s "
        f"({len(train_set)} train, {len(val_set)} val images)")
    return sets


def stored_features(path: Path, identity: dict, index, fingerprint: str, say) -> list[TensorDataset] | None:
    """Train and val vectors from the ``extract`` file ``path`` if it holds exactly what this run computes:
    the same backbone ``identity`` (weights, preprocessing, pool), data fingerprint and split. Features of a
    random init are never reused: the head would train on another model's vectors than the one it is saved with."""
    from transferkit.features.feature_file import feature_identity_mismatch, read_features, read_metadata

    metadata = read_metadata(path)
    differ = feature_identity_mismatch(metadata, identity)
    if identity.get("weights") == "random-init":  # two random inits share the name, never the weights
        differ.append("weights: a random init's features belong to no other model")
    if metadata["dataset"]["fingerprint"] != fingerprint:
        differ.append("dataset")
    if not differ:
        table, _ = read_features(path)
        splits = {split: table.subset(split) for split in ("train", "val")}
        if all(list(rows.paths) == [index.relpath(s) for s in index.split(split)] for split, rows in splits.items()):
            say(f"linear probe on the features in {path}")
            return [loaders.feature_dataset(rows.vectors, rows.label_index) for rows in splits.values()]
        differ.append("split")
    say(f"features in {path} differ from this run's ({', '.join(differ)}); extracting again")
    return None


def backbone_features_identity(model, preprocessing) -> dict:
    """What an ``extract`` file must state to hold this run's head features (no layer, no TTA)."""
    from transferkit.models.backbones import backbone_identity
    from transferkit.models.embedding import own_pool

    return {**backbone_identity(model), **preprocessing.to_metadata(), "pool": own_pool(model), "layer": None,
            "tta": "none"}
