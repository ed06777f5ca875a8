"""`transferkit ui` and what a reviewer sees in it, checked with a real headless Chromium."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import urllib.request

import numpy as np
import pytest
from mlflow import MlflowClient

from transferkit.cli import main
from transferkit.tracking.runs import start_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
requires_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is absent (Debian: apt-get install chromium; .ci/run installs it)"
)


def test_ui_prints_its_url_and_serves_the_store(mlflow_server):
    assert f"MLflow UI for {mlflow_server.store_uri} at {mlflow_server.url}" in mlflow_server.log.read_text()
    with urllib.request.urlopen(f"{mlflow_server.url}/health", timeout=10) as response:
        assert response.read() == b"OK"


def test_ui_refuses_a_busy_port(runner):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(main, ["ui", "--port", str(port)])
    assert result.exit_code == 2
    assert f"error: cannot listen on 127.0.0.1:{port}" in result.output and "--port" in result.output


def test_ui_refuses_a_remote_tracking_server(runner):
    result = runner.invoke(main, ["ui", "--backend-store-uri", "http://127.0.0.1:1"])
    assert result.exit_code == 2
    assert "already a server; open it in a browser" in result.output


def _chromium(url: str, profile, *, screenshot=None) -> str:
    """Rendered DOM of ``url`` (a React page) after Chromium's virtual clock let it fetch and render."""
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--window-size=1400,1000", "--virtual-time-budget=20000",
    ]
    if screenshot:
        subprocess.run([*command, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    return subprocess.run([*command, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout


@requires_chromium
@pytest.mark.timeout(300)
def test_reviewer_sees_run_metric_and_confusion_matrix(mlflow_server, tmp_path):
    from transferkit.reports.metrics import classification_metrics, split_scores
    from transferkit.reports.plots import confusion_matrix_png

    metrics = classification_metrics(np.array([0, 0, 1, 1]), np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7]]),
                                     ["cat", "dog"])
    plots = tmp_path / "plots"
    confusion_matrix_png(metrics["confusion_matrix"], ["cat", "dog"], plots / "confusion_matrix.png")
    # Logged straight into the sqlite store, as `transferkit finetune` does on a workstation; the UI reads it.
    with start_run("finetune", tracking_uri=mlflow_server.store_uri, experiment="review", run_name="tiny-review-run",
                   system_metrics=False) as tracker:
        for epoch, loss in enumerate([0.8, 0.4]):
            tracker.log_metrics({"train_loss": loss}, step=epoch)
        tracker.log_evaluation(split_scores("val", metrics), artifacts_dir=plots)
    experiment_id = MlflowClient(mlflow_server.store_uri).get_run(tracker.run_id).info.experiment_id
    run_page = f"{mlflow_server.url}/#/experiments/{experiment_id}/runs/{tracker.run_id}"

    overview = _chromium(run_page, tmp_path / "profile", screenshot=tmp_path / "run.png")
    assert "tiny-review-run" in overview
    assert "val_accuracy" in overview and re.search(r">0\.75<", overview)
    assert (tmp_path / "run.png").stat().st_size > 10_000

    artifact = _chromium(f"{run_page}/artifacts/val/confusion_matrix.png", tmp_path / "profile",
                         screenshot=tmp_path / "confusion.png")
    assert 'artifact-name="confusion_matrix.png"' in artifact
    assert re.search(r'<img alt="val/confusion_matrix.png" src="blob:', artifact)  # the PNG was fetched and shown
