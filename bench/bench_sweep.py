"""Sweep benchmark: stage-1 ranking, stage-2 results, and the sweep's wall time against the same trials run one
by one with `transferkit finetune`; then two processes sharing one sqlite study.

Usage (offline weights):
    TRANSFERKIT_WEIGHTS_DIR=/work/shared/weights python bench/bench_sweep.py [--img-size 128] [--epochs 1]
Every command runs as its own process, as a user would run it; output is markdown for docs/benchmarks/sweep.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from transferkit.sweep.leaderboard import markdown_table

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BACKBONES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "mobilenetv2_100"]


def run(command: list[str], log: Path) -> float:
    """Run a transferkit command; its wall time in seconds (fails loudly with the log)."""
    started = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call([sys.executable, "-m", "transferkit", *command], stdout=out, stderr=subprocess.STDOUT)
    if code:
        sys.exit(f"{' '.join(command[:2])} failed ({code}); see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started


def subset(data: Path, out: Path, per_class: dict) -> Path:
    """Symlinks to a seeded sample of ``per_class[split]`` images of every class (all when None)."""
    import random

    for split, count in per_class.items():
        for folder in sorted(p for p in (data / split).iterdir() if p.is_dir()):
            files = sorted(folder.iterdir())
            chosen = random.Random(0).sample(files, min(count, len(files))) if count else files
            (out / split / folder.name).mkdir(parents=True, exist_ok=True)
            for file in chosen:
                (out / split / folder.name / file.name).symlink_to(file.resolve())
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(SHARED / "data" / "signdigits"))
    parser.add_argument("--out", default=None, help="work folder [default: a new temp folder]")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--strategies", default="linear-probe,freeze-unfreeze")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--train-per-class", type=int, default=None, help="seeded subset of train images per class")
    parser.add_argument("--val-per-class", type=int, default=None, help="seeded subset of val images per class")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFERKIT_WEIGHTS_DIR", str(SHARED / "weights"))
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_sweep_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.train_per_class or args.val_per_class:
        args.data = str(subset(Path(args.data), work / "data", {"train": args.train_per_class,
                                                                 "validation": args.val_per_class}))
    fixed = {"img_size": args.img_size, "batch_size": 32, "device": "cpu", "amp": False, "workers": args.workers,
             "early_stopping": 0, "seed": 0}
    spec = work / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"backbones": BACKBONES, "top_k": args.top_k, "fixed": fixed}))

    print(f"# sweep benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
          f"load average {os.getloadavg()[0]:.1f} at start; data {args.data} (train/val per class: "
          f"{args.train_per_class or 'all'}/{args.val_per_class or 'all'}); img_size {args.img_size}, "
          f"epochs {args.epochs}, top-k {args.top_k}, strategies {args.strategies}, batch 32, no MLflow tracking\n")

    # 1. the sweep
    sweep_out = work / "sweep"
    sweep_seconds = run(["sweep", "--data", args.data, "--space", str(spec), "--strategies", args.strategies,
                         "--epochs", str(args.epochs), "--out", str(sweep_out), "--study", "bench", "--no-track"],
                        work / "sweep.log")
    ranking = pd.read_csv(sweep_out / "bench" / "ranking.csv")
    board = pd.read_csv(sweep_out / "bench" / "leaderboard.csv")
    print("## Stage 1: ranking by a cross-validated linear probe (5 folds on train)\n")
    print(markdown_table(ranking[["rank", "backbone", "probe_cv_accuracy", "probe_val_accuracy", "params_m", "features_seconds",
                   "probe_seconds", "finetuned"]]))
    print("\n## Stage 2: finetuned trials (best checkpoint)\n")
    print(markdown_table(board[["rank", "trial", "backbone", "strategy", "val_accuracy", "val_macro_f1", "val_loss",
                                "seconds"]]))
    winner = board.iloc[0]
    print(f"\nwinner: trial {winner['trial']}, {winner['backbone']} {winner['strategy']}: "
          f"val accuracy {winner['val_accuracy']:.4f}\n")

    # 2. the same trials one by one
    rows = []
    for row in board.itertuples():
        seconds = run(["finetune", "--recipe", str(Path(row.run_dir) / "config.yaml"), "--out", str(work / "single"),
                       "--name", f"trial-{row.trial}", "--no-track"], work / f"single-{row.trial}.log")
        single = pd.read_csv(work / "single" / f"trial-{row.trial}" / "metrics.csv")
        rows.append({"trial": row.trial, "backbone": row.backbone, "strategy": row.strategy,
                     "finetune_seconds": round(seconds, 1), "sweep_trial_seconds": row.seconds,
                     "finetune_best_val_accuracy": single["val_accuracy"].max(), "sweep_val_accuracy": row.val_accuracy})
    singles = pd.DataFrame(rows)
    total = singles["finetune_seconds"].sum()
    print("## Wall time: the sweep against the same trials run one by one with `transferkit finetune`\n")
    print(markdown_table(singles))
    print(f"\nwhole sweep (stage 1 for {len(BACKBONES)} backbones + {len(board)} trials, one process): "
          f"{sweep_seconds:.0f} s; sum of {len(singles)} finetune runs: {total:.0f} s; "
          f"ratio {sweep_seconds / total:.2f}x (target <= 1.1x)\n")

    # 3. two processes sharing one sqlite study
    shared_spec = work / "shared.yaml"
    shared_spec.write_text(yaml.safe_dump({"backbones": BACKBONES, "top_k": args.top_k, "fixed": fixed,
                                           "space": {"strategy": ["linear-probe"], "lr": [0.001, 0.003, 0.01]}}))
    storage = f"sqlite:///{work / 'shared.db'}"
    command = [sys.executable, "-m", "transferkit", "sweep", "--data", args.data, "--space", str(shared_spec),
               "--epochs", str(args.epochs), "--out", str(sweep_out), "--storage", storage, "--study", "shared",
               "--no-track"]
    started = time.perf_counter()
    logs = [open(work / f"shared-{i}.log", "w") for i in range(2)]
    processes = [subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT) for log in logs]
    codes = [p.wait() for p in processes]
    seconds = time.perf_counter() - started
    import optuna

    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    done = [t for t in trials if t.state.name == "COMPLETE"]
    configs = [(t.params["backbone"], t.params["lr"]) for t in done]
    by_worker = pd.Series([t.user_attrs.get("worker") for t in done]).value_counts()
    print("## Two processes, one sqlite study\n")
    print(f"exit codes {codes}; {len(done)} trials complete in {seconds:.0f} s, {len(set(configs))} distinct configs "
          f"(grid of {args.top_k * 3}); {len(trials)} trials in the study; run twice: "
          f"{len(configs) - len(set(configs))}")
    print("trials per process: " + ", ".join(f"pid {w.split(':')[-1]}: {n}" for w, n in by_worker.items()))
    print(f"\nwork folder: {work}")


if __name__ == "__main__":
    main()
