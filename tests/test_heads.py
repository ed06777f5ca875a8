"""Classical heads on frozen features: the `svm` command, the saved model folder and its predictor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skops.io
import torch
from conftest import (
    SHARED_ROADS,
    SHARED_WEIGHTS,
    TINY_BACKBONE,
    extract_tiny,
    requires_shared_roads,
    requires_shared_weights,
)
from safetensors.torch import save_file

from transferkit.cli import main
from transferkit.errors import TransferkitError
from transferkit.features.classical_heads import fit_head, parse_grid, predict_proba_features
from transferkit.features.extract import extract_features
from transferkit.features.feature_file import FeatureTable, read_features
from transferkit.models.predictors import load_predictor
from transferkit.models.svm_head import load_head


@pytest.fixture
def other_weights(tiny_weights, tmp_path):
    """Same architecture and sidecar, different random weights."""
    import timm

    torch.manual_seed(1)
    path = tmp_path / "other.safetensors"
    model = timm.create_model(TINY_BACKBONE, pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_name("other.safetensors.json").write_text(tiny_weights.with_suffix(".json").read_text())
    return path


@pytest.mark.slow
def test_svm_cli_from_features_file(runner, tiny_data3, tiny_weights, tmp_path):
    features = extract_tiny(tiny_data3, tiny_weights, tmp_path / "f.parquet")
    out = tmp_path / "model"
    result = runner.invoke(main, ["svm", "--features", str(features), "--model", "linear-svm", "--cv", "3",
                                  "--grid", "C=0.1,1", "--out", str(out), "--tracking-uri",
                                  f"sqlite:///{tmp_path / 'mlflow.db'}", "--experiment", "svm-test"])
    assert result.exit_code == 0, result.output
    assert "linear-svm: C=" in result.output and "val   accuracy" in result.output
    metadata = json.loads((out / "model.json").read_text())
    assert metadata["kind"] == "svm" and metadata["num_classes"] == 0 and metadata["head_file"] == "head.skops"
    assert metadata["class_names"] == ["cat", "dog", "fox"] and metadata["pool"] == "avg"
    assert metadata["head_params"]["C"] in (0.1, 1) and metadata["cv_folds"] == 3
    assert set(metadata["head_metrics"]["val"]) == {"n", "accuracy", "balanced_accuracy", "macro_f1"}
    scores = json.loads((out / "metrics.json").read_text())["metrics"]["val"]
    assert np.array(scores["confusion_matrix"]).sum() == scores["n"] == 3  # one val image per class carved from 6
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("svm-test").experiment_id])
    assert run.data.metrics["val_accuracy"] == scores["accuracy"] and run.data.params["head_model"] == "linear-svm"
    assert run.data.tags["strategy"] == "svm-linear-svm" and "MLflow run" in result.output


def test_svm_shortcut_model_predicts_images(runner, tiny_data, tiny_weights, tmp_path):
    out = tmp_path / "model"
    result = runner.invoke(main, ["svm", "--backbone", TINY_BACKBONE, "--weights", str(tiny_weights), "--data",
                                  str(tiny_data), "--model", "rbf-svm", "--out", str(out), "--workers", "0",
                                  "--no-track"])
    assert result.exit_code == 0, result.output
    table, meta = read_features(out / "features.parquet")
    predictor = load_predictor(out)
    val = table.subset("val")
    probs = predictor.predict_proba([tiny_data / p for p in val.paths])
    assert probs.shape == (8, 2) and np.allclose(probs.sum(1), 1)
    assert (probs.argmax(1) == val.label_index).all()
    # images through the saved model == its head on the extracted vectors: the same preprocessing and pooling
    np.testing.assert_allclose(probs, predict_proba_features(predictor, (val, meta)), atol=1e-5)


def test_features_from_other_weights_are_refused(tiny_data, tiny_weights, other_weights, tmp_path):
    mine = extract_tiny(tiny_data, tiny_weights, tmp_path / "mine.parquet")
    fit_head(mine, "logistic", cv=2, out=tmp_path / "model")
    foreign = extract_tiny(tiny_data, other_weights, tmp_path / "other.parquet")
    predictor = load_predictor(tmp_path / "model")
    with pytest.raises(TransferkitError, match="another model.*weights"):
        predict_proba_features(predictor, foreign)
    with pytest.raises(TransferkitError, match="another model.*pool"):
        predict_proba_features(predictor, extract_tiny(tiny_data, tiny_weights, tmp_path / "max.parquet", pool="max"))
    with pytest.raises(TransferkitError, match="pass the same --weights"):
        fit_head(mine, "logistic", cv=2, out=tmp_path / "model2", weights=other_weights)


def _table(labels, splits=None):
    labels = np.asarray(labels)
    rng = np.random.default_rng(0)
    return FeatureTable(np.array([f"{i}.png" for i in range(len(labels))]), labels.astype(str), labels,
                        np.asarray(splits or ["train"] * len(labels)), rng.normal(size=(len(labels), 4)).astype(np.float32))


@pytest.mark.parametrize(("labels", "splits", "message"), [
    ([0, 0, 0, 0], None, "single class"),
    ([0, 0, 0, 1], None, "class '1' has 1 train image"),
    ([0, 1], ["val", "val"], "no train rows"),
])
def test_heads_refuse_what_cannot_be_cross_validated(labels, splits, message):
    with pytest.raises(TransferkitError, match=message):
        fit_head((_table(labels, splits), {"class_names": ["0", "1"]}), "logistic")


def test_cv_is_capped_by_the_smallest_class():
    result = fit_head((_table([0, 0, 0, 0, 0, 0, 1, 1]), {"class_names": ["0", "1"]}), "linear-svm", cv=5)
    assert result.cv_folds == 2


def test_parse_grid():
    assert parse_grid("C=0.01,1;gamma=scale,0.5", "rbf-svm") == {"C": [0.01, 1], "gamma": ["scale", 0.5]}
    assert parse_grid(None, "logistic") == {"C": [0.01, 0.1, 1.0, 10.0]}
    with pytest.raises(TransferkitError, match="bad grid entry 'alpha=1'"):
        parse_grid("alpha=1", "linear-svm")


def test_head_files_with_untrusted_types_are_refused(tmp_path):
    import os

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    path = tmp_path / "head.skops"
    skops.io.dump(make_pipeline(FunctionTransformer(os.getcwd), LogisticRegression()), path)
    with pytest.raises(TransferkitError, match="types transferkit does not write"):
        load_head(path)


def test_svm_cli_argument_errors(runner, tmp_path):
    result = runner.invoke(main, ["svm", "--out", str(tmp_path / "m"), "--no-track"])
    assert result.exit_code == 2 and "error: missing --backbone and --data" in result.output
    result = runner.invoke(main, ["svm", "--features", "f.parquet", "--backbone", TINY_BACKBONE])
    assert result.exit_code == 2 and "either --features" in result.output
    result = runner.invoke(main, ["svm", "--features", "f.parquet", "--pool", "max", "--tta", "hflip"])
    assert result.exit_code == 2 and "--pool, --tta only apply when svm extracts" in result.output


@pytest.mark.slow
@requires_shared_weights
@requires_shared_roads
def test_real_lite0_features_separate_road_surfaces(tmp_path):
    features = extract_features("tf_efficientnet_lite0", SHARED_ROADS, tmp_path / "roads.parquet",
                                weights=SHARED_WEIGHTS / "tf_efficientnet_lite0.safetensors", device="cpu")
    result = fit_head(features, "logistic")
    assert result.metrics["val"]["accuracy"] >= 0.90


def test_random_init_features_cannot_become_a_model(tiny_data, tmp_path):
    features = extract_features(TINY_BACKBONE, tiny_data, tmp_path / "f.parquet", pretrained=False, workers=0,
                                device="cpu")
    assert fit_head(features, "logistic", cv=2).metrics["val"]["n"] == 8  # fitting alone is fine
    with pytest.raises(TransferkitError, match="randomly initialised"):
        fit_head(features, "logistic", cv=2, out=tmp_path / "model")
    assert not (tmp_path / "model").exists()
