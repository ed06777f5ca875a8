"""The CLI as a user meets it: console script, `python -m`, help, backbones listing and info."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import TINY_BACKBONE, TINY_IMG

from transferkit.cli import main


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
    names = result.output.split()
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
