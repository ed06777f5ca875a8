"""Every training setting on the finetune command line: each config key is a flag, ``key=value`` works too, and
both are checked like a recipe's keys, with the same one-line message."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import TINY_BACKBONE

from transferkit.cli import main
from transferkit.errors import TransferkitError
from transferkit.train.config import TrainConfig, resolve_config


def test_every_config_key_is_a_finetune_flag(runner):
    command = main.commands["finetune"]
    flags = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for spec in dataclasses.fields(TrainConfig):
        flag = "--" + spec.name.replace("_", "-")
        assert flag in flags, flag
        if spec.type == "bool" and spec.name != "pretrained":
            assert f"--no-{spec.name.replace('_', '-')}" in flags
    text = " ".join(runner.invoke(main, ["finetune", "--help"]).output.split())  # as read, not as wrapped
    assert "--val-ratio" in text and "default: 0.2]" in text and "[adamw|sgd]" in text


@pytest.mark.parametrize("args", [["--lr", "fast"], ["lr=fast"], ["--optimizer", "rmsprop"], ["optimizer=rmsprop"],
                                  ["learning_rate=3"], ["--ema-decay", "2"], ["oops"]])
def test_command_line_settings_are_checked_like_recipe_keys(runner, tmp_path, args):
    result = runner.invoke(main, ["finetune", "--backbone", TINY_BACKBONE, "--data", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    key = args[0].lstrip("-").split("=")[0].replace("-", "_")
    if key == "oops":
        assert "key=value" in line
        return
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"{key}: {args[-1].split('=')[-1]}\n")
    with pytest.raises(TransferkitError) as error:
        resolve_config(recipe)
    assert line == f"error: {error.value}".replace(f"recipe {recipe}", "options")  # the same check and message


def test_key_value_and_flags_reach_the_config():
    from transferkit.cli.finetune import resolve_options

    config = resolve_options(None, ("lr=3e-4", "aug=none", "ema=true", "img_size=96"),
                             {"backbone": "b", "data": "d", "epochs": "4", "mixup": None, "val_ratio": "0.3"})
    assert (config.lr, config.aug, config.ema, config.img_size, config.epochs, config.val_ratio) == (
        3e-4, "none", True, 96, 4, 0.3)
