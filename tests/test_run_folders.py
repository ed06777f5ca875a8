"""What runs leave on disk: file modes, a start killed or still running under the same name, a run whose loss turns
NaN in its first epoch (and the loss guard leaving healthy training alone), SVM model folders, names that stay
inside --out, and resume refusing data edited in place."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_BACKBONE, make_dataset

from transferkit.cli import main
from transferkit.errors import TransferkitError


def test_checkpoints_get_the_usual_file_mode(tmp_path, tiny_weights):
    from transferkit.models.backbones import load_backbone
    from transferkit.models.saved_model import checkpoint_metadata, save_checkpoint

    model, preprocessing = load_backbone(TINY_BACKBONE, weights=tiny_weights, num_classes=2)
    path = save_checkpoint(tmp_path / "best", model, checkpoint_metadata(
        model, kind="classifier", class_names=["a", "b"], preprocessing=preprocessing))
    expected = 0o666 & ~_umask()
    assert path.stat().st_mode & 0o777 == expected and path.with_suffix(".json").stat().st_mode & 0o777 == expected


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _finetune(tiny_data, tiny_weights, out, *extra):
    return ["finetune", "--backbone", TINY_BACKBONE, "--weights", str(tiny_weights), "--data", str(tiny_data),
            "--out", str(out), "--name", "r", "--epochs", "1", "--batch-size", "4", "--workers", "0",
            "--img-size", "32", "--strategy", "linear-probe", "--aug", "none", "--no-track", *extra]


def test_a_start_killed_before_its_first_epoch_is_replaced_by_the_same_command(tiny_data, tiny_weights, tmp_path,
                                                                                runner):
    from transferkit.train.run_folder import OWNER_FILE

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("backbone: x\n")
    (run / "split.csv").write_text("path,label,split\n")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / OWNER_FILE).write_text(str(dead.pid))  # the start that wrote these was kill -9'd
    result = runner.invoke(main, _finetune(tiny_data, tiny_weights, tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    assert (run / "result.json").is_file() and not (run / OWNER_FILE).exists()


def test_a_same_name_start_still_running_is_not_replaced(tiny_data, tiny_weights, tmp_path, runner):
    from transferkit.train.run_folder import OWNER_FILE

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("backbone: x\n")
    (run / OWNER_FILE).write_text(str(os.getpid()))  # alive: another start of the same name, mid first epoch
    result = runner.invoke(main, _finetune(tiny_data, tiny_weights, tmp_path / "runs"))
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert (run / "config.yaml").read_text() == "backbone: x\n"


def test_nan_in_the_first_epoch_leaves_no_folder(tiny_data, tiny_weights, tmp_path, runner, monkeypatch):
    import torch

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", lambda self, logits, target: logits.sum() * np.nan)
    result = runner.invoke(main, _finetune(tiny_data, tiny_weights, tmp_path / "runs", "--strategy", "full",
                                           "--aug", "light"))
    assert result.exit_code == 1 and "loss became nan at epoch 1" in result.stderr
    assert not (tmp_path / "runs" / "r").exists()


def test_the_loss_guard_leaves_training_intact(tiny_data, tiny_weights, tmp_path, runner):
    """The finiteness check sits in the training step: the step must still update the weights."""
    from safetensors.torch import load_file

    result = runner.invoke(main, _finetune(tiny_data, tiny_weights, tmp_path / "runs", "--strategy", "full"))
    assert result.exit_code == 0, result.output
    before, after = load_file(str(tiny_weights)), load_file(str(tmp_path / "runs" / "r" / "last.safetensors"))
    assert not np.allclose(before["conv_stem.weight"].numpy(), after["conv_stem.weight"].numpy())


def test_svm_default_folders_differ_per_dataset_and_never_replace(tmp_path, tiny_weights, runner, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folders = []
    for name in ("roads", "signs", "signs"):
        data = make_dataset(tmp_path / name, per_class=4)
        result = runner.invoke(main, ["svm", "--backbone", TINY_BACKBONE, "--weights", str(tiny_weights),
                                      "--data", str(data), "--no-track", "--workers", "0", "--cv", "2"])
        assert result.exit_code == 0, result.output
        folders.append(result.stdout.strip().splitlines()[-1].removeprefix("model -> "))
    assert folders == [f"runs/svm-{TINY_BACKBONE}-logistic-roads", f"runs/svm-{TINY_BACKBONE}-logistic-signs",
                       f"runs/svm-{TINY_BACKBONE}-logistic-signs-2"]


def test_a_failed_svm_save_leaves_no_model_folder(tmp_path, tiny_data, tiny_weights, runner, monkeypatch):
    from transferkit.features import classical_heads

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(classical_heads, "save_checkpoint", crash)  # after head.skops, before the backbone
    out = tmp_path / "svm"
    with pytest.raises(RuntimeError, match="disk full"):
        runner.invoke(main, ["svm", "--backbone", TINY_BACKBONE, "--weights", str(tiny_weights), "--data",
                             str(tiny_data), "--out", str(out), "--no-track", "--workers", "0", "--cv", "2"],
                      catch_exceptions=False)
    assert not out.exists() and not list(tmp_path.glob(".svm.*"))


def test_run_names_stay_inside_out():
    from transferkit.train.config import resolve_config

    for name in ("a/b", "../x", "/abs", "..", "", "a\\b"):
        with pytest.raises(TransferkitError, match="bad value for name"):
            resolve_config(overrides={"name": name})
    assert resolve_config(overrides={"name": "ok-name.2"}).name == "ok-name.2"


def test_resume_refuses_content_changes_by_name(tmp_path, tiny_data, tiny_weights, runner):
    result = runner.invoke(main, _finetune(tiny_data, tiny_weights, tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "r"
    (run / "result.json").unlink()
    image = tiny_data / "val" / "dog" / "dog_1.png"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # edited in place
    result = runner.invoke(main, ["finetune", "--resume", str(run)])
    assert result.exit_code == 2 and "files edited in place" in result.stderr
    assert runner.invoke(main, ["finetune", "--resume", str(run), "--allow-data-change"]).exit_code == 0
    assert Path(run / "result.json").is_file()
