"""Issue 24: a study refuses other data and reused folders, lost trials are retried, one parent run per study,
random-init features are never shared, no password in a message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_sweep
import yaml
from conftest import make_dataset, make_image
from test_sweep import BACKBONES, FAST, run_sweep

from transferkit.errors import TransferkitError

weights_dir, env, data = test_sweep.weights_dir, test_sweep.env, test_sweep.data  # the same fixtures

ONE = {"backbones": BACKBONES[:1], "top_k": 1}


@pytest.fixture
def no_training(monkeypatch):
    import transferkit.sweep.runner

    monkeypatch.setattr(transferkit.sweep.runner, "rank_backbones", lambda *a, **k: pytest.fail("stage 1 started"))


@pytest.mark.slow
def test_a_study_refuses_other_data_unless_allowed(env, data, monkeypatch):
    storage = f"sqlite:///{env / 'study.db'}"
    first = run_sweep(data, storage=storage, study="s", **ONE)
    assert len(first.leaderboard) == 1

    import transferkit.sweep.runner

    real_rank = transferkit.sweep.runner.rank_backbones
    monkeypatch.setattr(transferkit.sweep.runner, "rank_backbones", lambda *a, **k: pytest.fail("stage 1 started"))
    other = make_dataset(env / "other" / "data", classes=("cat", "fox"), splits={"train": 10, "val": 4})
    with pytest.raises(TransferkitError, match=r"made for other data \(classes cat, dog -> cat, fox\)"):
        run_sweep(other, storage=storage, study="s", **ONE)
    make_image(data / "train" / "cat" / "added.png", (200, 40, 40), seed=7)  # same folder, files changed
    with pytest.raises(TransferkitError, match=r"made for other data \(1 files added \(e\.g\. train/cat/added\.png\)\).*--allow-data-change"):
        run_sweep(data, storage=storage, study="s", **ONE)
    with pytest.raises(TransferkitError, match=r"made with other settings \(fixed: "):
        run_sweep(data, storage=storage, study="s", fixed={**FAST, "epochs": 2}, **ONE)

    monkeypatch.setattr(transferkit.sweep.runner, "rank_backbones", real_rank)
    allowed = run_sweep(data, storage=storage, study="s", allow_data_change=True, **ONE)
    assert list(allowed.leaderboard["trial"]) == [0]  # the grid was done: continued knowingly, nothing retrained
    again = run_sweep(data, storage=storage, study="s", **ONE)  # the study now records the data as it is
    assert list(again.leaderboard["trial"]) == [0]


@pytest.mark.parametrize("study", ["../x", "/abs/x", ".", "a\\b"])
def test_a_study_name_is_a_name_not_a_path(env, data, no_training, study):
    with pytest.raises(TransferkitError, match="bad value for study: .*single folder name"):
        run_sweep(data, study=study, **ONE)
    assert not (env / "x").exists() and not (env / "sweeps").exists()


@pytest.mark.parametrize("storage", [None, "sqlite:///study.db"])
def test_a_new_study_in_a_used_folder_is_refused_before_stage_1(env, data, no_training, storage):
    (env / "sweeps" / "s" / "trial-000-test_efficientnet").mkdir(parents=True)
    (env / "sweeps" / "s" / "leaderboard.csv").write_text("kept\n")
    with pytest.raises(TransferkitError, match="sweeps/s already holds another sweep's files"):
        run_sweep(data, study="s", storage=storage, **ONE)
    assert (env / "sweeps" / "s" / "leaderboard.csv").read_text() == "kept\n"


@pytest.mark.parametrize("line, message", [
    ("top_k: abc", "bad value for top_k: 'abc'; it must be an int >= 1 (in sweep file"),
    ("trials: abc", "bad value for trials: 'abc'; it must be an int >= 1 (in sweep file"),
    ("top_k: 0", "bad value for top_k: 0;"),
    ("metric: accuracy", "unknown metric 'accuracy'"),
    ("backbones: 3", "backbones: in sweep file"),
])
def test_bad_sweep_file_values_are_one_line(env, data, runner, line, message):
    from transferkit.cli import main

    spec = env / "sweep.yaml"
    spec.write_text(("backbones: [test_efficientnet]\n" if not line.startswith("backbones") else "") + line + "\n")
    result = runner.invoke(main, ["sweep", "--data", str(data), "--space", str(spec), "--no-track"])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


@pytest.mark.parametrize("text, shown", [
    ("postgresql://optuna:s3cret@db.example:5432/studies", "postgresql://optuna:***@db.example:5432/studies"),
    ("cannot open mysql+pymysql://root:p@ss@h/db: refused", "cannot open mysql+pymysql://root:***@h/db: refused"),
    ("https://h/api?x=1&token=s3cret&password=s3cret", "https://h/api?x=1&token=***&password=***"),
    ("sqlite:////tmp/study.db and http://localhost:5000/x", "sqlite:////tmp/study.db and http://localhost:5000/x"),
])
def test_redact_hides_passwords_and_tokens_in_urls(text, shown):
    from transferkit.tracking.store import redact

    assert redact(text) == shown


@pytest.mark.slow
def test_no_password_in_a_storage_or_tracking_error(env, data, no_training):
    with pytest.raises(TransferkitError) as storage_error:
        run_sweep(data, storage="postgresql+nosuchdriver://optuna:s3cret@127.0.0.1:1/db", **ONE)
    with pytest.raises(TransferkitError) as tracking_error:
        run_sweep(data, track=True, tracking_uri="http://admin:s3cret@127.0.0.1:1", **ONE)
    for error, shown in ((storage_error, "optuna:***@127.0.0.1:1"), (tracking_error, "admin:***@127.0.0.1:1")):
        assert shown in str(error.value) and "s3cret" not in str(error.value)


def test_random_init_features_are_never_reused(tmp_path, tiny_data, tiny_weights):
    """Two random inits are two models: features of one never train the head saved with the other."""
    from transferkit.features.extract import extract_features
    from transferkit.models.backbones import load_backbone
    from transferkit.train.feature_cache import backbone_features_identity, stored_features

    path = extract_features("test_efficientnet", str(tiny_data), tmp_path / "f.parquet", pretrained=False,
                            workers=0, device="cpu")
    model, preprocessing = load_backbone("test_efficientnet", num_classes=2, pretrained=False)
    from transferkit.data import discover

    index = discover(tiny_data)
    said = []
    assert stored_features(path, backbone_features_identity(model, preprocessing), index, index.fingerprint(),
                           said.append) is None
    assert "random init" in said[0]


@pytest.mark.slow
def test_a_random_init_linear_probe_trial_scores_the_model_it_saves(env, data):
    from transferkit.data import discover
    from transferkit.models.predictors import load_predictor

    result = run_sweep(data, fixed={**FAST, "pretrained": False}, **ONE)
    winner = result.winner
    predictor = load_predictor(Path(winner["run_dir"]) / "best.safetensors")
    index = discover(data)
    val = index.split("val")
    predicted = predictor.predict_proba([s.path for s in val]).argmax(1)
    accuracy = sum(int(p == s.label) for p, s in zip(predicted, val)) / len(val)
    assert accuracy == pytest.approx(winner["val_accuracy"])


# --------------------------------------------------------------------------- processes: real kills, real races

def _sweep_command(data: Path, work: Path, *extra: str, epochs: int = 1) -> list[str]:
    spec = work / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"backbones": BACKBONES[:1], "top_k": 1,
                                    "fixed": {**FAST, "strategy": "full", "epochs": epochs, "img_size": 32}}))
    return [sys.executable, "-m", "transferkit", "sweep", "--data", str(data), "--space", str(spec),
            "--storage", f"sqlite:///{work / 'study.db'}", "--study", "k", "--out", str(work / "sweeps"), *extra]


def _env(weights_dir: Path) -> dict:
    return {**os.environ, "TRANSFERKIT_WEIGHTS_DIR": str(weights_dir), "NO_ALBUMENTATIONS_UPDATE": "1",
            "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}


@pytest.mark.slow
@pytest.mark.parametrize("where", ["same machine", "other machine"])
def test_a_sigkilled_trial_is_retried_and_continues_its_run_folder(env, data, weights_dir, monkeypatch, where):
    import optuna
    from mlflow import MlflowClient

    import transferkit.sweep.study as study_module

    uri = f"sqlite:///{env / 'mlflow.db'}"
    folder = env / "sweeps" / "k" / "trial-000-test_efficientnet"
    killed = subprocess.Popen(_sweep_command(data, env, "--tracking-uri", uri, epochs=5), env=_env(weights_dir),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (folder / "resume.pt").is_file() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, "the sweep ended before its trial committed an epoch"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    storage = f"sqlite:///{env / 'study.db'}"
    before = optuna.load_study(study_name="k", storage=storage).get_trials()
    assert [t.state.name for t in before] == ["RUNNING"]
    if where == "other machine":  # its process id means nothing here: the stale heartbeat is what tells
        monkeypatch.setattr(study_module.socket, "gethostname", lambda: "another-host")
        monkeypatch.setattr(study_module, "HEARTBEAT_SECONDS", 1)  # grace 2 s instead of 20 s
        time.sleep(2.5)

    started = time.time()
    result = run_sweep(data, storage=storage, study="k", track=True, tracking_uri=uri, out=str(env / "sweeps"),
                       fixed={**FAST, "strategy": "full", "epochs": 5, "img_size": 32}, **ONE)
    after = optuna.load_study(study_name="k", storage=storage).get_trials()
    assert [t.state.name for t in after] == ["FAIL", "COMPLETE"]
    retried_after = after[1].datetime_start.timestamp() - started
    print(f"{where}: states before {[t.state.name for t in before]}, after {[t.state.name for t in after]}; "
          f"retry started {retried_after:.1f} s after the rerun started")
    assert after[1].params == after[0].params and retried_after < 30
    assert result.leaderboard.set_index("trial").loc[0, "error"] == "its process was killed; retried as trial 1"
    assert result.winner["trial"] == 1 and result.winner["run_dir"] == str(folder)  # the same folder, continued
    # resumed, not restarted: a start in a folder with a committed epoch is refused; every epoch once
    assert len((folder / "metrics.csv").read_text().splitlines()) == 6
    client = MlflowClient(uri)
    children = client.search_runs([client.get_experiment_by_name(_experiment(client)).experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert sorted(run.info.status for run in children) == ["FINISHED", "KILLED"]


def _experiment(client) -> str:
    return next(e.name for e in client.search_experiments() if e.name != "Default")


@pytest.mark.slow
def test_two_sweeps_started_together_on_a_fresh_store_share_one_parent_and_register_once(env, data, weights_dir):
    from mlflow import MlflowClient

    uri = f"sqlite:///{env / 'fresh' / 'mlflow.db'}"
    command = _sweep_command(data, env, "--tracking-uri", uri, "--register", "best-k", epochs=1)
    spec = yaml.safe_load((env / "sweep.yaml").read_text())
    spec["space"] = {"lr": [0.001, 0.01]}
    (env / "sweep.yaml").write_text(yaml.safe_dump(spec))
    processes = [subprocess.Popen(command, env=_env(weights_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert not any("Traceback" in output for output in outputs), outputs
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(_experiment(client)).experiment_id
    parents = client.search_runs([experiment], "tags.sweep_study = 'k'")
    assert len(parents) == 1
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert len(children) == 2 and {run.data.params["lr"] for run in children} == {"0.001", "0.01"}
    assert len(client.search_model_versions("name = 'best-k'")) == 1


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_workers_on_one_sqlite_study_never_pop_the_same_waiting_trial(tmp_path):
    """Optuna's pop (read WAITING, then set RUNNING) is one step only if the transaction locks first: on plain
    pysqlite 4 threads popped 2-3 of 60 grid points twice; through open_storage none."""
    import threading
    from collections import Counter

    import optuna

    from transferkit.sweep.study import open_storage

    url = f"sqlite:///{tmp_path / 'pop.db'}"
    study = optuna.create_study(storage=open_storage(url), study_name="pop")
    for i in range(40):
        study.enqueue_trial({"i": i})
    popped, errors = Counter(), []

    def worker():
        mine = optuna.load_study(study_name="pop", storage=open_storage(url))
        while True:
            try:
                trial = mine.ask()  # pops a waiting trial, or makes a new one once none is left
                if "fixed_params" not in mine.get_trials(deepcopy=False)[trial.number].system_attrs:
                    mine.tell(trial, state=optuna.trial.TrialState.FAIL)
                    return
                popped[trial.suggest_int("i", 0, 99)] += 1
                mine.tell(trial, 1.0)
            except Exception as exc:  # a trial told twice: surfaced below
                errors.append(exc)
                return

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and sorted(popped) == list(range(40)) and set(popped.values()) == {1}
