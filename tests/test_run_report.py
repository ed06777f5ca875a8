"""The review a finetune ends with (val report, augmentation preview, data check, MLflow params) and
`evaluate --split val` rebuilding a carved val split from the model's split records."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_BACKBONE, make_dataset

from transferkit.cli import main
from transferkit.errors import TransferkitError
from transferkit.use.evaluate import evaluate

CLASSES = ("cat", "dog", "fox")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_weights):
    """One tracked 1-epoch CLI finetune on a plain folder of class folders (val carved by transferkit)."""
    from click.testing import CliRunner

    tmp = tmp_path_factory.mktemp("report")
    data = make_dataset(tmp / "flowers", classes=CLASSES, per_class=10, size=(40, 30))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(main, [
            "finetune", "--backbone", TINY_BACKBONE, "--weights", str(tiny_weights), "--data", str(data),
            "--out", str(tmp / "runs"), "--name", "r", "--epochs", "1", "--batch-size", "8", "--workers", "0",
            "--strategy", "full", "--aug", "light", "--lr", "0.01", "--seed", "3", "--tracking-uri", uri])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    run_dir = tmp / "runs" / "r"
    return {"data": data, "uri": uri, "run_dir": run_dir, "output": result.output,
            "run_id": json.loads((run_dir / "result.json").read_text())["mlflow_run_id"]}


def best_val_acc(run_dir: Path) -> float:
    with open(run_dir / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    best = json.loads((run_dir / "result.json").read_text())["best_epoch"]
    return float(next(row for row in rows if int(row["epoch"]) == best)["val_accuracy"])


def val_records(run_dir: Path) -> list[str]:
    with open(run_dir / "split.csv") as fh:
        return [row["path"] for row in csv.DictReader(fh) if row["split"] == "val"]


def test_finetune_writes_val_report_preview_and_data_check(tracked_run):
    run_dir = tracked_run["run_dir"]
    for name in ("val/metrics.json", "val/predictions.csv", "val/confusion_matrix.png",
                 "val/confusion_matrix_normalized.png", "val/reliability.png", "val/errors.png",
                 "augment_preview.png", "data_check.json"):
        assert (run_dir / name).stat().st_size > 0, name
    report = json.loads((run_dir / "val/metrics.json").read_text())
    assert report["split"] == "val" and report["val_n"] == len(val_records(run_dir)) == 6
    assert report["val_accuracy"] == pytest.approx(best_val_acc(run_dir))  # the best checkpoint, scored alike
    with open(run_dir / "val/predictions.csv") as fh:
        scored = sorted(Path(row["path"]).relative_to(tracked_run["data"]).as_posix() for row in csv.DictReader(fh))
    assert scored == sorted(val_records(run_dir))
    check = json.loads((run_dir / "data_check.json").read_text())
    assert check["classes"] == list(CLASSES) and check["counts"]["val"] == {c: 2 for c in CLASSES}
    assert any("smaller than the 64 px backbone input" in w for w in check["warnings"])  # 40x30 images
    assert "; best epoch 1 (" in tracked_run["output"] and f"saved to {run_dir}\n" in tracked_run["output"]


def test_mlflow_run_holds_what_a_reviewer_compares(tracked_run):
    from mlflow import MlflowClient

    client = MlflowClient(tracked_run["uri"])
    run = client.get_run(tracked_run["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "flowers"  # one experiment per dataset
    assert run.data.metrics["val_accuracy"] == pytest.approx(best_val_acc(tracked_run["run_dir"]))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_macro_f1")] == [1]  # no stray point
    params = run.data.params
    assert json.loads(params["data_config.mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(params["classes"]) == list(CLASSES)
    assert params["counts.train.fox"] == "8" and params["counts.val.cat"] == "2"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"augment_preview.png", "data_check.json", "val"} <= artifacts
    val_artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "val")}
    assert {"val/confusion_matrix_normalized.png", "val/errors.png", "val/per_class.txt"} <= val_artifacts
    assert run.inputs.dataset_inputs[0].dataset.name == "flowers"


def test_evaluate_split_val_on_a_flat_folder_rebuilds_the_run_val_split(runner, tracked_run, tmp_path):
    run_dir = tracked_run["run_dir"]
    copy = shutil.copytree(tracked_run["data"], tmp_path / "copy")  # matched by path relative to the data root
    result = runner.invoke(main, ["evaluate", "--model", str(run_dir), "--data", str(copy), "--split", "val",
                                  "--no-track", "--json", "--workers", "0"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["val_n"] == 6 and report["val_accuracy"] == pytest.approx(best_val_acc(run_dir))
    train = evaluate(run_dir, copy, split="train", track=False, workers=0)
    assert train["train_n"] == 24  # the run's own train images, not the whole folder
    (copy / val_records(run_dir)[0]).unlink()
    with pytest.raises(TransferkitError, match=r"1 of the 6 images of the model's val split are not in .*copy"):
        evaluate(run_dir, copy, split="val", track=False, workers=0)
    with pytest.raises(TransferkitError, match="split 'test' not found .* it has: train"):
        evaluate(run_dir, copy, split="test", track=False, workers=0)


def test_run_description_and_summary_name_the_best_checkpoint(tracked_run):
    from mlflow import MlflowClient

    run = MlflowClient(tracked_run["uri"]).get_run(tracked_run["run_id"])
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith(f"**{TINY_BACKBONE} · full on flowers**")
    assert "24 train / 6 val images, 3 classes" in note and "epoch 1 of 1" in note
    assert "`val/confusion_matrix.png`" in note and "| `val_accuracy` |" in note
    assert run.data.metrics["best_epoch"] == 1 and run.data.metrics["epochs_run"] == 1
    result = json.loads((tracked_run["run_dir"] / "result.json").read_text())
    for key in ("val_accuracy", "val_macro_f1", "val_loss", "val_ece", "best_epoch"):
        assert result[key] == pytest.approx(run.data.metrics[key]), key  # one name, one value, everywhere
    assert {"path": "val/per_class.json", "type": "table"} in json.loads(run.data.tags["mlflow.loggedArtifacts"])


def test_evaluate_split_test_on_a_run_folder_logs_to_that_run(runner, tracked_run, tmp_path):
    from mlflow import MlflowClient

    test_data = make_dataset(tmp_path / "held-out", classes=CLASSES, splits={"train": 1, "test": 2}, size=(40, 30))
    result = runner.invoke(main, ["evaluate", "--model", str(tracked_run["run_dir"]), "--data", str(test_data),
                                  "--split", "test", "--workers", "0", "--tracking-uri", tracked_run["uri"]])
    assert result.exit_code == 0, result.output
    assert f"logged to MLflow run {tracked_run['run_id']} (the run that trained the model)" in result.output
    client = MlflowClient(tracked_run["uri"])
    run = client.get_run(tracked_run["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["command"] == "finetune"
    assert 0 <= run.data.metrics["test_accuracy"] <= 1 and run.data.metrics["test_n"] == 6
    assert {"path": "test/per_class.json", "type": "table"} in json.loads(run.data.tags["mlflow.loggedArtifacts"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")] == [1]  # the best epoch
    assert run.data.tags["test_data"] == str(test_data)
    assert "- **test**: 6 images of" in run.data.tags["mlflow.note.content"]
    assert "test/confusion_matrix.png" in {a.path for a in client.list_artifacts(run.info.run_id, "test")}
    experiment = run.info.experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment])] == [run.info.run_id]  # no second run


@pytest.mark.slow
def test_summary_is_the_best_checkpoint_after_early_stopping(tiny_data, tiny_weights, tmp_path, monkeypatch):
    """Val scores scripted to peak at epoch 1: the run stops after 3 epochs, and the runs table (latest value
    of each summary key) shows epoch 1, while the ``epoch/`` series end at epoch 3."""
    from mlflow import MlflowClient

    from transferkit.train import finetune, loop
    from transferkit.train.config import resolve_config

    scripted = iter([(0.5, 0.9, 0.88), (0.7, 0.6, 0.55), (0.8, 0.5, 0.4)])

    def scripted_scores(module, data, **kwargs):
        loss, accuracy, f1 = next(scripted)
        return {"val_loss": loss, "val_accuracy": accuracy, "val_macro_f1": f1}

    monkeypatch.setattr(loop, "validate", scripted_scores)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = resolve_config(None, {
        "backbone": TINY_BACKBONE, "weights": str(tiny_weights), "data": str(tiny_data), "out": str(tmp_path),
        "workers": 0, "batch_size": 8, "epochs": 5, "lr": 0.01, "img_size": 32, "strategy": "linear-probe",
        "aug": "none", "early_stopping": 2, "tracking_uri": uri, "name": "stop"})
    result = finetune(config, progress=False)
    assert result.stopped_early and result.best_epoch == 1 and len(result.history) == 3
    client = MlflowClient(uri)
    metrics = client.get_run(json.loads((tmp_path / "stop" / "result.json").read_text())["mlflow_run_id"]).data.metrics
    assert metrics["val_accuracy"] == 0.9 and metrics["val_loss"] == 0.5 and metrics["val_macro_f1"] == 0.88
    assert metrics["best_epoch"] == 1 and metrics["epochs_run"] == 3
    assert metrics["epoch/val_accuracy"] == 0.5  # the series keeps the last epoch, under its own name
    (ranked,) = client.search_runs([client.get_experiment_by_name(tiny_data.name).experiment_id],
                                   order_by=["metrics.val_accuracy DESC"])
    assert ranked.data.metrics["val_accuracy"] == 0.9
    summary = json.loads((tmp_path / "stop" / "result.json").read_text())
    assert summary["val_accuracy"] == 0.9 and summary["best_epoch"] == 1 and summary["epochs_run"] == 3
