"""Defaults that do the right thing: any epoch budget, the linear-probe fast path, every setting on the
command line, and LP-FT's head phase on cached features."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from test_finetune import BACKBONE, config_for, one_torch_thread, run_cli  # noqa: F401  (autouse fixture)

from transferkit.cli import main
from transferkit.errors import TransferkitError
from transferkit.train import finetune
from transferkit.train.config import TrainConfig, parse_strategy, resolve_config


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


def test_every_config_key_is_a_finetune_flag(runner):
    command = main.commands["finetune"]
    flags = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for spec in dataclasses.fields(TrainConfig):
        flag = "--" + spec.name.replace("_", "-")
        assert flag in flags, flag
        if spec.type == "bool" and spec.name != "pretrained":
            assert f"--no-{spec.name.replace('_', '-')}" in flags
    text = runner.invoke(main, ["finetune", "--help"]).output
    assert "--val-ratio" in text and "[default: 0.2]" in text and "[adamw|sgd]" in text


@pytest.mark.parametrize("args", [["--lr", "fast"], ["lr=fast"], ["--optimizer", "rmsprop"], ["optimizer=rmsprop"],
                                  ["learning_rate=3"], ["--ema-decay", "2"], ["oops"]])
def test_command_line_settings_are_checked_like_recipe_keys(runner, tmp_path, args):
    result = runner.invoke(main, ["finetune", "--backbone", BACKBONE, "--data", str(tmp_path), *args])
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


def test_lp_ft_fits_the_head_on_features_from_one_backbone_pass(tiny_data, tiny_weights, tmp_path, monkeypatch):
    import transferkit.features.extract as extract
    import transferkit.train.head_phase as head_phase

    batches, fits = [], []
    embed, fit = extract.embed, head_phase.fit_head_on_features
    monkeypatch.setattr(extract, "embed", lambda *a, **k: batches.append(len(a[1])) or embed(*a, **k))
    monkeypatch.setattr(head_phase, "fit_head_on_features", lambda *a, **k: fits.append(fit(*a, **k)) or fits[-1])
    result = finetune(config_for(tiny_data, tiny_weights, tmp_path, epochs=1), progress=False)
    assert sum(batches) == 16 + 8  # every train and val image through the backbone exactly once
    assert fits[0].epochs > 1 and fits[0].val_accuracy > 0  # many head epochs on those vectors
    assert [r["epoch"] for r in result.history] == [1]  # costing none of the epoch budget
    # calibration (on by default) lands in the best checkpoint, the run's result and the predictor
    from transferkit.models.predictors import load_predictor

    best = json.loads((result.run_dir / "best.json").read_text())
    summary = json.loads((result.run_dir / "result.json").read_text())["calibration"]
    assert best["temperature"] == summary["temperature"] == load_predictor(result.run_dir).temperature
    perfect = result.best["val_accuracy"] == 1.0  # no val error: nothing to fit, T stays 1
    assert summary["temperature_fitted"] == (not perfect) and (summary["temperature"] == 1.0) == perfect
    assert summary["val_nll_calibrated"] <= summary["val_nll_uncalibrated"]
    assert {"val_ece_uncalibrated", "val_ece_calibrated"} <= set(summary)


def test_lp_ft_model_is_kept_when_unfreezing_does_worse(tiny_data, tiny_weights, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from transferkit.train import engine

    evaluate = engine._Run._evaluate
    monkeypatch.setattr(engine._Run, "_evaluate",  # as if every full epoch lost what the linear probe had
                        lambda run, module=None: {**evaluate(run, module), "val_loss": 50.0})
    result = finetune(config_for(tiny_data, tiny_weights, tmp_path, epochs=2, early_stopping=0), progress=False)
    assert result.best_epoch == 0 and len(result.history) == 2 and result.best["val_loss"] < 50
    saved = json.loads((result.run_dir / "result.json").read_text())
    assert saved["best_epoch"] == 0 and json.loads((result.run_dir / "best.json").read_text())["epoch"] == 0
    best, last = (load_file(str(result.run_dir / f"{stem}.safetensors")) for stem in ("best", "last"))
    pretrained = load_file(str(tiny_weights))
    assert torch.equal(best["conv_stem.weight"], pretrained["conv_stem.weight"])  # the untouched body...
    assert not torch.equal(last["conv_stem.weight"], pretrained["conv_stem.weight"])  # ...that training moved


def test_temperature_scaling_lowers_nll_of_an_over_confident_model():
    from transferkit.train.calibration import calibrate

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (400,), generator=generator)
    logits = torch.randn(400, 5, generator=generator)
    logits[torch.arange(400), labels] += 1.5  # right ~60 % of the time...
    fit = calibrate(logits * 8, labels)  # ...but ~100 % sure
    assert fit.temperature > 2 and fit.nll_after < fit.nll_before / 2 and fit.ece_after < fit.ece_before
    right = calibrate(torch.eye(5).repeat(4, 1) * 3, torch.arange(5).repeat(4))  # no val error: no finite optimum
    assert not right.fitted and right.temperature == 1.0 and right.nll_after == right.nll_before
    assert "every val image is classified right" in right.summary() and right.metrics()["temperature_fitted"] == 0.0


def test_predict_applies_the_stored_temperature(tiny_classifier, tiny_data):
    from transferkit.models.predictors import load_predictor

    images = [str(p) for p in sorted((tiny_data / "val").rglob("*.png"))]
    predictor = load_predictor(tiny_classifier)
    plain = predictor.predict_proba(images)
    predictor.metadata["temperature"] = 4.0  # as a calibrated checkpoint's metadata holds it
    scaled = predictor.predict_proba(images)
    expected = torch.from_numpy(np.log(plain) / 4.0).softmax(1).numpy()
    assert np.allclose(scaled, expected, atol=1e-5) and (scaled.argmax(1) == plain.argmax(1)).all()
    assert scaled.max() < plain.max()


def test_ema_weights_differ_from_raw_and_are_saved_when_better(tiny_data, tiny_weights, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from transferkit.train import engine

    evaluate = engine._Run._evaluate

    def averaged_scores_better(run, module=None):  # as if the average generalised better: its val loss halves
        scores = evaluate(run, module)
        return {**scores, "val_loss": scores["val_loss"] / 2} if module is not None else scores

    monkeypatch.setattr(engine._Run, "_evaluate", averaged_scores_better)
    config = config_for(tiny_data, tiny_weights, tmp_path, strategy="linear-probe", epochs=2, ema=True,
                        calibrate=False, lr=0.05)
    result = finetune(config, progress=False)
    assert [row["val_weights_ema"] for row in result.history] == [1.0, 1.0]
    assert json.loads((result.run_dir / "best.json").read_text())["weights"] == "ema"
    best, raw = (load_file(str(result.run_dir / f"{stem}.safetensors")) for stem in ("best", "last"))
    assert not torch.equal(best["classifier.weight"], raw["classifier.weight"])  # the average, not the raw head
    assert torch.equal(best["conv_stem.weight"], raw["conv_stem.weight"])  # around the same frozen body


def test_lr_find_suggests_a_finite_lr_and_lr_auto_stores_it(runner, tiny_data, tiny_weights, tmp_path):
    import math

    plot = tmp_path / "lr.png"
    result = runner.invoke(main, ["lr-find", "--backbone", BACKBONE, "--weights", str(tiny_weights), "--data",
                                  str(tiny_data), "--workers", "0", "--batch-size", "8", "--img-size", "32",
                                  "--strategy", "full", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    suggested = float(result.output.strip().splitlines()[-1].split()[2])
    assert math.isfinite(suggested) and 1e-7 <= suggested <= 10 and plot.stat().st_size > 0
    run = finetune(config_for(tiny_data, tiny_weights, tmp_path, strategy="full", lr="auto", calibrate=False),
                   progress=False)
    saved = resolve_config(run.run_dir / "config.yaml").lr
    assert isinstance(saved, float) and math.isfinite(saved) and (run.run_dir / "lr_find.png").is_file()
    assert run.history[0]["lr"] == pytest.approx(saved)


def _separable_table(n_per_class=20, classes=3, dim=8):
    from transferkit.features.extract import FeatureTable

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), n_per_class)
    vectors = (rng.normal(size=(len(labels), dim)) + labels[:, None] * 0.8).astype(np.float32)
    return FeatureTable(np.array([f"{i}.png" for i in range(len(labels))]), labels.astype(str), labels,
                        np.array(["train"] * len(labels)), vectors), {"class_names": [str(c) for c in range(classes)]}


def test_svm_search_runs_folds_in_parallel_fits_each_point_once_and_shows_a_bar(monkeypatch, capsys):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    from transferkit.features.classical_heads import fit_head

    fits = []
    original = LogisticRegression.fit
    monkeypatch.setattr(LogisticRegression, "fit", lambda self, *a, **k: fits.append(self.C) or original(self, *a, **k))
    features = _separable_table()
    serial = fit_head(features, "logistic", cv=3, n_jobs=1, progress=False)
    assert len(fits) == 4 * 3 + 1  # every grid point once per fold, then one fit on all train rows
    parallel = fit_head(features, "logistic", cv=3, n_jobs=2, progress=True)
    assert "grid search" in capsys.readouterr().err  # the bar, when asked for (by default: on a terminal)
    assert parallel.best_params == serial.best_params and parallel.cv_accuracy == serial.cv_accuracy
    table = features[0]  # the same choice as scikit-learn's own search on the standardised vectors
    search = GridSearchCV(LogisticRegression(max_iter=5000), {"C": [0.01, 0.1, 1.0, 10.0]},
                          cv=StratifiedKFold(3, shuffle=True, random_state=0))
    search.fit(StandardScaler().fit_transform(table.vectors), table.label_index)
    assert serial.best_params == search.best_params_
    assert serial.cv_accuracy == pytest.approx(search.best_score_, abs=0.02)  # warm starts: same optimum, tol apart


def test_svm_search_fits_stop_early_the_final_fit_does_not_and_ties_go_to_the_smallest_c(monkeypatch):
    from sklearn.svm import LinearSVC

    from transferkit.features.classical_heads import SEARCH_TOL, fit_head

    fits = []
    original = LinearSVC.fit
    monkeypatch.setattr(LinearSVC, "fit", lambda self, *a, **k: fits.append((self.C, self.tol)) or original(self, *a, **k))
    features = _separable_table(classes=2)
    features[0].vectors[:, 0] += features[0].label_index * 100.0  # every C separates the classes: an exact tie
    result = fit_head(features, "linear-svm", cv=3, grid={"C": [10, 0.1, 1]}, n_jobs=1, progress=False)
    assert result.best_params == {"C": 0.1} and result.cv_accuracy == 1.0
    search, final = fits[:9], fits[9:]  # 3 folds x 3 values; then Platt scaling's folds and the fit on all rows
    assert {tol for _, tol in search} == {SEARCH_TOL}
    assert final and {c for c, _ in final} == {0.1} and {tol for _, tol in final} == {LinearSVC().tol}
    fits.clear()
    fit_head(features, "linear-svm", cv=3, grid={"C": [1], "tol": [0.1]}, n_jobs=1, progress=False)
    assert {tol for _, tol in fits} == {0.1}  # a tol in the grid is the user's: it wins in the search and after


@pytest.mark.parametrize("strategy,bn_stats,frozen", [("freeze-unfreeze", "auto", True), ("full", "auto", False),
                                                      ("freeze-unfreeze", "update", False), ("full", "frozen", True)])
def test_bn_statistics_stay_pretrained_after_a_fitted_head(tiny_data, tiny_weights, tmp_path, strategy, bn_stats,
                                                           frozen):
    from safetensors.torch import load_file

    config = config_for(tiny_data, tiny_weights, tmp_path, strategy=strategy, bn_stats=bn_stats, calibrate=False)
    assert config.frozen_bn_stats is frozen
    result = finetune(config, progress=False)
    last, pretrained = load_file(str(result.run_dir / "last.safetensors")), load_file(str(tiny_weights))
    stats = [k for k in pretrained if k.endswith("running_mean")]
    assert stats and all(torch.equal(last[k], pretrained[k]) for k in stats) is frozen
    assert not torch.equal(last["conv_stem.weight"], pretrained["conv_stem.weight"])  # the body trained either way
