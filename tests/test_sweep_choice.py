"""Issue 25: the sweep breaks ties by val loss everywhere, takes finetune's flags as fixed settings, describes its
parent run and marks the winner on sweep.png with labels that do not overlap."""

from __future__ import annotations

import itertools

import pytest
from test_sweep import BACKBONES, FAST, data, env, weights_dir  # noqa: F401 (the same fixtures)

from transferkit.errors import TransferkitError


def _study(scores):
    """An in-memory study of finished trials with these (val_accuracy, val_loss) best checkpoints."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    study = optuna.create_study(direction="maximize")
    for accuracy, loss in scores:
        study.add_trial(optuna.trial.create_trial(
            params={"backbone": "test_efficientnet"}, distributions={"backbone": CategoricalDistribution(BACKBONES)},
            value=accuracy, user_attrs={"best": {"val_accuracy": accuracy, "val_loss": loss, "val_macro_f1": accuracy}}))
    return study


def test_ties_on_the_metric_go_to_the_lower_val_loss():
    from transferkit.sweep.leaderboard import leaderboard, markdown
    from transferkit.sweep.runner import SweepResult

    board = leaderboard(_study([(0.75, 0.339), (0.5, 0.01), (0.75, 0.031), (0.75, 0.2)]), "val_accuracy")
    assert list(board["trial"]) == [2, 3, 0, 1] and list(board["rank"]) == [1, 2, 3, 4]
    result = SweepResult(None, board, "val_accuracy", "s", None)
    assert result.winner["trial"] == 2  # not trial 0, the first of the tied ones
    assert "ties by the lower val_loss" in markdown(board, "val_accuracy")
    by_loss = leaderboard(_study([(0.75, 0.3), (0.5, 0.3), (0.9, 0.1)]), "val_loss")
    assert list(by_loss["trial"]) == [2, 0, 1]  # ranked by the loss itself, then trial order


@pytest.fixture
def captured(monkeypatch):
    """The fixed settings a `transferkit sweep` command line resolves to; the sweep stops before stage 1."""
    import transferkit.sweep.runner

    seen = {}

    def stop(self):
        seen["fixed"] = self.fixed
        raise TransferkitError("stopped before stage 1")

    monkeypatch.setattr(transferkit.sweep.runner._Sweep, "run", stop)
    return seen


def test_finetune_flags_and_settings_are_fixed_settings_over_the_file(env, data, runner, captured):  # noqa: F811
    from transferkit.cli import main

    spec = env / "sweep.yaml"
    spec.write_text("backbones: [test_efficientnet]\nfixed: {batch_size: 32, epochs: 1, aug: none, strategy: full}\n")
    result = runner.invoke(main, ["sweep", "--data", str(data), "--space", str(spec), "--no-track",
                                  "--batch-size", "8", "--img-size", "64", "lr=3e-4", "--no-lp-ft",
                                  "--strategies", "full,linear-probe"])
    assert result.exit_code == 2 and "stopped before stage 1" in result.output
    assert captured["fixed"] == {"batch_size": 8, "epochs": 1, "aug": "none", "img_size": 64, "lr": 3e-4,
                                 "lp_ft": False}
    assert result.output.count("replace the fixed: ones") == 1 and "batch_size=8 (file: 32)" in result.output
    assert "strategy searched (file: 'full')" in result.output


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "bad value for batch_size: 0"),
    (["epoch=2"], "unknown finetune key 'epoch' in the fixed settings; did you mean epochs?"),
    (["lr=-1"], "bad value for lr"),
    (["backbone=resnet50"], "'backbone' cannot be set"),
    (["--strategy", "full", "--strategies", "linear-probe"], "'strategy' is both fixed"),
])
def test_fixed_settings_are_checked_like_finetune(env, data, runner, captured, args, message):  # noqa: F811
    from transferkit.cli import main

    result = runner.invoke(main, ["sweep", "--data", str(data), "--backbones", "test_efficientnet", "--no-track",
                                  *args])
    assert result.exit_code == 2 and message in result.output and "fixed" not in captured


def test_the_winner_is_marked_and_labels_do_not_overlap():
    from transferkit.reports.sweep_plot import sweep_figure

    points = [{"trial": i, "label": BACKBONES[i % 2], "value": 0.75 if i < 6 else 0.7 + 0.01 * i,
               "minutes": 1 + 0.05 * i, "params_m": 4.7 if i % 2 else 3.5, "winner": i == 3} for i in range(12)]
    fig = sweep_figure(points, "val_accuracy")
    renderer = fig.canvas.get_renderer()
    for ax, winner_label in zip(fig.axes, ["3: test_resnet", "3, 1, 5: test_resnet"]):  # trials at one spot share it
        notes = [note for note in ax.texts if note.get_text()]
        boxes = [note.get_window_extent(renderer) for note in notes]
        assert not [pair for pair in itertools.combinations(boxes, 2) if pair[0].overlaps(pair[1])]
        assert all(ax.bbox.contains(b.x0, b.y0) and ax.bbox.contains(b.x1, b.y1) for b in boxes)
        winner = [note for note in notes if note.get_fontweight() == "bold"]
        assert [note.get_text() for note in winner] == [winner_label]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["trial", "winner"]


@pytest.mark.slow
def test_a_sweep_set_by_flags_alone_ends_with_an_ensemble_of_its_best_trials(env, data, runner):  # noqa: F811
    """No sweep file: the trials' settings come from finetune's flags and key=value; --ensemble 2 averages both."""
    import json

    from transferkit.cli import main

    result = runner.invoke(main, ["sweep", "--data", str(data), "--backbones", ",".join(BACKBONES), "--no-track",
                                  "--out", "sweeps", "--study", "s", "--ensemble", "2", "--strategy", "linear-probe",
                                  "--epochs", "1", "--batch-size", "4", "--no-amp", "workers=0", "device=cpu",
                                  "aug=none", "early_stopping=0"])
    assert result.exit_code == 0, result.output
    config = next((env / "sweeps" / "s").glob("trial-000-*/config.yaml")).read_text()
    assert "batch_size: 4" in config and "strategy: linear-probe" in config
    meta = json.loads((env / "sweeps" / "s" / "ensemble" / "model.json").read_text())
    assert meta["selection"] == "greedy" and len(meta["chosen_on"]["members"]) == 2
    line = next(line for line in result.output.splitlines() if line.startswith("ensemble: val accuracy"))
    assert f"{meta['chosen_on']['ensemble']['accuracy']:.4f}" in line and "against the winner's" in line
