"""`transferkit ui` and what a reviewer sees in it, checked with a real headless Chromium."""

from __future__ import annotations

import re
import socket
import subprocess
import urllib.request

import numpy as np
import pytest
from conftest import CHROMIUM, requires_chromium
from mlflow import MlflowClient

from transferkit.cli import main
from transferkit.tracking.tracker import start_run


@pytest.mark.slow
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


def _chromium(url: str, profile, *, screenshot=None, height: int = 1000) -> str:
    """Rendered DOM of ``url`` (a React page) after Chromium's virtual clock let it fetch and render."""
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", f"--window-size=1400,{height}", "--virtual-time-budget=20000",
    ]
    if screenshot:
        subprocess.run([*command, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    return subprocess.run([*command, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.slow
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


def _row_order(dom: str) -> list[str]:
    """Run ids of the runs table in display order (ag-grid rows carry their index and run id)."""
    rows = dict(re.findall(r'row-index="(\d+)" row-id="([0-9a-f]{32})"', dom))
    return [rows[index] for index in sorted(rows, key=int)]


@pytest.mark.slow
@requires_chromium
@pytest.mark.timeout(600)
def test_runs_table_ranks_runs_by_their_best_checkpoints(mlflow_server, tiny_data, tiny_weights, tmp_path,
                                                         monkeypatch):
    """Three finetunes whose val scores (scripted) peak at different epochs: sorted by ``val_accuracy`` the
    UI ranks them by their best checkpoints, which is not their last-epoch order."""

    from transferkit.train import finetune, loop
    from transferkit.train.config import resolve_config

    curves = {"early-peak": [0.9, 0.5], "late-peak": [0.6, 0.8], "flat": [0.7, 0.7]}
    scripted = iter([])
    monkeypatch.setattr(loop, "validate",
                        lambda module, data, **kwargs: {"val_loss": 1 - (acc := next(scripted)), "val_accuracy": acc,
                                                   "val_macro_f1": acc})
    ids = {}
    for name, accuracies in curves.items():
        scripted = iter(accuracies)
        config = resolve_config(None, {
            "backbone": "test_efficientnet", "weights": str(tiny_weights), "data": str(tiny_data),
            "out": str(tmp_path / "runs"), "name": name, "workers": 0, "batch_size": 8, "epochs": 2, "img_size": 32,
            "strategy": "linear-probe", "aug": "none", "tracking_uri": mlflow_server.store_uri, "experiment": "ranking"})
        ids[name] = finetune(config, progress=False).model_uri.split("/")[1]
    experiment_id = MlflowClient(mlflow_server.store_uri).get_experiment_by_name("ranking").experiment_id
    runs_page = f"{mlflow_server.url}/#/experiments/{experiment_id}/runs"

    by_best = _chromium(f"{runs_page}?orderByKey=metrics.%60val_accuracy%60&orderByAsc=false", tmp_path / "profile")
    assert "Sort: val_accuracy" in by_best
    assert _row_order(by_best) == [ids["early-peak"], ids["late-peak"], ids["flat"]]  # 0.9, 0.8, 0.7
    by_last = _chromium(f"{runs_page}?orderByKey=metrics.%60epoch/val_accuracy%60&orderByAsc=false",
                        tmp_path / "profile")
    assert _row_order(by_last) == [ids["late-peak"], ids["flat"], ids["early-peak"]]  # 0.8, 0.7, 0.5



@pytest.mark.slow
@requires_chromium
@pytest.mark.timeout(300)
def test_per_class_table_shows_on_the_run_page(mlflow_server, tmp_path):
    """An evaluation's per-class scores are an MLflow table: the artifact view renders it as a grid."""
    from transferkit.reports.metrics import classification_metrics, split_scores

    y_true = np.array([0, 0, 1, 1])
    with start_run("evaluate", tracking_uri=mlflow_server.store_uri, experiment="per-class", run_name="half-right",
                   system_metrics=False) as tracker:
        tracker.log_evaluation(split_scores("val", classification_metrics(
            y_true, np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7]]), ["dirt road", "paved"])))
    experiment_id = MlflowClient(mlflow_server.store_uri).get_experiment_by_name("per-class").experiment_id
    page = _chromium(f"{mlflow_server.url}/#/experiments/{experiment_id}/runs/{tracker.run_id}/artifacts/"
                     "val/per_class.json", tmp_path / "profile")
    assert 'artifact-name="per_class.json"' in page
    assert ">dirt road<" in page and ">recall<" in page and ">support<" in page
