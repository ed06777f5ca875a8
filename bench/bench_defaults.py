"""Defaults benchmark: accuracy per epoch and wall time of the old default, the new default and two peers.

On ``../shared/data/signdigits`` (10 classes; train / validation folders) with ``tf_efficientnet_lite0`` from
``../shared/weights``:

(a) the default recipe of commit 4be90e4: freeze-unfreeze with one head-only epoch over augmented images
    (``freeze_epochs: 1, lp_ft: false``), BatchNorm statistics re-estimated once unfrozen, the LR halved once
    unfrozen, no calibration;
(b) the new default: LP-FT head phase on cached features (the probe is epoch 0's candidate), then every epoch
    trains everything at the head's LR (layer decay below it) with BatchNorm's pretrained statistics kept;
    calibration on;
(c) a hand-written timm + torchvision loop (RandomResizedCrop + flip, AdamW, cosine, label smoothing 0.1);
(d) frozen features + scikit-learn logistic regression (StandardScaler, C=1).

All arms see the same seeded train subset and the full validation split at the same input size; the scale-down
(``--per-class``, ``--val-per-class``, ``--img-size``) is printed with the results. Usage:
    python bench/bench_defaults.py --epochs 3 --per-class 10 --val-per-class 15 --img-size 64
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

from _common import BACKBONE, SHARED, WEIGHTS

DATA = SHARED / "data" / "signdigits"


def subset(root: Path, per_class: int | None, val_per_class: int | None, seed: int = 0) -> Path:
    """A folder of symlinks: ``per_class`` seeded train and ``val_per_class`` val images per class (None: all)."""
    out = Path(tempfile.mkdtemp(prefix="signdigits-"))
    rng = random.Random(seed)
    for split in ("train", "validation"):
        for cls in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            files = sorted(cls.iterdir())
            keep = per_class if split == "train" else val_per_class
            if keep is not None:
                files = sorted(rng.sample(files, min(keep, len(files))))
            (out / split / cls.name).mkdir(parents=True)
            for f in files:
                (out / split / cls.name / f.name).symlink_to(f)
    return out


def transferkit_arm(data: Path, epochs: int, img_size: int, **settings) -> dict:
    from transferkit.train import finetune
    from transferkit.train.config import resolve_config

    out = Path(tempfile.mkdtemp(prefix="bench-defaults-runs-"))
    config = resolve_config(None, {"backbone": BACKBONE, "weights": str(WEIGHTS), "data": str(data), "out": str(out),
                                   "track": False, "epochs": epochs, "img_size": img_size, "workers": 0,
                                   "early_stopping": 0, **settings})
    started = time.perf_counter()
    result = finetune(config, progress=True)
    seconds = time.perf_counter() - started
    summary = json.loads((result.run_dir / "result.json").read_text())
    return {"val_acc": result.best["val_accuracy"], "best_epoch": result.best_epoch, "seconds": seconds,
            "final_val_acc": result.history[-1]["val_accuracy"], "calibration": summary.get("calibration")}


def timm_torchvision_loop(data: Path, epochs: int, img_size: int, seed: int = 0) -> dict:
    """What a user would write by hand with timm and torchvision: the peer of (b)."""
    import timm
    import torch
    from safetensors.torch import load_file
    from torchvision import datasets
    from torchvision import transforms as T

    torch.manual_seed(seed)
    started = time.perf_counter()
    model = timm.create_model(BACKBONE, pretrained=False, num_classes=10)
    state = {k: v for k, v in load_file(str(WEIGHTS)).items() if not k.startswith("classifier.")}
    model.load_state_dict(state, strict=False)
    cfg = timm.data.resolve_data_config({}, model=model)
    normalize = T.Normalize(cfg["mean"], cfg["std"])
    train_tf = T.Compose([T.RandomResizedCrop(img_size, scale=(0.6, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                          normalize])
    val_tf = T.Compose([T.Resize(int(math.floor(img_size / cfg["crop_pct"]))), T.CenterCrop(img_size), T.ToTensor(),
                        normalize])
    train = torch.utils.data.DataLoader(datasets.ImageFolder(data / "train", train_tf), batch_size=16, shuffle=True,
                                        num_workers=0, drop_last=True)
    val = torch.utils.data.DataLoader(datasets.ImageFolder(data / "validation", val_tf), batch_size=64, num_workers=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(train))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    accuracies = []
    for _ in range(epochs):
        model.train()
        for images, labels in train:
            optimizer.zero_grad()
            criterion(model(images), labels).backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in val:
                correct += (model(images).argmax(1) == labels).sum().item()
        accuracies.append(correct / len(val.dataset))
        print(f"peer loop epoch {len(accuracies)}: val_acc {accuracies[-1]:.4f}", flush=True)
    return {"val_acc": max(accuracies), "final_val_acc": accuracies[-1], "seconds": time.perf_counter() - started}


def features_logistic(data: Path, img_size: int) -> dict:
    """Frozen pre-logits features (timm's eval transform) + StandardScaler + LogisticRegression."""
    import numpy as np
    import timm
    import torch
    from safetensors.torch import load_file
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from torchvision import datasets

    started = time.perf_counter()
    model = timm.create_model(BACKBONE, pretrained=False, num_classes=0)
    state = {k: v for k, v in load_file(str(WEIGHTS)).items() if not k.startswith("classifier.")}
    model.load_state_dict(state)
    model.eval()
    cfg = timm.data.resolve_data_config({"input_size": (3, img_size, img_size)}, model=model)
    transform = timm.data.create_transform(**cfg)

    def features(split):
        loader = torch.utils.data.DataLoader(datasets.ImageFolder(data / split, transform), batch_size=64,
                                             num_workers=0)
        rows, labels = [], []
        with torch.no_grad():
            for images, y in loader:
                rows.append(model(images).numpy())
                labels.append(y.numpy())
        return np.concatenate(rows), np.concatenate(labels)

    (x_train, y_train), (x_val, y_val) = features("train"), features("validation")
    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)).fit(x_train, y_train)
    return {"val_acc": float((head.predict(x_val) == y_val).mean()), "seconds": time.perf_counter() - started}


def svm_head_timing(features_file: Path, model: str = "logistic") -> dict:
    """Seconds to choose and fit the head on a features file: 4be90e4's search vs today's :func:`fit_head`."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from transferkit.features.classical_heads import DEFAULT_GRIDS, fit_head, make_estimator
    from transferkit.features.feature_file import read_features

    table, metadata = read_features(features_file)
    train = table.subset("train")
    started = time.perf_counter()  # 4be90e4: one process, scaler refitted per fold and candidate, then a refit
    search = GridSearchCV(Pipeline([("scale", StandardScaler()), ("clf", make_estimator(model))]),
                          {f"clf__{k}": v for k, v in DEFAULT_GRIDS[model].items()},
                          cv=StratifiedKFold(5, shuffle=True, random_state=0), scoring="accuracy", refit=False)
    search.fit(train.vectors, train.label_index)
    best = {k.removeprefix("clf__"): v for k, v in search.best_params_.items()}
    Pipeline([("scale", StandardScaler()), ("clf", make_estimator(model, **best))]).fit(train.vectors, train.label_index)
    old = time.perf_counter() - started
    started = time.perf_counter()
    result = fit_head((table, metadata), model, progress=False)
    new = time.perf_counter() - started
    return {"rows": len(train), "dim": int(train.vectors.shape[1]), "old_seconds": old, "new_seconds": new,
            "old_best": best, "new_best": result.best_params, "new_cv_accuracy": result.cv_accuracy}


ARMS = {  # (data, epochs, img_size, seed) -> result
    "a: old default (4be90e4)": lambda d, e, s, r: transferkit_arm(d, e, s, freeze_epochs=1, lp_ft=False, seed=r,
                                                                   calibrate=False, bn_stats="update",
                                                                   unfreeze_lr_scale=0.5),
    "b: new default": lambda d, e, s, r: transferkit_arm(d, e, s, seed=r),
    "b at one epoch less (LP-FT at about a's wall time)":
        lambda d, e, s, r: transferkit_arm(d, e - 1, s, seed=r) if e > 1 else None,
    "c: timm + torchvision loop": lambda d, e, s, r: timm_torchvision_loop(d, e, s, seed=r),
    "d: features + logistic regression": lambda d, e, s, r: features_logistic(d, s),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=None, help="seeded train images per class (default all)")
    parser.add_argument("--val-per-class", type=int, default=None, help="seeded val images per class (default all)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--arms", default="abcd", help="letters of the arms to run (B = b at one epoch less)")
    parser.add_argument("--seed", type=int, default=0, help="training seed of arms a-c (the data subset keeps seed 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 when two arms share a 2-core machine")
    parser.add_argument("--svm-features", type=Path, default=None,
                        help="only time the SVM/logistic head search on this features file")
    args = parser.parse_args()
    if args.svm_features:
        print(json.dumps(svm_head_timing(args.svm_features)), flush=True)
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    data = subset(DATA, args.per_class, args.val_per_class)
    n_train = sum(1 for _ in (data / "train").rglob("*") if _.is_file())
    n_val = sum(1 for _ in (data / "validation").rglob("*") if _.is_file())
    print(f"# signdigits: {n_train} train images ({args.per_class or 'all'} per class, seed 0), {n_val} val "
          f"({args.val_per_class or 'all'} per class); "
          f"{BACKBONE} at {args.img_size} px; {args.epochs} epochs; training seed {args.seed}; "
          f"torch threads {torch.get_num_threads()}",
          flush=True)
    letters = {"a": "a: old", "b": "b: new", "B": "b at one", "c": "c: timm", "d": "d: features"}
    results = {}
    for letter in args.arms:
        name = next(n for n in ARMS if n.startswith(letters[letter]))
        result = ARMS[name](data, args.epochs, args.img_size, args.seed)
        if result is not None:
            results[name] = result
            print(json.dumps({"arm": name, **result}), flush=True)
    print("\n| arm | best val acc | last-epoch val acc | wall s |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['val_acc']:.4f} | {r.get('final_val_acc', r['val_acc']):.4f} | {r['seconds']:.0f} |")
    for name, r in results.items():
        if r.get("calibration"):
            c = r["calibration"]
            print(f"\n{name}: temperature {c['temperature']:.3f}, val ECE {c['val_ece_uncalibrated']:.4f} -> "
                  f"{c['val_ece_calibrated']:.4f}, val NLL {c['val_nll_uncalibrated']:.4f} -> {c['val_nll_calibrated']:.4f}")


if __name__ == "__main__":
    main()
