"""Allowed values live in transferkit.choices only: the CLI's choices and the config's validation read them."""

from __future__ import annotations

import click
import pytest

from transferkit import choices, params
from transferkit.cli import main
from transferkit.errors import TransferkitError
from transferkit.train.config import resolve_config

CHOICE_TUPLES = {name: value for name, value in vars(choices).items() if name.isupper() and isinstance(value, tuple)}


def _choice_params(command: click.Command, path: str = ""):
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _choice_params(sub, f"{path} {name}".strip())
        return
    for param in command.params:
        if isinstance(param.type, click.Choice):
            yield f"{path} {param.opts[0]}", tuple(param.type.choices)


def test_every_cli_choice_is_a_tuple_of_choices_py():
    params = dict(_choice_params(main))
    assert len(params) >= 12  # finetune, extract/svm, evaluate/predict, export, explain, augment
    strays = {flag: values for flag, values in params.items() if values not in CHOICE_TUPLES.values()}
    assert not strays, f"click.Choice not read from transferkit.choices: {strays}"


@pytest.mark.parametrize("key, allowed", [("optimizer", choices.OPTIMIZERS), ("scheduler", choices.SCHEDULERS),
                                          ("balance", choices.BALANCE), ("monitor", choices.MONITORS),
                                          ("cache", choices.CACHE_MODES), ("resize_mode", choices.RESIZE_MODES)])
def test_config_validation_names_the_same_values(key, allowed):
    with pytest.raises(TransferkitError, match=f"^unknown {key} 'nope'; use one of {', '.join(allowed)}$"):
        resolve_config(overrides={key: "nope"})
    for value in allowed:
        overrides = {key: value, **({"mixup": 0.0} if key == "balance" else {})}
        assert getattr(resolve_config(overrides=overrides), key) == value


def test_strategies_accept_partial_n_only_with_a_positive_count():
    assert resolve_config(overrides={"strategy": "partial:2"}).strategy == "partial:2"
    for bad in ("partial:0", "partial:N", "partial", "full:1", "head-only"):
        with pytest.raises(TransferkitError, match="bad value for strategy"):
            resolve_config(overrides={"strategy": bad})


def test_an_unknown_choice_is_one_line():
    with pytest.raises(TransferkitError, match=r"^unknown pool 'mean'; use one of avg, max, avgmax, token$"):
        params.POOL.check("pool", "mean")
