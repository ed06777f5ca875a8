"""`transferkit evaluate` and `predict` end to end on a tiny trained classifier (fixture tiny_classifier)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_dataset
from PIL import Image
from sklearn import metrics

from transferkit.cli import main
from transferkit.errors import TransferkitError
from transferkit.use.evaluate import evaluate
from transferkit.use.predict import predict


def _probabilities(rows, class_names=("cat", "dog")):
    """Class probabilities back from predict rows (top-k covers both classes here)."""
    out = np.zeros((len(rows), len(class_names)))
    for i, row in enumerate(rows):
        for rank in (1, 2):
            out[i, class_names.index(row[f"top{rank}_class"])] = row[f"top{rank}_prob"]
    return out


def test_evaluate_cli_numbers_equal_sklearn(runner, tiny_classifier, tiny_data, tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(main, ["evaluate", "--model", str(tiny_classifier), "--data", str(tiny_data),
                                  "--split", "val", "--no-track", "--out", str(out), "--json", "--workers", "0"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    rows = predict(tiny_classifier, [tiny_data / "val"], topk=2, workers=0)
    probs = _probabilities(rows)
    y_true = np.array([0 if "/cat/" in row["path"] else 1 for row in rows])
    y_pred = probs.argmax(1)
    assert report["split"] == "val" and report["val_n"] == 8
    assert report["val_accuracy"] == pytest.approx(metrics.accuracy_score(y_true, y_pred))
    assert report["val_balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy_score(y_true, y_pred))
    assert report["val_macro_f1"] == pytest.approx(metrics.f1_score(y_true, y_pred, average="macro"))
    assert report["confusion_matrix"] == metrics.confusion_matrix(y_true, y_pred).tolist()
    assert report["per_class"]["dog"]["support"] == 4
    assert report["val_accuracy"] > 0.5  # the tiny model learnt the colours
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion_matrix.png", "confusion_matrix_normalized.png", "errors.png", "metrics.json",
        "predictions.csv", "reliability.png"]
    for png in out.glob("*.png"):
        with Image.open(png) as img:
            assert img.format == "PNG"
    written = pd.read_csv(out / "predictions.csv")
    assert len(written) == 8 and set(written.columns) >= {"path", "true", "pred", "prob", "prob_cat", "prob_dog"}
    assert json.loads((out / "metrics.json").read_text())["val_macro_f1"] == report["val_macro_f1"]


@pytest.mark.slow
def test_evaluate_mlflow_model_uri_logs_to_the_model_run(runner, tiny_classifier, tiny_data, tmp_path, monkeypatch):
    """A runs:/ model URI evaluates like its folder, and the scores land on the run that logged the model."""
    from mlflow import MlflowClient

    from transferkit.tracking.tracker import start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    with start_run("finetune", system_metrics=False) as tracker:
        model_uri = tracker.log_model(tiny_classifier / "model.safetensors")
    result = runner.invoke(main, ["evaluate", "--model", model_uri, "--data", str(tiny_data), "--split", "val",
                                  "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "precision" in result.output and "val_accuracy:" in result.output
    assert result.output.strip().splitlines()[-1] == (
        f"val_* metrics logged to MLflow run {tracker.run_id} (the run that trained the model)")
    run = MlflowClient(uri).get_run(tracker.run_id)
    local = evaluate(tiny_classifier, tiny_data, split="val", track=False, workers=0)
    assert run.data.metrics["val_accuracy"] == pytest.approx(local["val_accuracy"])
    assert run.data.metrics["val_macro_f1"] == pytest.approx(local["val_macro_f1"])
    assert run.data.tags["command"] == "finetune" and run.info.status == "FINISHED"
    assert run.data.tags["val_data"] == str(tiny_data)
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(tracker.run_id, "val")}
    assert {"val/confusion_matrix.png", "val/errors.png", "val/reliability.png"} <= artifacts


def test_evaluate_of_an_untracked_model_is_a_run_naming_it(runner, tiny_classifier, tiny_data, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = evaluate(tiny_classifier, tiny_data, split="val", workers=0, tracking_uri=uri)
    assert result["mlflow_model_run"] is False
    run = MlflowClient(uri).get_run(result["mlflow_run_id"])
    assert run.info.run_name == f"evaluate-{tiny_classifier.name}-val"
    assert run.data.tags["command"] == "evaluate" and run.data.params["split"] == "val"
    assert run.data.tags["source_model"] == str(tiny_classifier)
    assert run.data.metrics["val_accuracy"] == pytest.approx(result["val_accuracy"])
    assert MlflowClient(uri).get_experiment(run.info.experiment_id).name == tiny_data.name  # beside its training runs
    assert f"evaluate {tiny_classifier.name} on val" in run.data.tags["mlflow.note.content"]


@pytest.mark.slow
def test_svm_model_evaluates_and_predicts(runner, tiny_weights, tiny_data, tmp_path):
    from conftest import TINY_BACKBONE

    model = tmp_path / "svm"
    result = runner.invoke(main, ["svm", "--backbone", TINY_BACKBONE, "--weights", str(tiny_weights), "--data",
                                  str(tiny_data), "--model", "logistic", "--cv", "2", "--out", str(model),
                                  "--workers", "0"])
    assert result.exit_code == 0, result.output
    report = evaluate(model, tiny_data, split="val", track=False, workers=0)
    rows = predict(model, [tiny_data / "val"], topk=2, workers=0)
    y_pred = _probabilities(rows).argmax(1)
    y_true = np.array([0 if "/cat/" in row["path"] else 1 for row in rows])
    assert report["val_accuracy"] == pytest.approx(metrics.accuracy_score(y_true, y_pred))
    assert report["val_n"] == 8 and set(report["per_class"]) == {"cat", "dog"}


def test_evaluate_whole_folder_skips_unreadable_and_missing_split(tiny_classifier, tmp_path):
    data = make_dataset(tmp_path / "flat", classes=("dog", "cat"), per_class=3)
    (data / "cat" / "truncated.png").write_bytes(b"\x89PNG\r\n")
    result = evaluate(tiny_classifier, data, track=False, workers=0)
    assert result["split"] == "all" and result["all_n"] == 6
    assert [Path(s["path"]).name for s in result["skipped"]] == ["truncated.png"]
    with pytest.raises(TransferkitError, match="split 'test' not found .* it has: train"):
        evaluate(tiny_classifier, data, split="test", track=False, workers=0)


def test_evaluate_maps_classes_by_name(tiny_classifier, tmp_path):
    data = make_dataset(tmp_path / "three", classes=("cat", "dog", "fox"), per_class=2)
    with pytest.raises(TransferkitError, match="classes the model does not know: fox"):
        evaluate(tiny_classifier, data, track=False, workers=0)


def test_evaluate_cli_unknown_split_is_one_line(runner, tiny_classifier, tiny_data):
    result = runner.invoke(main, ["evaluate", "--model", str(tiny_classifier), "--data", str(tiny_data),
                                  "--split", "test", "--no-track"])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: split 'test' not found in {tiny_data}; it has: train, val"


def test_predict_folder_with_corrupt_file(runner, tiny_classifier, tiny_data, tmp_path):
    folder = tiny_data / "val"
    (folder / "cat" / "broken.png").write_bytes(b"not an image at all")
    for suffix in (".csv", ".json", ".parquet"):
        out = tmp_path / f"preds{suffix}"
        result = runner.invoke(main, ["predict", "--model", str(tiny_classifier), str(folder), "--out", str(out),
                                      "--batch-size", "3", "--workers", "0"])
        assert result.exit_code == 0, result.output
        rows = pd.read_json(out) if suffix == ".json" else pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
        assert len(rows) == 9
        broken = rows[rows["path"].str.endswith("broken.png")].iloc[0]
        assert "cannot decode" in broken["error"] and pd.isna(broken["pred"])
        good = rows[~rows["path"].str.endswith("broken.png")]
        assert good["error"].fillna("").eq("").all()
        assert (good["pred"] == good["path"].str.split("/").str[-2]).mean() > 0.5
        assert np.allclose(good["top1_prob"] + good["top2_prob"], 1.0, atol=1e-5)
        assert "1 of 9 images could not be read" in result.output


def test_predict_prints_table_for_files_and_globs(runner, tiny_classifier, tiny_data):
    pattern = str(tiny_data / "train" / "dog" / "*.png")
    result = runner.invoke(main, ["predict", "--model", str(tiny_classifier), str(tiny_data / "val" / "cat" / "cat_0.png"),
                                  pattern, "--topk", "1", "--workers", "0"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 9 and "cat_0.png" in lines[0]
    assert all(len(line.split()) == 3 for line in lines)  # path, class, probability


def test_predict_tta_hflip_averages_the_mirror(tiny_classifier, tiny_data):
    """Across batches, each row is the mean of the model's probabilities on the eval view and its mirror."""
    from transferkit.data import load_image
    from transferkit.models.predictors import load_predictor

    paths = sorted((tiny_data / "val").rglob("*.png"))[:5]
    tta = _probabilities(predict(tiny_classifier, paths, topk=2, tta="hflip", batch_size=2, workers=0))
    predictor = load_predictor(tiny_classifier)
    views = torch.stack([predictor.preprocessing.eval_transform()(load_image(p)) for p in paths])
    expected = (predictor.predict_proba_tensor(views) + predictor.predict_proba_tensor(views.flip(-1))) / 2
    np.testing.assert_allclose(tta, expected, atol=1e-6)
    plain = _probabilities(predict(tiny_classifier, paths, topk=2, workers=0))
    assert np.abs(plain - tta).max() > 1e-6  # the mirror does change the answer, so the check above means something


def test_predict_input_errors(tiny_classifier, tmp_path):
    with pytest.raises(TransferkitError, match="does not exist"):
        predict(tiny_classifier, [tmp_path / "nope.png"])
    with pytest.raises(TransferkitError, match="no images found"):
        predict(tiny_classifier, [str(tmp_path / "*.jpg")])
    with pytest.raises(TransferkitError, match="unknown format"):
        predict(tiny_classifier, [tmp_path], out=tmp_path / "p.xlsx")
    with pytest.raises(TransferkitError, match="unknown --tta"):
        predict(tiny_classifier, [tmp_path], tta="rotate")


def test_predict_out_replaces_only_an_earlier_predictions_file(tiny_classifier, tiny_data, tmp_path):
    """Issue 24: `predict --out` replaced any .csv/.json/.parquet, a model's best.json among them."""
    import shutil

    images = [tiny_data / "val"]
    model = shutil.copytree(tiny_classifier, tmp_path / "model")
    metadata = next(model.glob("*.json"))
    kept = metadata.read_bytes()
    notes = tmp_path / "notes.csv"
    notes.write_text("name,amount\nrent,900\n")
    table = tmp_path / "table.parquet"
    pd.DataFrame({"path": ["a"], "value": [1]}).to_parquet(table)
    for out in (metadata, notes, table):
        with pytest.raises(TransferkitError, match="already exists and is not an earlier predictions file"):
            predict(model, images, out=out, workers=0)
    assert metadata.read_bytes() == kept and notes.read_text() == "name,amount\nrent,900\n"
    with pytest.raises(TransferkitError, match="^--out /proc/tk/p.csv cannot be written"):
        predict(model, images, out="/proc/tk/p.csv", workers=0)
    for suffix in (".csv", ".json", ".parquet"):
        out = tmp_path / f"preds{suffix}"
        predict(model, images, out=out, topk=1, workers=0)
        predict(model, images, out=out, topk=2, workers=0)  # its own earlier file: replaced
        assert "top2_class" in (pd.read_json(out) if suffix == ".json" else pd.read_csv(out) if suffix == ".csv"
                                else pd.read_parquet(out)).columns


def test_evaluate_out_never_replaces_a_run_or_model_folder_files(tiny_classifier, tiny_data, tmp_path, monkeypatch):
    """Issue 24: `evaluate --out MODEL_DIR` replaced an SVM model's metrics.json; a user's folder got six files."""
    import shutil

    from transferkit.use.evaluate import check_report_folder

    model = shutil.copytree(tiny_classifier, tmp_path / "model")
    (model / "metrics.json").write_text('{"head_model": "logistic"}')
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    monkeypatch.setattr("transferkit.models.predictors.load_predictor", None)  # refused before the model loads
    for out, message in ((model, "not an earlier evaluate report"), (mine, "not an earlier evaluate report"),
                         (mine / "notes.txt", "is a file"), (Path("/proc/tk/report"), "cannot be written")):
        with pytest.raises(TransferkitError, match=message):
            evaluate(model, tiny_data, split="val", track=False, workers=0, out=out)
    assert (model / "metrics.json").read_text() == '{"head_model": "logistic"}'
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    monkeypatch.undo()
    report = tmp_path / "report"
    evaluate(model, tiny_data, split="val", track=False, workers=0, out=report)
    assert check_report_folder(report) == report  # an earlier report: evaluate may write it again
