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


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny model gains nothing from threads (see test_finetune.py); restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    return float(next(row for row in rows if int(row["epoch"]) == best)["val_acc"])


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
    assert report["split"] == "val" and report["n"] == len(val_records(run_dir)) == 6
    assert report["accuracy"] == pytest.approx(best_val_acc(run_dir))  # the best checkpoint, scored alike
    with open(run_dir / "val/predictions.csv") as fh:
        scored = sorted(Path(row["path"]).relative_to(tracked_run["data"]).as_posix() for row in csv.DictReader(fh))
    assert scored == sorted(val_records(run_dir))
    check = json.loads((run_dir / "data_check.json").read_text())
    assert check["classes"] == list(CLASSES) and check["counts"]["val"] == {c: 2 for c in CLASSES}
    assert any("smaller than the 64 px backbone input" in w for w in check["warnings"])  # 40x30 images
    assert tracked_run["output"].strip().splitlines()[-1].startswith(f"run {run_dir}: best epoch 1")


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
    assert report["n"] == 6 and report["accuracy"] == pytest.approx(best_val_acc(run_dir))
    train = evaluate(run_dir, copy, split="train", track=False, workers=0)
    assert train["n"] == 24  # the run's own train images, not the whole folder
    (copy / val_records(run_dir)[0]).unlink()
    with pytest.raises(TransferkitError, match=r"1 of the 6 images of the model's val split are not in .*copy"):
        evaluate(run_dir, copy, split="val", track=False, workers=0)
    with pytest.raises(TransferkitError, match="split 'test' not found .* it has: train"):
        evaluate(run_dir, copy, split="test", track=False, workers=0)
