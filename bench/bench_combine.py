"""Ensembles and soups against their best member, on real data with real ImageNet weights (CPU).

The dataset's own validation images are split in two halves by a hash of the file name: ``val`` (ensemble
weights, soup acceptance) and ``test`` (every number reported here), so nothing is scored on the images that
chose it; ``--swap-halves`` swaps their roles (run both: one half is ~150 images, one image 0.65 points). Members:

- frozen-feature linear probes (``transferkit svm --model logistic``) of the three backbones in
  ``../shared/weights`` (tf_efficientnet_lite0, tf_efficientnet_lite1, mobilenetv2_100);
- with ``--finetune-members N``: N one-epoch finetunes of tf_efficientnet_lite0 (seeds 0..N-1, LP-FT default),
  which share their pretrained weights and so can also be souped.

Usage:
    python bench/bench_combine.py --data signdigits
    python bench/bench_combine.py --data ucm-scenes --finetune-members 3
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from _common import SHARED

BACKBONES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "mobilenetv2_100")
WEIGHTS = SHARED / "weights"


def _half(name: str, swap: bool = False) -> str:
    first = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 2 == 0
    return "val" if first != swap else "test"


def _link(src: Path, root: Path, split: str, label: str) -> None:
    target = root / split / label / src.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.symlink(src, target)


def build_dataset(name: str, per_class: int | None, swap: bool) -> Path:
    """train / val / test folders of symlinks; val and test are the two halves of the source's validation split."""
    root = Path(tempfile.mkdtemp(prefix=f"combine-{name}-"))
    if name == "signdigits":
        source = SHARED / "data" / "signdigits"
        rows = [(p, "train", p.parent.name) for p in sorted((source / "train").glob("*/*"))]
        rows += [(p, _half(p.name, swap), p.parent.name) for p in sorted((source / "validation").glob("*/*"))]
    else:  # ucm-scenes: the scene folders of the multi-label set, as a 21-class single-label task
        source = SHARED / "data" / "ucm-multilabel"
        with open(source / "labels.csv") as fh:
            rows = [(source / r["path"], "train" if r["split"] == "train" else _half(r["path"], swap),
                     Path(r["path"]).parent.name) for r in csv.DictReader(fh)]
    counts: dict = {}
    for path, split, label in rows:
        counts[(split, label)] = counts.get((split, label), 0) + 1
        if split == "train" and per_class and counts[(split, label)] > per_class:
            continue
        _link(path, root, split, label)
    return root


def svm_members(data: Path, out: Path) -> list[Path]:
    from transferkit.features.svm_training import train_svm

    members = []
    for backbone in BACKBONES:
        if (out / f"svm-{backbone}").is_dir():  # --models: members trained by an earlier run (train split only)
            members.append(out / f"svm-{backbone}")
            continue
        start = time.perf_counter()
        result = train_svm(backbone=backbone, data=data, model="logistic", out=out / f"svm-{backbone}",
                           weights=WEIGHTS / f"{backbone}.safetensors", track=False, device="cpu", workers=1)
        print(f"member svm-{backbone}: {time.perf_counter() - start:.0f} s", flush=True)
        members.append(result.out)
    return members


def finetune_members(data: Path, out: Path, n: int) -> list[Path]:
    from transferkit.train.config import resolve_config
    from transferkit.train.engine import finetune

    members = []
    for seed in range(n):
        if (out / f"ft-seed{seed}").is_dir():
            members.append(out / f"ft-seed{seed}")
            continue
        start = time.perf_counter()
        config = resolve_config("quick-cpu", {"data": str(data), "out": str(out), "name": f"ft-seed{seed}",
                                              "epochs": 1, "seed": seed, "track": False,
                                              "weights": str(WEIGHTS / "tf_efficientnet_lite0.safetensors")})
        result = finetune(config, progress=False)
        print(f"member ft-seed{seed}: {time.perf_counter() - start:.0f} s", flush=True)
        members.append(Path(result.run_dir))
    return members


def score(model: Path, data: Path) -> dict:
    """Test-split accuracy, NLL and ECE of one model folder, and its predict wall time per image."""
    from transferkit.combine.members import labelled_split, scores
    from transferkit.models.predictors import load_predictor
    from transferkit.use.predict import predict_paths

    predictor = load_predictor(model, "cpu")
    test = labelled_split(predictor, data, "test")
    start = time.perf_counter()
    probs, errors = predict_paths(predictor, test.paths, workers=1)
    seconds = time.perf_counter() - start
    assert not any(errors), errors[:3]
    return {**scores(probs, test.labels), "ms_per_image": 1000 * seconds / len(test.paths)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("signdigits", "ucm-scenes"), default="signdigits")
    parser.add_argument("--per-class", type=int, default=None, help="train images per class (default: all)")
    parser.add_argument("--finetune-members", type=int, default=0)
    parser.add_argument("--swap-halves", action="store_true",
                        help="choose on half B of the validation split and report on half A (default: the reverse)")
    parser.add_argument("--models", type=Path, default=None,
                        help="folder for the members; ones already there (from an earlier run) are reused")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    from transferkit.combine.ensemble import build_ensemble
    from transferkit.combine.soup import make_soup

    data = build_dataset(args.data, args.per_class, args.swap_halves)
    out = args.models or Path(tempfile.mkdtemp(prefix="combine-models-"))
    combined = Path(tempfile.mkdtemp(prefix="combine-out-"))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, CPU only; data {data}", flush=True)
    groups = {"svm": svm_members(data, out)}
    if args.finetune_members:
        groups["finetuned"] = finetune_members(data, out, args.finetune_members)
    models: dict[str, Path] = {m.name: m for members in groups.values() for m in members}
    for group, members in groups.items():
        for selection in ("uniform", "greedy"):
            start = time.perf_counter()
            models[f"ensemble-{group}-{selection}"] = build_ensemble(
                members, combined / f"ensemble-{group}-{selection}", data=data, selection=selection, device="cpu",
                workers=1)
            print(f"ensemble-{group}-{selection}: built in {time.perf_counter() - start:.0f} s", flush=True)
    if "finetuned" in groups:
        for recipe in ("greedy", "uniform"):
            models[f"soup-{recipe}"] = make_soup(groups["finetuned"], combined / f"soup-{recipe}", data=data,
                                                 recipe=recipe, device="cpu", workers=1)
    results = {name: score(path, data) for name, path in models.items()}
    half = "A" if args.swap_halves else "B"
    print(f"\n{args.data}: test = half {half} of the source's validation split (the other half chose weights)")
    print(f"{'model':34s} {'accuracy':>9s} {'NLL':>7s} {'ECE':>7s} {'ms/img':>7s}")
    for name, r in results.items():
        print(f"{name:34s} {r['accuracy']:9.4f} {r['nll']:7.4f} {r['ece']:7.4f} {r['ms_per_image']:7.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
