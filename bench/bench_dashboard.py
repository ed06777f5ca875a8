"""Issue 25: what the MLflow dashboard shows of real finetunes: keys logged per run, and Chromium screenshots.

    python bench/bench_dashboard.py [--screenshots docs/benchmarks]   (PYTHONPATH=OLD_TREE counts the keys before)

Three short real finetunes of ``tf_efficientnet_lite0`` (weights from $TRANSFERKIT_WEIGHTS_DIR) on the roads
frames go into a fresh sqlite store; the script prints, per run, its MLflow run name and how many metrics,
per-class metrics, params and tags it logged, and the columns the runs table offers in all. With
``--screenshots`` it starts `transferkit ui --port 0` (loopback only) on the store and has headless Chromium
take the runs table from the link the command prints, and the best run's page.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROADS = Path(__file__).resolve().parents[2] / "shared" / "data" / "roads"
RUNS = {  # what differs between the runs of one experiment
    "probe": {"strategy": "linear-probe", "lr": 1e-2},
    "full-fast": {"strategy": "full", "lr": 1e-3},
    "full-slow": {"strategy": "full", "lr": 3e-4, "seed": 1},
}


def train(store: str, out: Path) -> None:
    from transferkit.train import finetune
    from transferkit.train.config import resolve_config

    for settings in RUNS.values():
        config = resolve_config(None, {"backbone": "tf_efficientnet_lite0", "data": str(ROADS), "out": str(out),
                                       "epochs": 2, "img_size": 128, "batch_size": 16, "workers": 0, "aug": "none",
                                       "tracking_uri": store, "experiment": "roads", **settings})
        finetune(config, progress=False)


def count(store: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("roads")
    columns: set[str] = set()
    print(f"{'run name':48} {'metrics':>7} {'per-class':>9} {'params':>6} {'tags':>4}")
    for run in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]):
        data = run.data
        per_class = [k for k in data.metrics if re.match(r"\w+_(precision|recall|f1)/", k)]
        visible_tags = [k for k in data.tags if not k.startswith("mlflow.")]
        columns |= {f"m:{k}" for k in data.metrics} | {f"p:{k}" for k in data.params} | {f"t:{k}" for k in visible_tags}
        print(f"{run.info.run_name:48} {len(data.metrics):7} {len(per_class):9} {len(data.params):6} {len(visible_tags):4}")
    print(f"columns offered by the runs table (metrics + params + tags): {len(columns)}")
    print(f"experiment description: {experiment.tags.get('mlflow.note.content', '(none)').splitlines()[0]}")


def screenshots(store: str, folder: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    server = subprocess.Popen([sys.executable, "-m", "transferkit", "ui", "--port", "0", "--backend-store-uri", store],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        first, link = server.stdout.readline(), server.stdout.readline().split(": ", 1)[1].strip()
        print(first.strip(), "\n ", link)
        url = re.search(r" at (\S+) ", first).group(1)
        _wait(f"{url}/health")
        from mlflow import MlflowClient

        client = MlflowClient(store)
        experiment = client.get_experiment_by_name("roads").experiment_id
        best = client.search_runs([experiment], order_by=["metrics.val_accuracy DESC", "metrics.val_loss ASC"])[0]
        with tempfile.TemporaryDirectory() as profile:
            for name, page, size in (("dashboard-runs.png", link, "2200,560"),
                                     ("dashboard-run.png", f"{url}/#/experiments/{experiment}/runs/{best.info.run_id}",
                                      "1500,1300")):
                subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                "--disable-background-networking", "--disable-sync", "--hide-scrollbars",
                                f"--user-data-dir={profile}", f"--window-size={size}", "--virtual-time-budget=25000",
                                f"--screenshot={folder / name}", page], capture_output=True, timeout=180, check=True)
                print(f"screenshot: {folder / name}")
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def _wait(url: str, timeout: float = 120) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--screenshots", type=Path, help="folder for the two PNGs")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFERKIT_WEIGHTS_DIR", str(ROADS.parents[1] / "weights"))
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        train(store, Path(tmp) / "runs")
        count(store)
        if args.screenshots:
            screenshots(store, args.screenshots)


if __name__ == "__main__":
    main()
