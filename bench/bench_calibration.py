"""Temperature scaling on small val splits: the former rule (fit T whenever val has an error) against the
current one (T stays 1 under 20 val images or when 5-fold cross-fitting does not lower the val NLL), CPU.

1. Synthetic: a 10-class model whose logits are ``z`` and whose labels are drawn from ``softmax(z / T_true)``,
   so the right temperature is known (T_true = 1: already calibrated; 2.5: over-confident). For each val size,
   --reps draws of a val set; each rule's T is scored on a 20,000-image test set of the same model (mean test
   NLL and ECE, and how often the rule kept T = 1).
2. Real (issue 24's case): tf_efficientnet_lite0 linear probe on ../shared/data/roads with 2 val images
   (one per class, seeded pick) and the other 20 val images as test; the run's own calibration, and the T the
   former rule fits on the same 2 val images, scored on the test images.

    .venv/bin/python bench/bench_calibration.py [--reps 200] [--seed 0] [--real-seeds 0 1 2] [--skip-synthetic]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import BACKBONE, ROADS, WEIGHTS

from transferkit.reports.metrics import expected_calibration_error
from transferkit.train.calibration import _fit_or_one, calibrate

CLASSES = 10
VAL_SIZES = (2, 5, 10, 20, 50, 200, 1000)


def draw(n: int, t_true: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(n, CLASSES, generator=generator) * 3
    labels = torch.multinomial((logits / t_true).softmax(1), 1, generator=generator).squeeze(1)
    return logits, labels


def scores(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> tuple[float, float]:
    scaled = logits / temperature
    return (F.cross_entropy(scaled, labels).item(),
            expected_calibration_error(labels.numpy(), scaled.softmax(1).numpy()))


def synthetic(reps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    print("synthetic, 10 classes; test NLL / ECE (mean over draws), T=1 kept (share of draws)")
    print(f"{'T_true':>6} {'val n':>6} | {'T = 1':>15} | {'former rule':>15} {'kept':>5} | {'current rule':>15} {'kept':>5}")
    for t_true in (1.0, 2.5):
        test = draw(20_000, t_true, generator)
        for n in VAL_SIZES:
            rows = {"one": [], "old": [], "new": []}
            kept = {"old": 0, "new": 0}
            for _ in range(reps):
                val = draw(n, t_true, generator)
                temperatures = {"one": 1.0, "old": _fit_or_one(*val), "new": calibrate(*val).temperature}
                for rule, temperature in temperatures.items():
                    rows[rule].append(scores(*test, temperature))
                kept["old"] += temperatures["old"] == 1.0
                kept["new"] += temperatures["new"] == 1.0
            mean = {rule: np.mean(values, axis=0) for rule, values in rows.items()}
            print(f"{t_true:>6} {n:>6} | {mean['one'][0]:.3f} / {mean['one'][1]:.3f} | "
                  f"{mean['old'][0]:.3f} / {mean['old'][1]:.3f} {kept['old'] / reps:>5.0%} | "
                  f"{mean['new'][0]:.3f} / {mean['new'][1]:.3f} {kept['new'] / reps:>5.0%}")


def real(seed: int) -> None:
    from transferkit.models.predictors import load_predictor
    from transferkit.train import finetune
    from transferkit.train.config import resolve_config

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="bench-calibration-") as tmp:
        data, test = Path(tmp) / "data", []
        shutil.copytree(ROADS / "train", data / "train")
        for folder in sorted((ROADS / "val").iterdir()):
            images = sorted(folder.glob("*.jpg"))
            chosen = rng.choice(images)
            (data / "val" / folder.name).mkdir(parents=True)
            shutil.copy(chosen, data / "val" / folder.name / chosen.name)
            test += [(p, folder.name) for p in images if p != chosen]
        config = resolve_config(None, {"backbone": BACKBONE, "weights": str(WEIGHTS), "data": str(data),
                                       "out": str(Path(tmp) / "runs"), "track": False, "workers": 0,
                                       "strategy": "linear-probe", "epochs": 3, "seed": seed, "aug": "none"})
        run = finetune(config, progress=False)
        calibration = json.loads((run.run_dir / "result.json").read_text())["calibration"]
        predictor = load_predictor(run.run_dir, "cpu")
        names = predictor.class_names

        def logits_of(items):  # log-probabilities at T = 1: logits up to a per-row constant
            probs = predictor.predict_proba([str(p) for p, _ in items])
            return torch.from_numpy(np.log(probs)).float(), torch.tensor([names.index(c) for _, c in items])

        val = logits_of([(p, p.parent.name) for p in sorted((data / "val").rglob("*.jpg"))])
        test_logits = logits_of(test)
        former = _fit_or_one(*val)
        print(f"\nreal (seed {seed}): {BACKBONE} linear probe on roads, 2 val images (val accuracy "
              f"{float((val[0].argmax(1) == val[1]).float().mean()):.2f}), {len(test)} test images")
        print(f"  run's calibration: T = {calibration['temperature']:.3f}, "
              f"reason: {calibration['temperature_reason']}")
        for label, temperature in (("T = 1 (current rule)", 1.0), (f"T = {former:.3f} (former rule)", former)):
            nll, ece = scores(*test_logits, temperature)
            print(f"  {label:<28} test NLL {nll:.4f}  ECE {ece:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real-seeds", type=int, nargs="*", default=[0], help="picks of the 2 val images (none: skip)")
    parser.add_argument("--skip-synthetic", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.skip_synthetic:
        synthetic(args.reps, args.seed)
    for seed in args.real_seeds:
        real(seed)


if __name__ == "__main__":
    main()
