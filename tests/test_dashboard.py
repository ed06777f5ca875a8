"""The dashboard answers "which model is best, and why": what a run logs, the experiment's best-first view and
description, and what headless Chromium shows of them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
from conftest import CHROMIUM, requires_chromium, stop_process_tree, wait_for_http
from mlflow import MlflowClient

from transferkit.tracking.summary import BEST_VIEW_KEY, BEST_VIEW_TAG, NOTE_TAG
from transferkit.tracking.tracker import start_run


def _trained_run(store: str, name: str, scores: dict, *, backbone="tf_efficientnet_lite0", strategy="full",
                 lr=1e-3, noise=True) -> str:
    """A run logged as a finetune logs one (tags, params, summary metrics, epoch series), without training."""
    with start_run("finetune", tracking_uri=store, experiment="roads", run_name=name, system_metrics=False,
                   tags={"backbone": backbone, "strategy": strategy},
                   params={"backbone": backbone, "strategy": strategy, "lr": lr, "epochs": 2, "seed": 0}) as tracker:
        if noise:  # what used to drown the headline: per-epoch series, and system metrics
            for epoch in (0, 1):
                tracker.log_metrics({f"epoch/{k}": v + epoch / 100 for k, v in scores.items()}, step=epoch)
            tracker.log_metrics({f"system/{k}": 1.0 for k in ("cpu_utilization_percentage", "disk_usage_megabytes",
                                                              "system_memory_usage_megabytes")})
        tracker.log_metrics({**scores, "best_epoch": 1}, step=1)
        tracker.describe(name, ["a scripted run"], scores)
    return tracker.run_id


def test_experiment_carries_a_best_first_view_and_names_its_best_run(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    worse = _trained_run(store, "worse", {"val_accuracy": 0.8, "val_loss": 0.2, "val_macro_f1": 0.79})
    experiment = MlflowClient(store).get_experiment_by_name("roads")
    view = json.loads(experiment.tags[BEST_VIEW_TAG])
    state = json.loads(view["state"])  # MLflow 3's saved-view envelope: the state is JSON text
    assert view["name"] == "Best first (by val_accuracy, then val_loss)" and isinstance(view["createdAt"], int)
    assert state["orderByKey"] == "metrics.`rank_in_experiment`" and state["orderByAsc"] is True
    assert state["selectedColumns"][:4] == ["metrics.`rank_in_experiment`", "metrics.`val_accuracy`",
                                            "metrics.`val_macro_f1`", "metrics.`val_loss`"]
    assert "tags.`backbone`" in state["selectedColumns"] and "tags.`strategy`" in state["selectedColumns"]
    assert "**Best run: `worse`**" in experiment.tags[NOTE_TAG]

    # A better run lands: the description names it, its scores and settings; ties go to the lower val_loss.
    tied_high_loss = _trained_run(store, "tied-high-loss", {"val_accuracy": 0.9, "val_loss": 0.339, "val_macro_f1": 0.9})
    best = _trained_run(store, "tied-low-loss", {"val_accuracy": 0.9, "val_loss": 0.031, "val_macro_f1": 0.88},
                        strategy="linear-probe", lr=3e-4)
    note = MlflowClient(store).get_experiment_by_name("roads").tags[NOTE_TAG]
    assert note.startswith("**Best run: `tied-low-loss`**") and best in note
    assert "first of 3 finished runs by `val_accuracy`, ties broken by lower `val_loss`" in note
    assert "`val_accuracy` 0.9000, `val_macro_f1` 0.8800, `val_loss` 0.0310" in note
    assert "model: `tf_efficientnet_lite0`; strategy linear-probe, lr 0.0003, epochs 2, seed 0; kept epoch 1" in note
    assert f"runs?viewStateShareKey={BEST_VIEW_KEY}" in note
    assert worse not in note and tied_high_loss not in note
    client = MlflowClient(store)
    ranks = {run_id: client.get_run(run_id).data.metrics["rank_in_experiment"] for run_id in (best, tied_high_loss, worse)}
    assert ranks == {best: 1, tied_high_loss: 2, worse: 3}  # what the best-first view sorts by


def test_evaluating_the_best_run_adds_its_test_score_to_the_description(tmp_path):
    from transferkit.reports.metrics import classification_metrics, split_scores

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = _trained_run(store, "only", {"val_accuracy": 0.9, "val_loss": 0.1}, noise=False)
    import numpy as np

    scores = split_scores("test", classification_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.8, 0.2]]),
                                                         ["cat", "dog"]))
    with start_run("evaluate", tracking_uri=store, run_id=run_id) as tracker:
        tracker.log_evaluation(scores)
        tracker.add_evaluation_to_description("test", "- **test**: 2 images")
    assert "`test_accuracy` 0.5000" in MlflowClient(store).get_experiment_by_name("roads").tags[NOTE_TAG]


def test_per_class_scores_are_one_table_not_dozens_of_metrics(tmp_path):
    """Per-class precision / recall / F1 are a table artifact; the run's metrics are the split-level scalars."""
    import numpy as np

    from transferkit.reports.metrics import classification_metrics, split_scores

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    classes = [f"class {i}" for i in range(10)]
    y = np.arange(20) % 10
    scores = split_scores("val", classification_metrics(y, np.eye(10)[(y + (y > 7)) % 10], classes))
    with start_run("evaluate", tracking_uri=store, experiment="tables", system_metrics=False) as tracker:
        tracker.log_evaluation(scores)
        tracker.log_evaluation(scores)  # logged again (a re-evaluation): replaced, not appended
    client = MlflowClient(store)
    run = client.get_run(tracker.run_id)
    assert not [key for key in run.data.metrics if "/" in key]  # 30 per-class metrics before
    assert {"val_accuracy", "val_macro_f1", "val_ece", "val_n"} <= set(run.data.metrics)
    table = json.loads(open(client.download_artifacts(tracker.run_id, "val/per_class.json", str(tmp_path))).read())
    assert table["columns"] == ["class", "precision", "recall", "f1", "support"]
    assert len(table["data"]) == 10 and table["data"][9] == ["class 9", 0.0, 0.0, 0.0, 2]
    assert json.loads(run.data.tags["mlflow.loggedArtifacts"]) == [{"path": "val/per_class.json", "type": "table"}]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ui_on_a_free_port_prints_the_best_first_link(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _trained_run(store, "one", {"val_accuracy": 0.9, "val_loss": 0.1}, noise=False)
    experiment_id = MlflowClient(store).get_experiment_by_name("roads").experiment_id
    process = subprocess.Popen([sys.executable, "-m", "transferkit", "ui", "--port", "0", "--backend-store-uri", store],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first, link = process.stdout.readline(), process.stdout.readline()
        url = re.search(r" at (http://127\.0\.0\.1:(\d+))  \(Ctrl-C to stop\)", first)
        assert url and int(url.group(2)) > 0, first
        assert link.strip() == f"roads: {url.group(1)}/#/experiments/{experiment_id}/runs?viewStateShareKey={BEST_VIEW_KEY}"
        wait_for_http(f"{url.group(1)}/health", process)
    finally:
        stop_process_tree(process)


def _chromium(url: str, profile, *, screenshot=None, size=(1600, 700)) -> str:
    """Rendered DOM of ``url`` (a React page) after Chromium's virtual clock let it fetch and render."""
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
        f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=25000",
    ]
    if screenshot:
        subprocess.run([*command, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    return subprocess.run([*command, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout


def _headers(dom: str) -> list[str]:
    """The runs table's column headers, left to right (ag-grid header cells carry their column id)."""
    return re.findall(r'col-id="(?:metrics|tags|params)\.`([^`]+)`"[^>]*role="columnheader"', dom) or \
        re.findall(r'role="columnheader"[^>]*col-id="(?:metrics|tags|params)\.`([^`]+)`"', dom)


@pytest.mark.slow
@requires_chromium
@pytest.mark.timeout(400)
def test_default_view_shows_the_headline_columns_best_first(mlflow_server, tmp_path):
    """The link `transferkit ui` prints opens the runs table with the headline metrics as columns (MLflow's own
    default shows none of them) and the best run on top; the run page shows its description."""
    store = mlflow_server.store_uri
    runs = {  # the last two tie on val_accuracy: the lower val_loss ranks first, as the description says
        "full lr=0.001 s0 effnet_lite0": ("full", {"val_accuracy": 0.85, "val_loss": 0.3, "val_macro_f1": 0.84}),
        "full lr=0.0003 s1 effnet_lite0": ("full", {"val_accuracy": 0.95, "val_loss": 0.339, "val_macro_f1": 0.94}),
        "linear-probe lr=0.01 s0 effnet_lite0": ("linear-probe", {"val_accuracy": 0.95, "val_loss": 0.031,
                                                                  "val_macro_f1": 0.95}),
    }
    ids = {name: _trained_run(store, name, scores, strategy=strategy) for name, (strategy, scores) in runs.items()}
    experiment_id = MlflowClient(store).get_experiment_by_name("roads").experiment_id
    from transferkit.tracking.lookup import best_first_links

    link = dict(best_first_links(store, mlflow_server.url, 50))["roads"]  # the server's store holds other tests' too

    dom = _chromium(link, tmp_path / "profile", screenshot=tmp_path / "runs.png")
    headers = _headers(dom)
    for header in ("rank_in_experiment", "val_accuracy", "val_macro_f1", "val_loss", "best_epoch", "backbone",
                   "strategy"):
        assert header in headers, (header, headers)
    assert not [h for h in headers if h.startswith(("epoch/", "system/"))]
    rows = dict(re.findall(r'row-index="(\d+)" row-id="([0-9a-f]{32})"', dom))
    assert [rows[i] for i in sorted(rows, key=int)][:3] == [ids["linear-probe lr=0.01 s0 effnet_lite0"],
                                                           ids["full lr=0.0003 s1 effnet_lite0"],
                                                           ids["full lr=0.001 s0 effnet_lite0"]]
    assert (tmp_path / "runs.png").stat().st_size > 20_000

    best = ids["linear-probe lr=0.01 s0 effnet_lite0"]
    run_page = _chromium(f"{mlflow_server.url}/#/experiments/{experiment_id}/runs/{best}", tmp_path / "profile",
                         screenshot=tmp_path / "run.png", size=(1400, 1000))
    assert "linear-probe lr=0.01 s0 effnet_lite0" in run_page and "a scripted run" in run_page


@pytest.mark.slow
def test_run_name_puts_what_differs_first(tiny_data, tiny_weights, tmp_path):
    """An unnamed finetune's MLflow run is named strategy, lr, seed, backbone; its folder keeps its own rule."""
    from transferkit.train import finetune
    from transferkit.train.config import resolve_config

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = resolve_config(None, {
        "backbone": "test_efficientnet", "weights": str(tiny_weights), "data": str(tiny_data), "out": str(tmp_path / "runs"),
        "workers": 0, "batch_size": 8, "epochs": 1, "img_size": 32, "strategy": "linear-probe", "aug": "none",
        "lr": 3e-4, "seed": 2, "tracking_uri": store})
    result = finetune(config, progress=False)
    run = MlflowClient(store).get_run(result.model_uri.split("/")[1])
    assert run.info.run_name == "linear-probe lr=0.0003 s2 test_effnet"
    assert result.run_dir.name.startswith("test_efficientnet-linear-probe-")
    assert not [key for key in run.data.metrics if "_recall/" in key or "_precision/" in key or "_f1/" in key]


def test_evaluating_a_run_keeps_its_training_duration(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = _trained_run(store, "trained", {"val_accuracy": 0.9, "val_loss": 0.1}, noise=False)
    before = MlflowClient(store).get_run(run_id).info
    time.sleep(0.05)
    with start_run("evaluate", tracking_uri=store, run_id=run_id) as tracker:
        tracker.log_metrics({"test_accuracy": 0.8})
    with pytest.raises(RuntimeError), start_run("evaluate", tracking_uri=store, run_id=run_id):
        raise RuntimeError("the evaluation broke")
    after = MlflowClient(store).get_run(run_id).info
    assert (after.status, after.end_time) == (before.status, before.end_time) == ("FINISHED", before.end_time)
    assert after.end_time is not None

