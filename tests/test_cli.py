"""The CLI as a user meets it: console script, `python -m`, help, backbones listing and info."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import TINY_BACKBONE, TINY_IMG

from transferkit.cli import main
from transferkit.errors import TransferkitError


def test_help_lists_the_commands(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("backbones", "data"):
        assert command in result.output


def test_python_dash_m_works_like_the_console_script():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    by_module = subprocess.run([sys.executable, "-m", "transferkit", "--version"], capture_output=True, text=True, env=env)
    script = os.path.join(os.path.dirname(sys.executable), "transferkit")
    by_script = subprocess.run([script, "--version"], capture_output=True, text=True, env=env)
    assert by_module.returncode == 0 and by_script.returncode == 0
    assert by_module.stdout == by_script.stdout and "transferkit" in by_module.stdout


def test_backbones_lists_matching_names(runner):
    result = runner.invoke(main, ["backbones", "*efficientnet_lite*"])
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines()]  # then, for some, where their weights are
    assert "tf_efficientnet_lite0" in names and all("efficientnet_lite" in n for n in names)
    nothing = runner.invoke(main, ["backbones", "nothing_matches_this*"])
    assert nothing.exit_code == 2  # a user error, like every command's; a crash would be 1
    assert nothing.output.startswith("error: no backbone matches 'nothing_matches_this*'")
    assert len(nothing.output.strip().splitlines()) == 1  # one line, no traceback


def test_backbones_info_with_local_weights(runner, tiny_weights):
    result = runner.invoke(main, ["backbones", "info", TINY_BACKBONE, "--weights", str(tiny_weights), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["feature_dim"] == 256 and info["data_config"]["input_size"] == [3, TINY_IMG, TINY_IMG]
    text = runner.invoke(main, ["backbones", "info", TINY_BACKBONE, "--no-pretrained"])
    assert "feature dim   256" in text.output and "random-init" in text.output


def test_missing_weights_is_a_one_line_error(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_WEIGHTS_DIR", str(tmp_path))
    result = runner.invoke(main, ["backbones", "info", "resnet18"])
    assert result.exit_code == 2
    assert result.output.startswith("error: no pretrained weights for resnet18")
    assert len(result.output.strip().splitlines()) == 1


def test_backbones_marks_local_weights_with_their_parameter_count(runner, tiny_weights, monkeypatch, tmp_path):
    import shutil

    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copy(tiny_weights, folder / "test_efficientnet.safetensors")
    monkeypatch.setenv("TRANSFERKIT_WEIGHTS_DIR", str(folder))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "no-hub-cache"))  # nothing cached from the hub
    listed = runner.invoke(main, ["backbones", "test_efficient*"])
    assert listed.exit_code == 0, listed.output
    line = next(line for line in listed.output.splitlines() if line.split()[0] == TINY_BACKBONE)
    from safetensors import safe_open

    with safe_open(str(tiny_weights), "np") as fh:  # the count from the file's header is the tensors' sizes
        expected = sum(fh.get_tensor(key).size for key in fh.keys())
    assert f"{expected / 1e6:.1f} M params" in line and str(folder / "test_efficientnet.safetensors") in line
    local = runner.invoke(main, ["backbones", "--local"])
    assert [line.split()[0] for line in local.output.splitlines()] == [TINY_BACKBONE]


def test_unknown_backbone_gets_close_matches(runner, tmp_path, tiny_data, monkeypatch):
    """From the stored names, before torch: "did you mean"; the same words come from timm's own list."""
    from transferkit.models import names
    from transferkit.models.backbones import load_backbone

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("TRANSFERKIT_WEIGHTS_DIR", raising=False)
    import timm

    names.store_names(timm)
    assert names.stored_names()["all"] == timm.list_models()
    result = runner.invoke(main, ["finetune", "--backbone", "resnet5", "--data", str(tiny_data), "--no-track"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: unknown backbone 'resnet5'; did you mean resnet50 or resnet51q or resnet50t?"
    with pytest.raises(TransferkitError, match="did you mean resnet50 or"):
        load_backbone("resnet5")
