"""The pyfunc model: logged from a tiny checkpoint, loaded in a fresh process, served over HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import (
    CLASS_COLOURS,
    TINY_BACKBONE,
    free_port,
    make_dataset,
    make_image,
    stop_process_tree,
    wait_for_http,
)
from mlflow import MlflowClient

from transferkit.cli import main
from transferkit.tracking.tracker import start_run

CLASSES = ["cat", "dog"]
REGISTERED = "tiny-classifier"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_weights):
    from transferkit.models.backbones import load_backbone
    from transferkit.models.saved_model import checkpoint_metadata, save_checkpoint

    model, preprocessing = load_backbone(TINY_BACKBONE, weights=tiny_weights, num_classes=2)
    metadata = checkpoint_metadata(model, kind="classifier", class_names=CLASSES, preprocessing=preprocessing)
    return save_checkpoint(tmp_path_factory.mktemp("run") / "best", model, metadata)


@pytest.fixture(scope="module")
def logged(mlflow_server, checkpoint):
    with start_run("finetune", tracking_uri=mlflow_server.url, experiment="models", system_metrics=False) as tracker:
        uri = tracker.log_model(checkpoint, register=REGISTERED)
    return uri, tracker.run_id


@pytest.fixture(scope="module")
def svm_folder(tmp_path_factory, tiny_weights):
    """A real `transferkit svm` model folder: frozen backbone checkpoint (kind svm) + head.skops."""
    root = tmp_path_factory.mktemp("svm")
    data = make_dataset(root / "data", classes=CLASSES, splits={"train": 6, "val": 2})
    result = CliRunner().invoke(main, ["svm", "--backbone", TINY_BACKBONE, "--weights", str(tiny_weights), "--data",
                                       str(data), "--model", "logistic", "--cv", "2", "--out", str(root / "model"),
                                       "--workers", "0"])
    assert result.exit_code == 0, result.output
    return root / "model"


@pytest.fixture(scope="module")
def logged_svm(mlflow_server, svm_folder):
    with start_run("svm", tracking_uri=mlflow_server.url, experiment="models", system_metrics=False) as tracker:
        return tracker.log_model(svm_folder)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("requests")
    return [make_image(folder / f"{name}.png", CLASS_COLOURS[name], size=(50, 40), seed=i) for i, name in
            enumerate(CLASSES)]


def _probabilities(model, images):
    from transferkit.models.predictors import load_predictor

    return load_predictor(model).predict_proba([str(p) for p in images])


@pytest.fixture(scope="module")
def expected(checkpoint, images):
    return _probabilities(checkpoint, images)


def _server_env(mlflow_server):
    return {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url,
            "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])}


@pytest.mark.slow
def test_log_model_returns_runs_uri_and_registers(mlflow_server, logged, checkpoint, monkeypatch):
    from transferkit.models.saved_model import find_checkpoint, read_checkpoint_metadata

    uri, run_id = logged
    assert uri == f"runs:/{run_id}/model"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    for spec in (uri, f"models:/{REGISTERED}/1"):
        found = find_checkpoint(spec)
        assert found.name == "model.safetensors" and found.parent.name == "model"
        assert found.read_bytes() == checkpoint.read_bytes()
        assert read_checkpoint_metadata(found)["class_names"] == CLASSES
    version = MlflowClient(mlflow_server.url).get_model_version(REGISTERED, "1")
    assert version.run_id == run_id


@pytest.mark.slow
def test_model_has_signature_example_and_no_pickle(mlflow_server, logged, monkeypatch, tmp_path):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    info = mlflow.models.get_model_info(logged[0])
    assert info.signature.inputs.input_names() == ["image"]
    assert info.signature.outputs.input_names() == ["class", "probability", "top_classes", "top_probabilities"]
    assert info.signature.params.params[0].name == "top_k"
    folder = mlflow.artifacts.download_artifacts(logged[0], dst_path=str(tmp_path))
    files = {os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names}
    assert not any(f.endswith((".pkl", ".pickle", ".pt", ".pth")) for f in files), files
    assert {"MLmodel", "pyfunc_model.py", "serving_input_example.json", "artifacts/model/model.safetensors",
            "code/transferkit/models/saved_model.py"} <= files


PREDICT_SCRIPT = """
import base64, json, sys
import mlflow, numpy as np, pandas as pd
from PIL import Image
uris, paths = sys.argv[1].split(","), sys.argv[2:]
raw = [open(p, "rb").read() for p in paths]
arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
frame = pd.DataFrame({"image": raw + [base64.b64encode(b).decode() for b in raw] + arrays})
result = {}
for uri in uris:
    model = mlflow.pyfunc.load_model(uri)
    result[uri] = {"full": model.predict(frame).to_dict(orient="records"),
                   "top1": model.predict({"image": raw}, params={"top_k": 1}).to_dict(orient="records")}
result["transferkit"] = __import__("transferkit").__file__
print(json.dumps(result))
"""


@pytest.mark.slow
def test_pyfunc_predicts_bytes_base64_and_arrays_in_a_fresh_process(mlflow_server, logged, logged_svm, svm_folder,
                                                                     images, expected):
    """Classifier and SVM models alike: the same probabilities as transferkit's own predictor, for every input form."""
    uris = {logged[0]: expected, logged_svm: _probabilities(svm_folder, images)}
    done = subprocess.run([sys.executable, "-c", PREDICT_SCRIPT, ",".join(uris), *map(str, images)],
                          env=_server_env(mlflow_server), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for uri, probs_by_image in uris.items():
        rows = result[uri]["full"]
        assert len(rows) == 3 * len(images)
        for i, row in enumerate(rows):
            probs = probs_by_image[i % len(images)]
            assert row["class"] == CLASSES[int(np.argmax(probs))]
            assert row["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
            assert row["top_classes"][0] == row["class"] and sorted(row["top_classes"]) == CLASSES
            assert row["top_probabilities"] == pytest.approx(sorted(probs.tolist(), reverse=True), abs=1e-5)
        assert [len(r["top_classes"]) for r in result[uri]["top1"]] == [1, 1]
    assert "/code/transferkit/" in result["transferkit"]  # the model's bundled code, not the checkout


@pytest.mark.slow
def test_svm_model_carries_its_head(mlflow_server, logged_svm, svm_folder, monkeypatch):
    from transferkit.models.saved_model import find_checkpoint

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    found = find_checkpoint(logged_svm)
    assert (found.parent / "head.skops").read_bytes() == (svm_folder / "head.skops").read_bytes()


def test_decode_image_accepts_every_documented_form(images):
    from PIL import Image

    from transferkit.errors import TransferkitError
    from transferkit.tracking.pyfunc_model import decode_image

    raw = images[0].read_bytes()
    reference = np.asarray(Image.open(images[0]).convert("RGB"))
    encoded = base64.b64encode(raw)
    for value in (raw, bytearray(raw), encoded, encoded.decode(), "data:image/png;base64," + encoded.decode(), reference):
        np.testing.assert_array_equal(decode_image(value), reference)
    assert decode_image(reference[..., 0]).shape == (*reference.shape[:2], 3)  # grayscale
    assert decode_image(np.dstack([reference, np.full(reference.shape[:2], 255, np.uint8)])).shape == reference.shape
    with pytest.raises(TransferkitError, match="cannot decode image"):
        decode_image(b"\x00\x01 not an image")
    with pytest.raises(TransferkitError, match="must be uint8"):
        decode_image(reference.astype(np.float32))
    with pytest.raises(TransferkitError, match="unsupported image value"):
        decode_image(3.5)


def test_predictions_frame_top_k_is_capped_by_the_classes():
    from transferkit.tasks import get_task
    from transferkit.tracking.pyfunc_model import predictions_frame

    frame = predictions_frame(get_task(), np.array([[0.1, 0.7, 0.2]]), ["a", "b", "c"], top_k=10)
    assert frame.to_dict(orient="records") == [
        {"class": "b", "probability": 0.7, "top_classes": ["b", "c", "a"], "top_probabilities": [0.7, 0.2, 0.1]}]
    assert predictions_frame(get_task(), np.array([[0.1, 0.7, 0.2]]), ["a", "b", "c"], top_k=0)["top_classes"][0] == ["b"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_served_model_answers_an_image_post(mlflow_server, logged, images, expected, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", logged[0], "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)],
            env=_server_env(mlflow_server), stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, timeout=150, log=log)
        encoded = [base64.b64encode(p.read_bytes()).decode() for p in images]
        payloads = [
            {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}},
            {"instances": [{"image": e} for e in encoded], "params": {"top_k": 1}},
        ]
        for payload in payloads:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(payload).encode(),
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                predictions = json.load(response)["predictions"]
            assert [p["class"] for p in predictions] == [CLASSES[i] for i in expected.argmax(1)]
            assert [p["probability"] for p in predictions] == pytest.approx(expected.max(1).tolist(), abs=1e-5)
        assert len(predictions[0]["top_classes"]) == 1
    finally:
        stop_process_tree(server)


def test_decode_image_refuses_bad_base64_and_bombs_in_one_line():
    """Issue 24: what a client of `mlflow models serve` can send is decoded within bounds, with a clear message."""
    from PIL import Image

    from transferkit.errors import TransferkitError
    from transferkit.tracking.pyfunc_model import decode_image

    with pytest.raises(TransferkitError, match="it is text but not valid base64"):
        decode_image(b"hello world")  # looks like base64 text; was a bare binascii.Error
    with pytest.raises(TransferkitError, match="cannot decode image .*not an image transferkit can decode"):
        decode_image(base64.b64encode(b"plain text, not an image"))
    bomb = io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb, format="PNG")
    with pytest.raises(TransferkitError, match="9000x9000 pixels, above the 16,777,216-pixel limit"):
        decode_image(base64.b64encode(bomb.getvalue()).decode())


def test_model_predicts_a_batch_at_a_time_with_the_same_answers(checkpoint, images, monkeypatch):
    import pandas as pd

    from transferkit.models.predictors import load_predictor
    from transferkit.tracking import pyfunc_model

    model = pyfunc_model.TransferkitImageModel()
    model.predictor = load_predictor(checkpoint)
    frame = pd.DataFrame({"image": [p.read_bytes() for p in images] * 3})
    whole = model.predict(None, frame)
    monkeypatch.setattr(pyfunc_model, "BATCH_SIZE", 4)  # 6 images: batches of 4 and 2
    batched = model.predict(None, frame)
    pd.testing.assert_frame_equal(whole, batched)
    expected = model.predictor.predict_proba([str(p) for p in images])
    assert batched["probability"][:2].tolist() == pytest.approx(expected.max(1).tolist(), abs=1e-6)
    assert model.predict(None, pd.DataFrame({"image": []})).empty
