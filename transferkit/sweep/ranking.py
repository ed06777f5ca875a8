"""Stage 1: rank backbones by a cross-validated linear probe on their frozen features.

Frozen-feature accuracy tracks finetuned accuracy across backbones (Kornblith, Shlens and Le, "Do Better
ImageNet Models Transfer Better?", CVPR 2019), so a logistic regression on scaled features, scored by
stratified cross-validation on the train split, ranks backbones for a fraction of a finetune's cost and
leaves the val split untouched for stage 2. Features are ``extract`` files under ``<out>/features/``: an
up-to-date file (same backbone, weights, preprocessing and data) is reused, never extracted twice, and the
linear-probe trials of stage 2 train on the same file — pretrained weights only: the features of a random init
(``pretrained: false``) belong to no other model, so each such trial computes its own backbone's.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from transferkit.errors import TransferkitError

PROBE_GRID = {"C": [0.1, 1.0]}  # stronger and default L2 on standardised features; the better one counts
PROBE_FOLDS = 5
FEATURES_FOLDER = "features"


def check_backbones(backbones: list[str]) -> list[str]:
    """Names timm knows, without duplicates; a one-line error otherwise."""
    import timm

    if not backbones:
        raise TransferkitError("no backbones to compare; pass --backbones a,b,c (or backbones: in the sweep file)")
    unknown = [name for name in backbones if not timm.is_model(name)]
    if unknown:
        raise TransferkitError(f"unknown backbone {unknown[0]!r}; run `transferkit backbones '*{unknown[0][:4]}*'` "
                               "to list names")
    return list(dict.fromkeys(backbones))


def features_path(out: str | Path, backbone: str) -> Path:
    return Path(out) / FEATURES_FOLDER / f"{backbone}.parquet"


def rank_backbones(backbones: list[str], data: str, out: str | Path, *, top_k: int, img_size: int | None = None,
                   resize_mode: str = "crop", val_ratio: float = 0.2, seed: int = 0, device: str = "auto",
                   workers: int | None = None, batch_size: int = 32, pretrained: bool = True,
                   say=print) -> pd.DataFrame:
    """One row per backbone, best first: probe CV accuracy, its val accuracy, size, and whether it made the cut."""
    from transferkit.features.classical_heads import fit_head
    from transferkit.features.extract import extract_features

    rows = []
    for backbone in backbones:
        started = time.perf_counter()
        path = extract_features(backbone, data, features_path(out, backbone), pretrained=pretrained,
                                resize_mode=resize_mode, batch_size=batch_size, workers=workers, device=device,
                                val_ratio=val_ratio, seed=seed,
                                data_overrides={"img_size": img_size} if img_size else None)
        extracted = time.perf_counter() - started
        probe = fit_head(path, "logistic", cv=PROBE_FOLDS, grid=PROBE_GRID, seed=seed)
        rows.append({"backbone": backbone, "probe_cv_accuracy": probe.cv_accuracy,
                     "probe_val_accuracy": probe.metrics.get("val", {}).get("accuracy"),
                     "params_m": parameter_count(backbone) / 1e6, "features_seconds": round(extracted, 1),
                     "probe_seconds": round(time.perf_counter() - started - extracted, 1), "features": str(path)})
        say(f"stage 1: {backbone}: probe cv accuracy {probe.cv_accuracy:.4f} ({probe.cv_folds} folds)")
    table = pd.DataFrame(rows).sort_values("probe_cv_accuracy", ascending=False, kind="stable")
    table.insert(0, "rank", range(1, len(table) + 1))
    table["finetuned"] = table["rank"] <= top_k
    return table.reset_index(drop=True)


def parameter_count(backbone: str) -> int:
    """Parameters of the backbone (its ImageNet head included), built on the meta device: no memory, no weights."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False)
    return sum(p.numel() for p in model.parameters())


def ranking_table(ranking: pd.DataFrame) -> str:
    """Stage 1 as text: the ranking, with a line where the cut falls."""
    lines = [f"{'rank':>4}  {'backbone':<28} {'probe cv acc':>12} {'probe val acc':>13} {'params':>8}  stage 2"]
    for row in ranking.itertuples():
        val = "" if pd.isna(row.probe_val_accuracy) else f"{row.probe_val_accuracy:.4f}"
        lines.append(f"{row.rank:>4}  {row.backbone:<28} {row.probe_cv_accuracy:>12.4f} {val:>13} "
                     f"{row.params_m:>7.1f}M  {'finetuned' if row.finetuned else 'cut'}")
    return "\n".join(lines)
