"""First contact with `finetune`: the header and footer of a run, epoch 0 in its table and chart, the data check
shown and leakage refused, layout errors and typos answered in words, before torch is imported."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys

import pytest
from conftest import make_dataset, read_metrics, run_cli

from transferkit.cli import main
from transferkit.cli.finetune import ADVANCED, HELP_GROUPS
from transferkit.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_header_names_the_weights_source_and_the_run_and_footer_says_what_next(runner, tiny_data, tiny_weights,
                                                                             tmp_path):
    from transferkit.core.fileio import sha256_file

    result = run_cli(runner, tiny_data, tiny_weights, tmp_path / "runs", "--epochs", "1", "--name", "r")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "r"
    header = result.stderr
    assert f"weights: file {tiny_weights} (sha256 {sha256_file(tiny_weights)[:12]}…" in header
    assert "(split-folders, 2 classes): train 16 (cat 8, dog 8) · val 8 (cat 4, dog 4)" in header
    assert "val: its own folder" in header
    assert "strategy  freeze-unfreeze: LP-FT" in header and f"run       {run_dir}" in header
    assert "tracking  off (--no-track)" in header
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("1 epoch in ") and lines[0].endswith(f"saved to {run_dir}")
    assert lines[1] == "next:" and lines[2].startswith(f"  transferkit evaluate --model {run_dir} --data ")
    assert lines[3].startswith(f"  transferkit predict --model {run_dir} ")


@pytest.mark.slow  # a tracked run: the MLflow model logging alone takes seconds
def test_lp_ft_probe_is_epoch_0_of_metrics_csv_and_of_the_mlflow_series(runner, tiny_data, tiny_weights, tmp_path):
    """The kept model is in the table and the series even when it is the probe; a tracked run's header and
    footer say where it is in MLflow."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli(runner, tiny_data, tiny_weights, tmp_path / "runs", "--epochs", "1", "--name", "t", "--track",
                     "--tracking-uri", uri, "--experiment", "tiny")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "t"
    rows = read_metrics(run_dir)
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert rows[0]["train_loss"] == "" and float(rows[0]["val_loss"]) > 0  # the probe has val scores only
    summary = json.loads((run_dir / "result.json").read_text())
    assert summary["epochs_run"] == 1  # the probe costs no epoch
    best = rows[summary["best_epoch"]]
    assert float(best["val_loss"]) == pytest.approx(summary["val_loss"])
    run_id = summary["mlflow_run_id"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert [m.step for m in client.get_metric_history(run_id, "epoch/val_loss")] == [0, 1]
    experiment = client.get_experiment_by_name("tiny").experiment_id
    assert f"tracking  MLflow run {run_id} in experiment 'tiny' ({uri})" in result.stderr
    assert f"  transferkit ui   then http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}" in result.stdout


def test_header_on_a_gpu_names_it_with_amp_and_channels_last(monkeypatch):
    import torch

    from transferkit.core import runtime
    from transferkit.train import console

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake GPU 80GB")
    monkeypatch.setattr(runtime, "amp_dtype", lambda device: torch.bfloat16)
    cuda = torch.device("cuda", 0)
    assert console._device(cuda, True) == "device cuda:0 (Fake GPU 80GB), AMP bfloat16, channels_last"
    assert console._device(cuda, False) == "device cuda:0 (Fake GPU 80GB), AMP off (fp32), channels_last"


def test_curves_draw_epoch_0_and_mark_the_kept_epoch(tmp_path):
    from transferkit.reports import plots

    captured = {}
    real_save = plots.save_figure

    def keep_figure(fig, out):
        captured["fig"] = fig
        return real_save(fig, out)

    rows = [{"epoch": 0, "val_loss": 0.1, "val_accuracy": 1.0},
            {"epoch": 1, "train_loss": 0.5, "val_loss": 1.4, "val_accuracy": 0.5, "lr": 1e-3}]
    plots.save_figure = keep_figure
    try:
        plots.training_curves_png(rows, tmp_path / "curves.png", best_epoch=0, title="tiny · freeze-unfreeze")
    finally:
        plots.save_figure = real_save
    loss = captured["fig"].axes[0]
    val_loss = next(line for line in loss.lines if line.get_label() == "val_loss")
    assert list(val_loss.get_xdata()) == [0, 1]
    kept = next(line for line in loss.lines if line.get_label() == "kept: epoch 0")
    assert list(kept.get_xdata()) == [0, 0]
    assert all(float(t).is_integer() for t in loss.get_xticks())


def _leaky_data(root):
    data = make_dataset(root, classes=("cat", "dog"), splits={"train": 6, "val": 3})
    leaked = sorted((data / "train" / "cat").iterdir())[0]
    shutil.copy(leaked, data / "val" / "cat" / "copy.png")
    return data


def test_leakage_between_train_and_val_stops_the_run_unless_allowed(runner, tiny_weights, tmp_path):
    data = _leaky_data(tmp_path / "data")
    refused = run_cli(runner, data, tiny_weights, tmp_path / "runs", "--epochs", "1", "--name", "r")
    assert refused.exit_code == 2
    assert "data check: ERROR 1 images appear in more than one split" in refused.stderr
    last = refused.output.strip().splitlines()[-1]
    assert last.startswith("error: 1 image is in train and also in val/test (e.g. train/train/cat/")
    assert "= val/val/cat/copy.png" in last and last.endswith("or pass --allow-leakage to train anyway")
    assert not (tmp_path / "runs" / "r").exists()


@pytest.mark.slow
def test_allow_leakage_trains_and_says_so(runner, tiny_weights, tmp_path):
    data = _leaky_data(tmp_path / "data")
    allowed = run_cli(runner, data, tiny_weights, tmp_path / "runs", "--epochs", "1", "--name", "r", "--allow-leakage")
    assert allowed.exit_code == 0, allowed.output
    assert "(--allow-leakage): val scores are inflated" in allowed.stderr
    check = json.loads((tmp_path / "runs" / "r" / "data_check.json").read_text())
    assert any(group["kind"] == "cross-split" for group in check["duplicates"])


def _finetune_in_subprocess(*args):
    """`transferkit finetune ARGS` in a fresh interpreter: its one error line and whether torch got imported."""
    code = ("import sys\nfrom transferkit.cli import main\n"
            "try:\n    main(sys.argv[1:], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')\n")
    done = subprocess.run([sys.executable, "-c", code, "finetune", *args], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "RANK": "0"})
    return done.stderr.strip().splitlines(), done.stdout.strip().splitlines()[-1]


def test_layout_mistakes_say_what_the_layout_must_be_before_torch_loads(tmp_path, tiny_data):
    image = sorted((tiny_data / "train" / "cat").iterdir())[0]
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted((tiny_data / "train" / "cat").iterdir())[:5]:
        shutil.copy(path, flat / path.name)
    errors, torch_state = _finetune_in_subprocess("--backbone", "test_efficientnet", "--data", str(image))
    assert errors[-1].startswith(f"error: --data {image} is a single image; it must be a folder of class folders")
    assert torch_state == "no torch"
    errors, torch_state = _finetune_in_subprocess("--backbone", "test_efficientnet", "--data", str(flat))
    assert errors[-1].startswith(f"error: {flat} holds 5 images but no class folders; --data must be a folder of ")
    assert f"(e.g. {flat}/<class>/" in errors[-1] and torch_state == "no torch"
    errors, torch_state = _finetune_in_subprocess("--backbone", "test_efficientnet", "--data", str(tiny_data),
                                                  "epoch=2")
    assert errors[-1] == "error: unknown key 'epoch' in options; did you mean epochs?" and torch_state == "no torch"


def test_help_is_grouped_with_the_essentials_first_and_every_key_once(runner):
    text = runner.invoke(main, ["finetune", "--help"]).output
    titles = [*HELP_GROUPS, ADVANCED]
    positions = [text.index(f"\n{title}:\n") for title in titles]
    assert positions == sorted(positions)  # Data, Model, Training, Augmentation, Output and tracking, Advanced
    data_section = text[positions[0]:positions[1]]
    assert data_section.split("\n")[2].lstrip().startswith("--data ")
    assert text[positions[1]:].split("\n")[2].lstrip().startswith("--backbone ")
    listed = re.findall(r"^  (--[a-z-]+)", text[:text.index("Examples:")], re.MULTILINE)
    assert sorted(listed) == sorted({*listed}) and {"--" + spec.name.replace("_", "-")
                                                    for spec in dataclasses.fields(TrainConfig)} <= {*listed}
    assert "Examples:" in text and "show_default" not in text
    assert "[default: 10]" in text and "(default" not in text  # defaults are written one way


def test_the_whole_run_eta_is_the_mean_epoch_time_times_the_epochs_left(capsys):
    from transferkit.tasks import get_task
    from transferkit.train.console import Console, duration

    console = Console(True, 5, get_task())
    assert console.eta(0) == ""  # nothing measured yet: no guess
    console.epoch_seconds = [10.0, 20.0]
    assert console.eta(2) == "45.0 s" and console.eta(5) == "0.0 s"
    console.epoch_seconds = [100.0]
    row = {"epoch": 1, "train_loss": 0.5, "train_accuracy": 0.5, "val_loss": 0.4, "val_accuracy": 0.6,
           "val_macro_f1": 0.6, "lr": 1e-3, "epoch_seconds": 90.0, "images_per_s": 3.0}
    console.bar(0, 10)  # the epoch starts (no bar on a pipe)
    console.epoch(row, improved=True)
    line = capsys.readouterr().err.strip()
    assert line.startswith("epoch 1/5  ") and line.endswith("*best  ETA " + console.eta(1))
    assert [duration(s) for s in (3, 252, 3900)] == ["3.0 s", "4 m 12 s", "1 h 05 m"]
