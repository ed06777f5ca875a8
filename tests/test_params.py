"""Constraints declared once (transferkit.params): the config, the CLI flags and the API refuse a value alike."""

from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

from transferkit import params
from transferkit.cli import main
from transferkit.errors import TransferkitError
from transferkit.train import config as train_config

LR = train_config.CONSTRAINTS["lr"]


def refusal(constraint: params.Constraint, value, key: str = "key") -> str:
    with pytest.raises(TransferkitError) as raised:
        constraint.check(key, value)
    return str(raised.value)


def click_refusal(constraint: params.Constraint, text: str, key: str = "key") -> str:
    with pytest.raises(TransferkitError) as raised:
        constraint.click_type().convert(text, click.Option([f"--{key}"], key), None)
    return str(raised.value)


@pytest.mark.parametrize("constraint, value, message", [
    (params.BATCH_SIZE, 0, "bad value for key: 0; it must be an int >= 1"),
    (params.BATCH_SIZE, 2.5, "bad value for key: 2.5; it must be an int >= 1"),
    (params.VAL_RATIO, 1, "bad value for key: 1.0; it must be in [0, 1)"),
    (params.SIMILARITY_THRESHOLD, 0, "bad value for key: 0.0; it must be in (0, 1]"),
    (params.PREVIEW_SAMPLES, 300, "bad value for key: 300; it must be an int in [1, 256]"),
    (LR, -1, "bad value for key: -1.0; it must be > 0 or auto"),
    (LR, float("nan"), "bad value for key: nan; it must be a finite number"),
    (params.POOL, "mean", "unknown key 'mean'; use one of avg, max, avgmax, token"),
    (params.RESIZE_MODE, "stretch", "unknown key 'stretch'; use one of crop, squash, letterbox"),
    (params.Boolean(), "yes", "bad value for key: 'yes'; it must be true or false"),
])
def test_each_refusal_is_one_line(constraint, value, message):
    assert refusal(constraint, value) == message


@pytest.mark.parametrize("constraint, text, message", [
    (params.BATCH_SIZE, "0", "bad value for key: 0; it must be an int >= 1"),
    (params.BATCH_SIZE, "many", "bad value for key: 'many'; it must be an int >= 1"),
    (LR, "nan", "bad value for key: 'nan'; it must be a finite number"),
    (params.POOL, "mean", "unknown key 'mean'; use one of avg, max, avgmax, token"),
])
def test_the_click_type_refuses_with_the_same_message(constraint, text, message):
    assert click_refusal(constraint, text) == message


def test_coercion_of_text_and_literals():
    assert params.BATCH_SIZE.check("k", "4") == 4 and params.BATCH_SIZE.check("k", 2.0) == 2
    assert LR.check("k", "3e-4") == 3e-4 and LR.check("k", "auto") == "auto"
    assert params.RESIZE_MODE.check("k", None) is None  # the backbone's own
    assert params.WORKERS.allowing(None).allowing(None).description == "an int >= 0 or null"
    assert params.POOL.click_type().convert("max", None, None) == "max"


def test_the_click_types_name_themselves():
    assert isinstance(params.POOL.click_type(), click.Choice)
    assert params.BATCH_SIZE.click_type().get_metavar(None) == "INT"
    assert LR.click_type().get_metavar(None) == "FLOAT|auto"


def test_every_config_field_has_a_constraint_and_numbers_declare_theirs():
    for spec in dataclasses.fields(train_config.TrainConfig):
        assert isinstance(train_config.CONSTRAINTS[spec.name], params.Constraint), spec.name
        if train_config.value_type(spec.name) in (int, float):
            assert spec.metadata["constraint"] is not None, f"{spec.name} is a number without a declared range"
        assert train_config.CONSTRAINTS[spec.name].check(spec.name, spec.default) == spec.default


def test_a_range_bounded_flag_refuses_a_bad_value_with_exit_code_2():
    result = CliRunner().invoke(main, ["finetune", "--backbone", "b", "--data", "d", "--label-smoothing", "1"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: bad value for label_smoothing: 1.0; it must be in [0, 1)"


@pytest.mark.parametrize("command", [
    ["finetune", "--backbone", "b", "--data", "d"],
    ["finetune", "--backbone", "b", "--data", "d", "batch_size=0"],
    ["extract", "--backbone", "b", "--data", "d", "--out", "f.parquet"],
    ["predict", "--model", "m", "x.png"],
    ["evaluate", "--model", "m", "--data", "."],
    ["data", "audit", ".", "--backbone", "b"],
], ids=lambda command: " ".join(command[:2]))
def test_batch_size_0_gets_the_same_message_everywhere(command):
    if "batch_size=0" not in command:
        command = [*command, "--batch-size", "0"]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 2
    assert result.output.strip() == "error: bad value for batch_size: 0; it must be an int >= 1"


def test_the_api_refuses_batch_size_0_alike():
    from transferkit.features.extract import extract_features

    with pytest.raises(TransferkitError, match="^bad value for batch_size: 0; it must be an int >= 1$"):
        extract_features("b", "d", "f.parquet", batch_size=0)
