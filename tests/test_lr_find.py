"""The LR range test: `lr-find` suggests a finite learning rate and plots it; ``lr=auto`` runs it and stores the choice."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_BACKBONE, config_for

from transferkit.cli import main
from transferkit.train import finetune
from transferkit.train.config import resolve_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # a range test, then a run: ~3 s


def test_lr_find_suggests_a_finite_lr_and_lr_auto_stores_it(runner, tiny_data, tiny_weights, tmp_path):
    import math

    plot = tmp_path / "lr.png"
    result = runner.invoke(main, ["lr-find", "--backbone", TINY_BACKBONE, "--weights", str(tiny_weights), "--data",
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


def test_plot_target_is_checked_before_the_range_test(runner, tiny_data, tiny_weights, tmp_path, monkeypatch):
    """Issue 24: an unwritable --plot failed after the whole range test; a checkpoint or a user's file was replaced."""
    from transferkit.reports.plots import lr_find_png

    def no_range_test(*args, **kwargs):
        raise AssertionError("the range test ran before --plot was checked")

    monkeypatch.setattr("transferkit.train.find_lr", no_range_test)
    mine = tmp_path / "photo.png"
    mine.write_bytes(b"not a plot")
    checkpoint = tmp_path / "best.safetensors"
    checkpoint.write_bytes(b"weights")
    for plot, message in ((Path("/proc/tk/lr.png"), "cannot be written: no file can be made in /proc"),
                          (checkpoint, "must end in .png"), (checkpoint / "lr.png", "is a file, not a folder"),
                          (tmp_path, "is a directory"), (mine, "already exists and is not an earlier figure")):
        result = runner.invoke(main, ["lr-find", "--backbone", TINY_BACKBONE, "--weights", str(tiny_weights),
                                      "--data", str(tiny_data), "--plot", str(plot)])
        assert result.exit_code == 2 and message in result.output, result.output
    assert mine.read_bytes() == b"not a plot" and checkpoint.read_bytes() == b"weights"
    from transferkit.core.fileio import check_plot_file

    earlier = lr_find_png([1e-5, 1e-3], [1.0, 0.5], 1e-4, tmp_path / "lr.png")
    assert check_plot_file(earlier, "--plot") == earlier  # an earlier plot may be replaced
