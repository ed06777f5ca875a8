"""Finetune strategies vs a plain hand-written timm + torchvision loop, on the real roads frames (CPU).

Same model (tf_efficientnet_lite0, ../shared/weights), data (roads train/val), epochs, batch size and LR
for everything:
  transferkit linear-probe     head only; backbone features extracted once (aug none)
  transferkit freeze-unfreeze  1 head epoch, then everything with discriminative LRs (the default)
  transferkit full             everything from the first step
  peer                         timm.create_model + torchvision ImageFolder/transforms + AdamW + CE,
                               every parameter trained, the loop a user writes from the timm docs
Printed per method: val accuracy after each epoch, best val accuracy, mean wall seconds per epoch
(training and validation; for the linear probe the one-off feature extraction is shown apart).
The machine is shared: wall times carry its load, accuracies do not (every method is seeded).

    .venv/bin/python bench/bench_finetune.py                 # 3 epochs, batch 16, lr 1e-3
    .venv/bin/python bench/bench_finetune.py --epochs 5 --methods peer full
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import BACKBONE, ROADS, WEIGHTS

METHODS = ("linear-probe", "freeze-unfreeze", "full", "peer")


def run_transferkit(strategy: str, args, out: Path) -> dict:
    from transferkit.train import finetune
    from transferkit.train.config import resolve_config

    config = resolve_config(None, {
        "backbone": BACKBONE, "weights": str(WEIGHTS), "data": str(ROADS), "strategy": strategy,
        "aug": "none" if strategy == "linear-probe" else "light", "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "workers": args.workers, "device": "cpu", "track": False, "out": str(out), "name": strategy,
        "seed": args.seed, "early_stopping": 0,
    })
    started = time.perf_counter()
    result = finetune(config, progress=False)
    total = time.perf_counter() - started
    epoch_seconds = [r["epoch_seconds"] for r in result.history]
    return {"acc": [r["val_accuracy"] for r in result.history], "epoch_s": epoch_seconds, "total_s": total}


def run_peer(args) -> dict:
    """The plain loop: what the timm and torchvision docs show, nothing transferkit-specific."""
    import timm
    import torch
    from torchvision import datasets, transforms

    torch.manual_seed(args.seed)
    model = timm.create_model(BACKBONE, pretrained=True, num_classes=2, pretrained_cfg_overlay=dict(file=str(WEIGHTS)))
    cfg = timm.data.resolve_data_config({}, model=model)
    size = cfg["input_size"][-1]
    normalize = transforms.Normalize(cfg["mean"], cfg["std"])
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    val_tf = transforms.Compose([transforms.Resize(int(size / cfg["crop_pct"])), transforms.CenterCrop(size),
                                 transforms.ToTensor(), normalize])
    train = torch.utils.data.DataLoader(datasets.ImageFolder(ROADS / "train", train_tf), batch_size=args.batch_size,
                                        shuffle=True, num_workers=args.workers, drop_last=True)
    val = torch.utils.data.DataLoader(datasets.ImageFolder(ROADS / "val", val_tf), batch_size=args.batch_size,
                                      num_workers=args.workers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    criterion = torch.nn.CrossEntropyLoss()
    accs, seconds = [], []
    started_all = time.perf_counter()
    for _ in range(args.epochs):
        started = time.perf_counter()
        model.train()
        for images, labels in train:
            optimizer.zero_grad()
            criterion(model(images), labels).backward()
            optimizer.step()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for images, labels in val:
                correct += (model(images).argmax(1) == labels).sum().item()
                total += len(labels)
        accs.append(correct / total)
        seconds.append(time.perf_counter() - started)
    return {"acc": accs, "epoch_s": seconds, "total_s": time.perf_counter() - started_all}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    args = parser.parse_args()
    if not WEIGHTS.is_file() or not ROADS.is_dir():
        raise SystemExit(f"needs {WEIGHTS} and {ROADS}")
    import torch

    print(f"roads: {ROADS}  backbone {BACKBONE}  epochs {args.epochs}  batch {args.batch_size}  lr {args.lr}  "
          f"torch threads {torch.get_num_threads()}  cpu count {os.cpu_count()}")
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for method in args.methods:
            results[method] = run_peer(args) if method == "peer" else run_transferkit(method, args, Path(out))
            r = results[method]
            print(f"  done {method}: val acc per epoch {[round(a, 3) for a in r['acc']]}  ({r['total_s']:.0f} s)", flush=True)
    print()
    print("| method | val acc per epoch | best val acc | s / epoch (mean) | total s |")
    print("|---|---|---|---|---|")
    for method, r in results.items():
        name = method if method == "peer" else f"transferkit {method}"
        per_epoch = sum(r["epoch_s"]) / len(r["epoch_s"])
        print(f"| {name} | {' / '.join(f'{a:.3f}' for a in r['acc'])} | {max(r['acc']):.3f} | {per_epoch:.1f} | "
              f"{r['total_s']:.0f} |")
    if "peer" in results and len(results) > 1:
        best = max((m for m in results if m != "peer"), key=lambda m: (max(results[m]["acc"]), -results[m]["total_s"]))
        delta = max(results[best]["acc"]) - max(results["peer"]["acc"])
        print(f"\nbest transferkit recipe: {best}, {delta * 100:+.1f} points of val accuracy over the peer loop "
              f"at {args.epochs} epochs ({len(results[best]['acc'])} epochs each)")


if __name__ == "__main__":
    main()
