"""Training config: defaults < recipe < flags, and every bad key or value named up front."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from transferkit.errors import TransferkitError
from transferkit.train.config import TrainConfig, resolve_config, resume_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_precedence_defaults_recipe_flags(tmp_path):
    recipe = write(tmp_path / "r.yaml", {"epochs": 7, "lr": 0.01, "strategy": "full"})
    config = resolve_config(recipe, {"lr": 0.5, "epochs": None, "batch_size": 4})
    assert config.epochs == 7  # recipe beats the default (10); a flag left unset (None) does not override
    assert config.lr == 0.5  # the flag beats the recipe
    assert config.batch_size == 4  # the flag beats the default
    assert config.strategy == "full"
    assert config.optimizer == TrainConfig().optimizer == "adamw"  # untouched default


def test_numbers_are_coerced_to_the_field_type(tmp_path):
    config = resolve_config(write(tmp_path / "r.yaml", {"lr": "3e-4", "epochs": 2.0, "weight_decay": 0}))
    assert (config.lr, config.epochs, config.weight_decay) == (3e-4, 2, 0.0)
    assert isinstance(config.weight_decay, float)


STRATEGY_HINT = ("it must be one of linear-probe, full, freeze-unfreeze, discriminative, partial:N "
                 "(N = number of last stages to train, >= 1)")


@pytest.mark.parametrize("recipe, message", [
    ({"epochs": 0}, "bad value for epochs: 0; it must be an int >= 1"),
    ({"epochs": 2.5}, "bad value for epochs: 2.5; it must be an int >= 1"),
    ({"lr": "fast"}, "bad value for lr: 'fast'; it must be > 0 or auto"),
    ({"lr": 0}, "bad value for lr: 0.0; it must be > 0 or auto"),
    ({"strategy": "partial:x"}, f"bad value for strategy: 'partial:x'; {STRATEGY_HINT}"),
    ({"strategy": "partial:0"}, f"bad value for strategy: 'partial:0'; {STRATEGY_HINT}"),
    ({"strategy": "everything"}, f"bad value for strategy: 'everything'; {STRATEGY_HINT}"),
    ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'; use one of adamw, sgd"),
    ({"label_smoothing": 1.5}, "bad value for label_smoothing: 1.5; it must be in [0, 1)"),
    ({"img_size": 8}, "bad value for img_size: 8; it must be an int >= 16 or null"),
    ({"amp": "yes"}, "bad value for amp: 'yes'; it must be true or false"),
    ({"strategy": "freeze-unfreeze", "epochs": 2, "freeze_epochs": 2},
     "bad value for freeze_epochs: 2; freeze-unfreeze with 2 head-only epochs needs epochs >= 3 (or freeze_epochs: 0, "
     "the default, where the head is fitted on cached features at no epoch's cost)"),
    ({"balance": "weights", "mixup": 0.2},
     "bad value for balance: 'weights'; class weights do not apply to mixed soft targets; use balance: sampler with "
     "mixup/cutmix"),
])
def test_bad_recipe_values_get_their_exact_message(tmp_path, recipe, message):
    with pytest.raises(TransferkitError) as raised:
        resolve_config(write(tmp_path / "r.yaml", recipe))
    assert str(raised.value) == message


def test_unknown_key_and_unknown_aug_are_named(tmp_path):
    with pytest.raises(TransferkitError, match=r"^unknown key 'learning_rate' in recipe .*; every key is a flag of "):
        resolve_config(write(tmp_path / "r.yaml", {"learning_rate": 0.1}))  # no near-miss: where the keys are
    with pytest.raises(TransferkitError, match="'extreme'"):
        resolve_config(write(tmp_path / "r.yaml", {"aug": "extreme"}))


def test_the_resolved_config_is_frozen():
    import dataclasses

    config = resolve_config(overrides={"lr": "auto"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 0.1
    assert dataclasses.replace(config, lr=0.1).lr == 0.1 and config.lr == "auto"


def test_recipe_must_be_a_mapping(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(TransferkitError, match="mapping"):
        resolve_config(path)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_are_valid(recipe):
    config = resolve_config(recipe)
    assert config.to_dict().keys() == TrainConfig().to_dict().keys()


def test_shipped_recipes_exist():
    assert {"roads-resnet50.yaml", "quick-cpu.yaml", "linear-probe.yaml"} <= {p.name for p in RECIPES}


def test_saved_config_round_trips_and_resume_only_overrides_runtime_keys(tmp_path):
    config = resolve_config(None, {"backbone": "resnet18", "data": "x", "strategy": "partial:2", "grad_clip": 1})
    config.save(tmp_path / "config.yaml")
    assert resolve_config(tmp_path / "config.yaml") == config
    assert resume_config(tmp_path, {"device": "cpu", "workers": 0, "lr": config.lr}).workers == 0
    with pytest.raises(TransferkitError, match="cannot change lr"):
        resume_config(tmp_path, {"lr": 0.5})


def test_cli_rejects_unknown_recipe_key_before_creating_a_run(runner, tmp_path, tiny_data):
    from transferkit.cli import main

    recipe = write(tmp_path / "r.yaml", {"epochz": 3})
    result = runner.invoke(main, ["finetune", "--backbone", "test_efficientnet", "--data", str(tiny_data),
                                  "--recipe", str(recipe), "--out", str(tmp_path / "runs"), "--no-track"])
    assert result.exit_code == 2
    assert "unknown key 'epochz'" in result.output
    assert not (tmp_path / "runs").exists()


def test_cli_flags_beat_the_recipe_and_the_resolved_config_is_saved(runner, tmp_path, tiny_data, tiny_weights):
    from transferkit.cli import main

    recipe = write(tmp_path / "r.yaml", {"strategy": "linear-probe", "aug": "none", "epochs": 2, "lr": 0.2,
                                         "batch_size": 8, "label_smoothing": 0.0})
    result = runner.invoke(main, ["finetune", "--backbone", "test_efficientnet", "--weights", str(tiny_weights),
                                  "--data", str(tiny_data), "--recipe", str(recipe), "--lr", "0.03", "--workers", "0",
                                  "--out", str(tmp_path / "runs"), "--name", "p", "--no-track"])
    assert result.exit_code == 0, result.output
    saved = resolve_config(tmp_path / "runs" / "p" / "config.yaml")
    assert (saved.lr, saved.epochs, saved.strategy, saved.label_smoothing) == (0.03, 2, "linear-probe", 0.0)
    assert saved.optimizer == "adamw" and saved.track is False  # default kept; --no-track applied
