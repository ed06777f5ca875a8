"""MLflow on CPU: what tracking costs a training run, and how fast the logged pyfunc model answers.

A tf_efficientnet_lite0 classifier (real ImageNet backbone from ../shared/weights, fresh 2-class head) is
saved as a transferkit checkpoint, then, against a local sqlite store in a temp folder:

1. ``start_run`` + end (no system metrics), one per-epoch ``log_metrics`` call (8 metrics), ``log_params``
   of a 60-key config, ``log_artifact`` of a 100 kB PNG;
2. ``tracker.log_model`` (stage checkpoint, bundle code, validate the input example) and
   ``mlflow.pyfunc.load_model``;
3. images/s over the roads frames: ``load_predictor(...).predict_proba(paths)`` against the pyfunc model fed
   file bytes, base64 strings and uint8 arrays (the wrapper's overhead: decode + schema checks);
4. ``mlflow models serve --env-manager local`` on loopback: start-up time and request latency for 1 and
   16 base64 images (median of --requests).

5. ``--overhead``: what tracking costs a real finetune on the roads frames. Every Tracker method that talks
   to MLflow (and ``start_run``'s enter and exit) is timed while ``finetune`` trains; time spent during the
   epochs is the per-epoch overhead, the rest (opening the run, params, dataset, val report, model) the
   per-run overhead, set against the epoch's own wall time. Run it against an older checkout (its path
   first on PYTHONPATH) for a before/after comparison; only the methods that checkout has are timed.

The machine is shared: timings are the best of --rounds (medians for HTTP requests).

    .venv/bin/python bench/bench_tracking.py
    .venv/bin/python bench/bench_tracking.py --overhead --epochs 3 --img-size 160
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _common import BACKBONE, ROADS, WEIGHTS, best_time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, payload: dict) -> float:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        json.load(response)
    return time.perf_counter() - start


TIMED_METHODS = ("log_params", "log_metrics", "log_artifact", "log_dict", "log_text", "set_tags", "log_dataset",
                 "log_model", "set_description", "log_evaluation")


def tracking_overhead(args) -> None:
    """A tracked finetune on the roads frames with every MLflow call timed (outermost call only)."""
    import contextlib
    import functools
    import threading

    import torch

    from transferkit import __file__ as package_file
    from transferkit.tracking import tracker as tracking
    from transferkit.train import engine, finetune
    from transferkit.train.config import resolve_config

    tmp = Path(tempfile.mkdtemp(prefix="bench-tracking-overhead-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    start = time.perf_counter()
    with tracking.start_run("bench", tracking_uri=uri, experiment="warm-up", system_metrics=False):
        pass  # creating the store (schema migrations) is paid once per store, not per run
    store_creation = time.perf_counter() - start
    phase = {"now": "setup"}
    spent: dict[tuple[str, str], float] = {}
    depth = threading.local()

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            outer = not getattr(depth, "n", 0)
            depth.n = getattr(depth, "n", 0) + 1
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                depth.n -= 1
                if outer:
                    key = (phase["now"], name)
                    spent[key] = spent.get(key, 0.0) + time.perf_counter() - start
        return wrapper

    for name in TIMED_METHODS:
        if hasattr(tracking.Tracker, name):
            setattr(tracking.Tracker, name, timed(name, getattr(tracking.Tracker, name)))
    original_start_run = tracking.start_run

    @contextlib.contextmanager
    def start_run(*a, **k):
        start = time.perf_counter()
        with original_start_run(*a, **k) as tracker:
            spent[("setup", "start_run")] = time.perf_counter() - start
            yield tracker
            start = time.perf_counter()
        spent[("finish", "end_run")] = time.perf_counter() - start

    tracking.start_run = start_run
    original_train, original_epoch = engine.Trainer._train, engine.Trainer._epoch
    epoch_walls = []

    def train(self):
        phase["now"] = "epochs"
        try:
            return original_train(self)
        finally:
            phase["now"] = "finish"

    def epoch(self, *a, **k):
        start = time.perf_counter()
        row = original_epoch(self, *a, **k)
        epoch_walls.append(time.perf_counter() - start)
        return row

    engine.Trainer._train, engine.Trainer._epoch = train, epoch
    torch.set_num_threads(args.threads)
    config = resolve_config(None, {
        "backbone": BACKBONE, "weights": str(WEIGHTS), "data": str(ROADS), "out": str(tmp / "runs"), "name": "r",
        "strategy": "full", "epochs": args.epochs, "img_size": args.img_size, "batch_size": 16, "workers": 1,
        "aug": "light", "early_stopping": 0, "tracking_uri": uri, "seed": 0})
    started = time.perf_counter()
    result = finetune(config, progress=False)
    total = time.perf_counter() - started
    epochs = len(result.history)
    per_epoch = sum(v for (p, _), v in spent.items() if p == "epochs") / epochs
    per_run = sum(v for (p, _), v in spent.items() if p != "epochs")
    epoch_wall = statistics.median(epoch_walls)
    print(f"transferkit from {Path(package_file).parent}")
    print(f"{BACKBONE} full finetune, roads ({len(result.history)} epochs, img {args.img_size}, batch 16, "
          f"torch threads {args.threads}): run {total:.1f} s, median epoch (train + val) {epoch_wall:.1f} s")
    print(f"  (creating the sqlite store, once per store: {store_creation:.1f} s, not counted below)")
    for (where, name), seconds in sorted(spent.items()):
        print(f"  {where:<7} {name:<16} {seconds * 1000:9.1f} ms")
    print(f"tracking per epoch  {per_epoch * 1000:8.1f} ms = {100 * per_epoch / epoch_wall:.2f} % of an epoch")
    print(f"tracking per run    {per_run:8.2f} s  = {100 * per_run / epoch_wall:.1f} % of one epoch, "
          f"{100 * per_run / total:.1f} % of this run ({per_run - spent.get(('finish', 'log_model'), 0):.2f} s "
          f"without log_model)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--overhead", action="store_true", help="Only measure tracking overhead in a real finetune.")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.overhead:
        tracking_overhead(args)
        return

    import mlflow
    import numpy as np
    import pandas as pd

    from transferkit.data import discover, load_image
    from transferkit.models.backbones import load_backbone
    from transferkit.models.predictors import load_predictor
    from transferkit.models.saved_model import checkpoint_metadata, save_checkpoint
    from transferkit.tracking.tracker import start_run

    tmp = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    paths = [s.path for s in discover(ROADS).samples]
    model, preprocessing = load_backbone(BACKBONE, weights=WEIGHTS, num_classes=2)
    checkpoint = save_checkpoint(tmp / "best", model, checkpoint_metadata(
        model, kind="classifier", class_names=["paved", "unpaved"], preprocessing=preprocessing))
    config = {f"group{i // 10}": {f"key{i}": i * 0.5} for i in range(60)}
    png = tmp / "curves.png"
    png.write_bytes(os.urandom(100_000))
    print(f"{BACKBONE}, {len(paths)} roads frames, store {uri}, torch threads {__import__('torch').get_num_threads()}")

    def empty_run():
        with start_run("bench", tracking_uri=uri, experiment="bench", system_metrics=False):
            pass

    print(f"start_run + end              {best_time(empty_run, args.rounds) * 1000:8.1f} ms")
    with start_run("bench", tracking_uri=uri, experiment="bench", system_metrics=False) as tracker:
        epoch = iter(range(10_000))
        metrics = {f"epoch/{k}": 0.5 for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy",
                                               "val_macro_f1", "lr", "epoch_seconds", "images_per_s")}
        print(f"log_metrics (8, one epoch)   {best_time(lambda: tracker.log_metrics(metrics, step=next(epoch)), args.rounds) * 1000:8.1f} ms")
        counter = iter(range(10_000))
        print(f"log_params (60 keys)         "
              f"{best_time(lambda: tracker.log_params({f'r{next(counter)}': config}), args.rounds) * 1000:8.1f} ms")
        print(f"log_artifact (100 kB PNG)    {best_time(lambda: tracker.log_artifact(png), args.rounds) * 1000:8.1f} ms")
        start = time.perf_counter()
        model_uri = tracker.log_model(checkpoint)
        print(f"log_model ({checkpoint.stat().st_size / 1e6:.1f} MB checkpoint)  {time.perf_counter() - start:8.1f} s")

    mlflow.set_tracking_uri(uri)
    start = time.perf_counter()
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    print(f"pyfunc.load_model            {time.perf_counter() - start:8.1f} s")

    predictor = load_predictor(checkpoint)
    raw = [Path(p).read_bytes() for p in paths]
    inputs = {
        "bytes": pd.DataFrame({"image": raw}),
        "base64": pd.DataFrame({"image": [base64.b64encode(b).decode() for b in raw]}),
        "uint8": pd.DataFrame({"image": [load_image(p) for p in paths]}),
    }
    direct = best_time(lambda: predictor.predict_proba([str(p) for p in paths]), args.rounds)
    print(f"predict_proba(paths)         {len(paths) / direct:8.1f} img/s  (transferkit predictor, no MLflow)")
    expected = predictor.predict_proba([str(p) for p in paths]).max(1)
    for name, frame in inputs.items():
        seconds = best_time(lambda frame=frame: pyfunc.predict(frame), args.rounds)
        agree = np.allclose(pyfunc.predict(frame)["probability"].to_numpy(), expected, atol=1e-5)
        print(f"pyfunc.predict({name:<6})       {len(paths) / seconds:8.1f} img/s  (same probabilities: {agree})")

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])}
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.perf_counter() - start > 300:
                    raise SystemExit("mlflow models serve did not start") from None
                time.sleep(0.5)
        print(f"models serve start-up        {time.perf_counter() - start:8.1f} s")
        url = f"http://127.0.0.1:{port}/invocations"
        encoded = inputs["base64"]["image"].tolist()
        for count in (1, 16):
            payload = {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded[:count]]}}
            post(url, payload)  # warm-up
            median = statistics.median(post(url, payload) for _ in range(args.requests))
            print(f"POST /invocations {count:>2} image(s) {median * 1000:8.1f} ms median ({count / median:.1f} img/s)")
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
