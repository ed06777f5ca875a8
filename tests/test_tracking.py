"""Tracking against a real MLflow server (started by the `mlflow_server` fixture), read back with MlflowClient."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from mlflow import MlflowClient

from transferkit import __version__
from transferkit.errors import TransferkitError
from transferkit.tracking.naming import default_experiment_name, default_run_name, recipe_git_commit, run_tags
from transferkit.tracking.tracker import LONG_PARAMS_ARTIFACT, MAX_PARAM_VALUE, flatten_params, start_run


def test_flatten_params_uses_dotted_keys_and_keeps_lists_whole():
    nested = {"optim": {"lr": 0.01, "sched": {"name": "cosine", "warmup": 2}}, "classes": ["cat", "dog"], "extra": {}}
    assert flatten_params(nested) == {
        "optim.lr": 0.01, "optim.sched.name": "cosine", "optim.sched.warmup": 2, "classes": ["cat", "dog"], "extra": {},
    }


def test_run_name_and_experiment_helpers(tmp_path):
    assert default_run_name("resnet50", "full").startswith("resnet50-full-20")
    assert default_experiment_name(tmp_path / "roads") == "roads"
    assert recipe_git_commit(tmp_path / "recipe.yaml") is None  # not in a git repository
    assert recipe_git_commit(None) is None


def test_disabled_tracker_does_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with start_run("finetune", enabled=False, params={"a": 1}) as tracker:
        assert tracker.run_id is None
        assert tracker.log_model(tmp_path / "missing.safetensors") is None
        tracker.log_params({"b": 2})
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.log_artifact(tmp_path / "missing.png")  # would raise if tracking were on
        tracker.log_dict({"a": 1}, "a.json")
        tracker.log_evaluation({"split": "val", "val_accuracy": 1.0, "per_class": {}})
        tracker.set_tags({"x": "y"})
    assert list(tmp_path.iterdir()) == []


def test_default_store_is_sqlite_in_the_working_directory(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    before = mlflow.get_tracking_uri()
    with start_run("finetune", experiment="data", system_metrics=False) as tracker:
        tracker.log_dict({"a": 1}, "a.json")
    assert (tmp_path / "mlflow.db").is_file()
    assert (tmp_path / "mlruns" / "data" / tracker.run_id / "artifacts" / "a.json").is_file()
    assert mlflow.get_tracking_uri() == before  # the caller's URI is restored


def _git_recipe(folder):
    folder.mkdir()
    recipe = folder / "recipe.yaml"
    recipe.write_text("backbone: test_efficientnet\n")
    git = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "recipe.yaml"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "recipe"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    return recipe, head


@pytest.mark.slow
def test_run_params_metrics_artifacts_round_trip(mlflow_server, tiny_data, tmp_path):
    from transferkit.data import discover
    from transferkit.reports.metrics import classification_metrics, split_scores

    recipe, head = _git_recipe(tmp_path / "recipes")
    classes = [f"class_{i:04d}" for i in range(1000)]  # as JSON: far over MLflow's 6000-character limit
    config = {"backbone": "test_efficientnet", "optim": {"lr": 0.01, "epochs": 3}, "classes": classes,
              "data": {"path": "/data/my photos (2024)"}}
    name = default_run_name("test_efficientnet", "full")
    tags = run_tags(backbone="test_efficientnet", strategy="full", dataset_fingerprint="abc123", recipe=recipe)
    report = tmp_path / "check.json"
    report.write_text('{"errors": []}')
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "confusion_matrix.png").write_bytes(b"\x89PNG fake")
    y_true = np.array([0, 0, 1, 1])
    metrics = classification_metrics(y_true, np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7]]), ["cat", "dog"])

    with start_run("finetune", tracking_uri=mlflow_server.url, experiment="tiny-data", run_name=name, tags=tags,
                   params=config, system_metrics=False) as tracker:
        for epoch, loss in enumerate([0.9, 0.5, 0.3]):
            tracker.log_metrics({"train": {"loss": loss}, "lr": 0.01, "note": "skipped"}, step=epoch)
        tracker.log_params({"class counts": {"train/cat ": 8}})
        tracker.log_artifact(report)
        tracker.log_artifact(plots, "plots")
        tracker.log_dict({"resolved": True}, "recipe.yaml")
        index = discover(tiny_data)
        tracker.log_dataset(index, index.fingerprint())
        tracker.log_evaluation(split_scores("val", metrics), artifacts_dir=plots)

    client = MlflowClient(mlflow_server.url)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == name
    assert client.get_experiment(run.info.experiment_id).name == "tiny-data"
    assert run.data.tags["command"] == "finetune"
    assert run.data.tags["transferkit_version"] == __version__
    assert run.data.tags["backbone"] == "test_efficientnet" and run.data.tags["strategy"] == "full"
    assert run.data.tags["dataset_fingerprint"] == "abc123"
    assert run.data.tags["recipe_git_commit"] == head
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "data" and dataset_input.dataset.digest == discover(tiny_data).fingerprint()
    assert dataset_input.tags[0].value == "training"
    params = run.data.params
    assert params["optim.lr"] == "0.01" and params["data.path"] == "/data/my photos (2024)"
    assert params["class counts.train/cat "] == "8"
    assert LONG_PARAMS_ARTIFACT in params["classes"]
    long_values = json.loads(open(client.download_artifacts(tracker.run_id, LONG_PARAMS_ARTIFACT, str(tmp_path))).read())
    assert json.loads(long_values["classes"]) == classes and len(long_values["classes"]) > MAX_PARAM_VALUE
    history = client.get_metric_history(tracker.run_id, "train.loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 0.9), (1, 0.5), (2, 0.3)]
    assert "note" not in run.data.metrics
    assert run.data.metrics["val_accuracy"] == pytest.approx(0.75)
    assert run.data.metrics["val_macro_f1"] == pytest.approx(metrics["macro_f1"])
    artifacts = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"check.json", "plots", "recipe.yaml", "val", "params"} <= artifacts
    val_files = {a.path for a in client.list_artifacts(tracker.run_id, "val")}
    assert val_files == {"val/metrics.json", "val/per_class.json", "val/per_class.txt", "val/confusion_matrix.png"}
    lines = open(client.download_artifacts(tracker.run_id, "val/per_class.txt", str(tmp_path))).read().splitlines()
    assert lines[0].split() == ["class", "precision", "recall", "f1", "support"]
    assert lines[1].split() == ["cat", "1.0000", "0.5000", "0.6667", "2"]


@pytest.mark.slow
@pytest.mark.parametrize(("error", "status"), [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt("boom"), "KILLED")])
def test_exception_ends_the_run_as_failed_or_killed_with_an_error_tag(mlflow_server, error, status):
    with pytest.raises(type(error), match="boom"):
        with start_run("finetune", tracking_uri=mlflow_server.url, experiment="tiny-data", system_metrics=False) as tracker:
            tracker.log_metrics({"loss": 1.0}, step=0)
            raise error
    run = MlflowClient(mlflow_server.url).get_run(tracker.run_id)
    assert run.info.status == status
    assert run.data.tags["error"] == f"{type(error).__name__}: boom"


def test_unreachable_server_is_a_quick_one_line_error():
    from conftest import free_port

    with pytest.raises(TransferkitError, match="is unreachable.*--no-track"):
        with start_run("finetune", tracking_uri=f"http://127.0.0.1:{free_port()}", system_metrics=False):
            pass


@pytest.mark.slow
def test_deleted_experiment_is_a_one_line_error(mlflow_server):
    client = MlflowClient(mlflow_server.url)
    client.delete_experiment(client.create_experiment("deleted-data"))
    with pytest.raises(TransferkitError, match="'deleted-data' was deleted; restore it"):
        with start_run("finetune", tracking_uri=mlflow_server.url, experiment="deleted-data", system_metrics=False):
            pass


@pytest.mark.slow
def test_missing_artifact_is_a_one_line_error(mlflow_server, tmp_path):
    with start_run("evaluate", tracking_uri=mlflow_server.url, system_metrics=False) as tracker:
        with pytest.raises(TransferkitError, match="does not exist"):
            tracker.log_artifact(tmp_path / "nope.png")


@pytest.mark.slow
def test_per_class_scores_of_any_class_names_are_one_table(mlflow_server, tmp_path):
    """Class names no metric key could hold (spaces, ``/``, ``:``, clashes once cleaned) go into the per-class
    table as they are; the metrics are the split-level scalars only."""
    from transferkit.reports.metrics import classification_metrics, split_scores

    names = ["dirt road", "café", "a/b", "a_b", "..", "日本", "x:y?"]
    y_true = np.arange(len(names))
    probs = np.eye(len(names))[[1, 1, 2, 3, 4, 5, 6]]
    scores = split_scores("test", classification_metrics(y_true, probs, names))
    with start_run("evaluate", tracking_uri=mlflow_server.url, experiment="unicode", system_metrics=False) as tracker:
        tracker.log_evaluation(scores)
    client = MlflowClient(mlflow_server.url)
    logged = client.get_run(tracker.run_id).data.metrics
    assert logged["test_accuracy"] == pytest.approx(6 / 7) and not [key for key in logged if "/" in key]
    table = json.loads(open(client.download_artifacts(tracker.run_id, "test/per_class.json", str(tmp_path))).read())
    rows = {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert list(rows) == names
    assert rows["dirt road"]["recall"] == 0.0 and rows["café"]["recall"] == 1.0
    assert rows["café"]["precision"] == 0.5 and rows["日本"]["f1"] == 1.0 and rows["a/b"]["support"] == 1


def test_description_lists_evaluations_once_per_split():
    from transferkit.tracking.summary import evaluation_line, run_description, with_evaluation

    note = run_description("resnet · full on roads", ["data: 10 images"], {"val_accuracy": 0.5, "best_epoch": 2})
    assert note.splitlines()[:3] == ["**resnet · full on roads**", "", "- data: 10 images"]
    assert "| `val_accuracy` | 0.5000 |" in note and "| `best_epoch` | 2 |" in note
    first = evaluation_line({"split": "test", "test_n": 4, "test_accuracy": 0.5, "test_macro_f1": 0.4},
                            data="/d", artifacts="test")
    again = evaluation_line({"split": "test", "test_n": 4, "test_accuracy": 0.75, "test_macro_f1": 0.7}, tta="hflip")
    updated = with_evaluation(with_evaluation(note, "test", first), "test", again)
    assert updated.count("- **test**:") == 1 and updated.count("**Evaluations**") == 1
    assert updated.rstrip().endswith("- **test**: 4 images, TTA hflip: `test_accuracy` 0.7500, `test_macro_f1` 0.7000")
    assert "confusion matrix: `test/confusion_matrix.png`" in first
