"""Shared fixtures: tiny generated image folders, tiny timm models saved as local weights.

Every test runs offline: HF_HUB_OFFLINE stops any hub retry, and no test reaches the network.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_WEIGHTS = SHARED / "weights"
SHARED_PHOTOS = SHARED / "photos"
SHARED_ROADS = SHARED / "data" / "roads"
TINY_BACKBONE = "test_efficientnet"
TINY_IMG = 64
FINETUNE_IMG = 32  # below TINY_IMG: 4x less compute, and it checks that --img-size reaches the checkpoint
CLASS_COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "fox": (40, 40, 200)}

requires_shared_weights = pytest.mark.skipif(
    not (SHARED_WEIGHTS / "tf_efficientnet_lite0.safetensors").is_file(),
    reason="real weights in ../shared/weights are absent",
)
requires_shared_roads = pytest.mark.skipif(not SHARED_ROADS.is_dir(), reason="../shared/data/roads is absent")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
requires_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is absent (Debian: apt-get install chromium; .ci/run installs it)"
)

# A timm data config deliberately not ImageNet's statistics and not square, so a hard-coded mean/std or size shows.
DATA_CONFIG = {"input_size": [3, 48, 64], "interpolation": "bicubic", "mean": [0.2, 0.4, 0.6], "std": [0.1, 0.2, 0.3],
               "crop_pct": 0.875, "crop_mode": "center"}
SQUARE_DATA_CONFIG = {**DATA_CONFIG, "input_size": [3, 64, 64]}


@pytest.fixture(scope="module")
def photo():
    """A 120x90 RGB noise image as a uint8 array, as a decoded photo reaches the transforms."""
    return np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)


@pytest.fixture
def one_torch_thread():
    """The tiny model gains nothing from threads, and on a busy shared CPU OpenMP's spin-waiting threads made
    training tests 5-7x slower; restored after each test so other tests keep torch's default.
    Opt in per module with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_image(path: Path, colour, size=(48, 40), seed=0, fmt=None) -> Path:
    """A learnable image: the class colour plus noise, so classes separate after a few steps."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour, dtype=np.int16) + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path, format=fmt)
    return path


def make_dataset(root: Path, per_class=8, classes=("cat", "dog"), splits=None, size=(48, 40)) -> Path:
    """``root/<class>/*.jpg`` or, with ``splits={'train': 8, 'val': 4}``, ``root/<split>/<class>/*``."""
    seed = 0
    layout = splits or {None: per_class}
    for split, count in layout.items():
        for cls in classes:
            for i in range(count):
                base = root / split / cls if split else root / cls
                make_image(base / f"{cls}_{i}.png", CLASS_COLOURS[cls], size=size, seed=seed)
                seed += 1
    return root


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """Two classes, train/val split folders, PNGs 48x40."""
    return make_dataset(tmp_path / "data", classes=("cat", "dog"), splits={"train": 8, "val": 4})


@pytest.fixture
def tiny_data3(tmp_path) -> Path:
    """Three classes, class folders only (val carved by transferkit)."""
    return make_dataset(tmp_path / "data3", classes=("cat", "dog", "fox"), per_class=6)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A random-init tiny timm backbone saved as safetensors with a sidecar JSON shrinking its input size."""
    import json

    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(TINY_BACKBONE, pretrained=False)
    folder = tmp_path_factory.mktemp("weights")
    path = folder / f"{TINY_BACKBONE}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    (folder / f"{TINY_BACKBONE}.json").write_text(json.dumps({"data_config": {"input_size": [3, TINY_IMG, TINY_IMG]}}))
    return path


@pytest.fixture
def runner():
    from click.testing import CliRunner

    return CliRunner()


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory, tiny_weights) -> Path:
    """A model folder holding a `test_efficientnet` classifier trained a few SGD steps on cat/dog (as in tiny_data).

    Built without transferkit.train so evaluate/predict/export/explain tests do not depend on it.
    """
    import torch

    from transferkit.data import load_image
    from transferkit.models.backbones import load_backbone
    from transferkit.models.saved_model import checkpoint_metadata, save_checkpoint

    torch.manual_seed(0)
    data = make_dataset(tmp_path_factory.mktemp("classifier_data"), classes=("cat", "dog"), per_class=6)
    model, preprocessing = load_backbone(TINY_BACKBONE, weights=tiny_weights, num_classes=2)
    transform = preprocessing.eval_transform()
    paths = sorted(data.rglob("*.png"))
    images = torch.stack([transform(load_image(p)) for p in paths])
    labels = torch.tensor([0 if p.parent.name == "cat" else 1 for p in paths])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    model.eval()  # batch-norm statistics of 12 flat-colour images would not generalise; train the weights only
    for _ in range(4):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("classifier") / "model"
    folder.mkdir()
    metadata = checkpoint_metadata(model, kind="classifier", class_names=["cat", "dog"], preprocessing=preprocessing)
    save_checkpoint(folder / "model", model, metadata)
    return folder


def free_port() -> int:
    """A loopback TCP port free right now, for a server or torchrun rendezvous a test starts."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process, timeout: float = 120.0, log=None) -> None:
    """Poll ``url`` until it answers 200; fail early (with the log) if ``process`` dies."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text() if log else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text() if log else ''}")


def stop_process_tree(process, timeout: float = 20.0) -> None:
    """Stop a server we started and every process under it, each by its PID (SIGTERM, then SIGKILL)."""
    import psutil

    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except Exception:
        process.kill()
        process.wait(timeout=timeout)
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        child.kill()


@pytest.fixture(scope="session", autouse=True)
def _mlflow_store_in_tmp(tmp_path_factory):
    """Runs tracked by any test land in a tmp sqlite store, never in an mlflow.db in the repository."""
    store = tmp_path_factory.mktemp("mlflow_default") / "mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
        yield


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server, started with `transferkit ui` on a free loopback port over a tmp sqlite store.

    Yields ``SimpleNamespace(url, store_uri, folder, log)``; stopped by PID at teardown.
    """
    import subprocess
    import sys
    from types import SimpleNamespace

    folder = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    store_uri = f"sqlite:///{folder / 'mlflow.db'}"
    log = folder / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "transferkit", "ui", "--port", str(port), "--backend-store-uri", store_uri],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/health", process, log=log)
        yield SimpleNamespace(url=url, store_uri=store_uri, folder=folder, log=log)
    finally:
        stop_process_tree(process)


def extract_tiny(data, weights, out, **kwargs):
    """Features of the tiny backbone, in-process and on CPU (no loader workers), for fast tests."""
    from transferkit.features.extract import extract_features

    return extract_features(TINY_BACKBONE, data, out, weights=weights, workers=0, device="cpu", **kwargs)


def run_cli(runner, tiny_data, tiny_weights, out, *args):
    """`transferkit finetune` on the tiny backbone, fast and untracked, with ``args`` added."""
    from transferkit.cli import main

    return runner.invoke(main, ["finetune", "--backbone", TINY_BACKBONE, "--weights", str(tiny_weights),
                                "--data", str(tiny_data), "--out", str(out), "--no-track", "--workers", "0",
                                "--batch-size", "8", "--img-size", str(FINETUNE_IMG), *args])


def config_for(tiny_data, tiny_weights, out, **overrides):
    """The TrainConfig of a fast, untracked 1-epoch run of the tiny backbone, with ``overrides``."""
    from transferkit.train.config import resolve_config

    base = {"backbone": TINY_BACKBONE, "weights": str(tiny_weights), "data": str(tiny_data), "out": str(out),
            "track": False, "workers": 0, "batch_size": 8, "epochs": 1, "lr": 0.01, "img_size": FINETUNE_IMG}
    return resolve_config(None, {**base, **overrides})


def read_metrics(run_dir: Path, drop_timing: bool = True) -> list[dict]:
    """A run's metrics.csv rows, without the timing columns (which differ between equal runs) unless asked."""
    import csv

    from transferkit.tasks import TIMING_COLUMNS

    with open(run_dir / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    return [{k: v for k, v in row.items() if not (drop_timing and k in TIMING_COLUMNS)} for row in rows]
