"""Training strategies: parsed once into name and stages, the epoch budget each needs, and the linear probe's
fast path (features extracted once) unless augmentation asks for the backbone every epoch."""

from __future__ import annotations

import pytest
from conftest import run_cli

from transferkit.errors import TransferkitError
from transferkit.train.config import parse_strategy, resolve_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_strategy_is_parsed_once_into_name_and_stages():
    assert parse_strategy("partial:2") == parse_strategy("partial:2") and parse_strategy("partial:2").stages == 2
    assert parse_strategy("full").name == "full" and str(parse_strategy("partial:3")) == "partial:3"
    with pytest.raises(TransferkitError, match="bad value for strategy"):
        parse_strategy("partial:0")


def test_freeze_unfreeze_says_what_head_only_epochs_need():
    with pytest.raises(TransferkitError, match="needs epochs >= 3"):
        resolve_config(None, {"strategy": "freeze-unfreeze", "freeze_epochs": 2, "epochs": 1})
    assert resolve_config(None, {"epochs": 1}).epochs == 1  # the default strategy takes the smallest budget


def test_linear_probe_without_aug_takes_the_feature_cache():
    assert resolve_config(None, {"strategy": "linear-probe"}).uses_feature_cache
    assert resolve_config(None, {}).aug == "light"
    explicit = resolve_config(None, {"strategy": "linear-probe", "aug": "light"})
    assert explicit.aug == "light" and not explicit.uses_feature_cache


def test_explicit_aug_on_a_linear_probe_is_said_once(runner, tiny_data, tiny_weights, tmp_path):
    result = run_cli(runner, tiny_data, tiny_weights, tmp_path, "--strategy", "linear-probe", "--epochs", "2",
                     "--aug", "light", "--no-calibrate")
    assert result.exit_code == 0, result.output
    assert result.output.count("the frozen backbone runs every epoch") == 1
    fast = run_cli(runner, tiny_data, tiny_weights, tmp_path, "--strategy", "linear-probe", "--epochs", "2",
                   "--no-calibrate")
    assert fast.exit_code == 0 and "features extracted once" in fast.output
    assert "runs every epoch" not in fast.output
