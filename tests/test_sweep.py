"""`transferkit sweep`: two tiny timm models on tiny generated data, trials of one epoch."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_IMG, make_dataset

BACKBONES = ["test_efficientnet", "test_resnet"]
FAST = {"strategy": "linear-probe", "epochs": 1, "batch_size": 4, "workers": 0, "device": "cpu", "amp": False, "aug": "none",
        "early_stopping": 0}


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """Both tiny backbones as local weights (random init, fixed seed) at a 64 px input: an offline weights folder."""
    import timm
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("sweep_weights")
    for name in BACKBONES:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / f"{name}.safetensors"))
        (folder / f"{name}.json").write_text(json.dumps({"data_config": {"input_size": [3, TINY_IMG, TINY_IMG]}}))
    return folder


@pytest.fixture
def env(weights_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFERKIT_WEIGHTS_DIR", str(weights_dir))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "data", classes=("cat", "dog"), splits={"train": 10, "val": 4})


def run_sweep(data, **kwargs):
    from transferkit.sweep import sweep

    options = {"backbones": BACKBONES, "fixed": FAST, "track": False, "out": "sweeps"}
    return sweep(str(data), **{**options, **kwargs})


@pytest.mark.slow
def test_sweep_tracks_parent_and_children_and_ranks_them(env, data):
    from mlflow import MlflowClient

    uri = f"sqlite:///{env / 'mlflow.db'}"
    result = run_sweep(data, track=True, tracking_uri=uri, top_k=2)

    assert sorted(result.ranking["backbone"]) == sorted(BACKBONES) and result.ranking["finetuned"].all()
    board = result.leaderboard
    assert len(board) == 2 and (board["state"] == "COMPLETE").all()
    assert list(board["val_accuracy"]) == sorted(board["val_accuracy"], reverse=True)
    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 2
    by_id = {run.info.run_id: run for run in children}
    for row in board.itertuples():
        child = by_id[row.mlflow_run_id]
        assert child.data.params["backbone"] == row.backbone
        assert child.data.params["epochs"] == "1" and child.data.params["strategy"] == "linear-probe"
    winner = result.winner
    assert winner["val_accuracy"] == max(board["val_accuracy"])
    assert parent.data.tags["winner_run_id"] == winner["mlflow_run_id"]
    assert parent.data.metrics["val_accuracy"] == pytest.approx(winner["val_accuracy"])
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"leaderboard.csv", "leaderboard.md", "ranking.csv", "sweep.png"} <= artifacts
    assert (result.folder / "leaderboard.md").read_text().count("\n| ") == 3
    note = parent.data.tags["mlflow.note.content"]  # the parent run's description: winner, its scores, the top rows
    assert f"winner: trial {winner['trial']}, `{winner['backbone']}`" in note and winner["mlflow_run_id"] in note
    assert "ties by the lower val_loss" in note and "every trial: strategy=linear-probe, epochs=1" in note
    assert note.index(f"#1 trial {winner['trial']} ") < note.index("#2 trial ") and "| `val_loss` |" in note
    assert {run.data.metrics["rank_in_sweep"]: run.info.run_id for run in children} == {
        row.rank: row.mlflow_run_id for row in board.itertuples()}  # MLflow sorts the trials as the leaderboard


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_repeating_finished_trials(env, data, monkeypatch):
    import transferkit.train as train

    storage = f"sqlite:///{env / 'study.db'}"
    real = train.finetune
    seen = []

    def interrupting(config, **kwargs):
        seen.append((config.backbone, config.lr))
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(config, **kwargs)

    monkeypatch.setattr(train, "finetune", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(data, space={"lr": [0.001, 0.01]}, top_k=1, storage=storage, study="s")
    first = list(seen)
    monkeypatch.setattr(train, "finetune", lambda config, **kw: (seen.append((config.backbone, config.lr)),
                                                                 real(config, **kw))[1])
    result = run_sweep(data, space={"lr": [0.001, 0.01]}, top_k=1, storage=storage, study="s")

    rerun = seen[len(first):]
    assert first[0] not in rerun and rerun == [first[1]]  # the finished trial is not repeated; the interrupted is
    board = result.leaderboard
    assert sorted(board["state"]) == ["COMPLETE", "COMPLETE", "FAIL"]
    assert "interrupted" in board.loc[board["state"] == "FAIL", "error"].item()


@pytest.mark.slow
def test_two_workers_share_one_study_without_duplicates(env, data):
    """Two sweeps at once on one sqlite study (threads here; bench/bench_sweep.py runs two processes)."""
    import threading

    import optuna

    storage = f"sqlite:///{env / 'shared.db'}"
    results, errors = [], []

    def worker():
        try:
            results.append(run_sweep(data, space={"lr": [0.001, 0.003, 0.01]}, top_k=1, storage=storage,
                                     study="shared"))
        except BaseException as exc:  # surfaced below; a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and len(results) == 2
    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    configs = [t.params["lr"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(configs) == [0.001, 0.003, 0.01]


@pytest.mark.parametrize("kwargs, message", [
    ({"backbones": ["test_efficientnet", "no_such_net"]}, "unknown backbone 'no_such_net'"),
    ({"space": {"learning_rate": [0.1]}}, "unknown finetune key 'learning_rate'"),
    ({"space": {"lr": []}}, "choices for 'lr' in the sweep space are empty"),
    ({"space": {"lr": {"low": 1e-4, "high": 1e-2}}}, "pass --trials N"),
    ({"space": {"lr": [-1]}}, "bad value for lr"),
    ({"trials": 0}, "bad value for trials: 0; it must be an int >= 1"),
    ({"top_k": 0}, "bad value for top_k: 0; it must be an int >= 1"),
    ({"storage": "nosuchdb://x/y"}, "cannot open study storage"),
    ({"storage": "study.db"}, "not a database URL"),
])
def test_bad_input_is_one_line_before_training(env, data, monkeypatch, kwargs, message):
    import transferkit.sweep.runner
    from transferkit.errors import TransferkitError

    monkeypatch.setattr(transferkit.sweep.runner, "rank_backbones", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(TransferkitError, match=message.replace("(", r"\(")):
        run_sweep(data, **kwargs)


def test_empty_space_in_a_sweep_file(env, data, runner):
    from transferkit.cli import main

    spec = env / "sweep.yaml"
    spec.write_text("backbones: [test_efficientnet]\nspace: {}\n")
    result = runner.invoke(main, ["sweep", "--data", str(data), "--space", str(spec), "--no-track"])
    assert result.exit_code == 2 and "space: in sweep file" in result.output and "empty" in result.output
