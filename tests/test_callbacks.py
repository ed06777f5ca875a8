"""Listeners of a finetune run: the events they hear, in order; stopping a run; failures; no MLflow unless tracked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import config_for

from transferkit.train import finetune, loop
from transferkit.train.callbacks import Callback


class Recorder(Callback):
    def __init__(self, stop_after: int | None = None):
        self.events: list[tuple] = []
        self.stop_after = stop_after

    def on_run_start(self, run):
        self.events.append(("start", (run.run_dir / "config.yaml").is_file(), (run.run_dir / "split.csv").is_file()))

    def on_measurement(self, run, metrics, artifact=None):
        self.events.append(("measurement", sorted(metrics)))

    def on_best_checkpoint(self, run, row):
        saved = json.loads((run.run_dir / "best.json").read_text())
        self.events.append(("best", row["epoch"], saved["epoch"]))

    def on_epoch_end(self, run, row, improved):
        committed = (run.run_dir / "resume.pt").is_file()
        self.events.append(("epoch", row["epoch"], improved, committed))
        return self.stop_after is not None and row["epoch"] >= self.stop_after

    def on_run_end(self, run, summary):
        self.events.append(("end", summary["best_epoch"], summary["epochs_run"], run.review.report["split"]))
        return {"listener_note": "heard the end"}

    def on_failure(self, run, error):
        self.events.append(("failure", type(error).__name__))


def test_listeners_hear_every_event_in_order_and_add_to_the_result(tiny_data, tiny_weights, tmp_path):
    recorder = Recorder()
    config = config_for(tiny_data, tiny_weights, tmp_path, strategy="freeze-unfreeze", epochs=2, early_stopping=0)
    result = finetune(config, progress=False, callbacks=[recorder])
    kinds = [event[0] for event in recorder.events]
    assert recorder.events[0] == ("start", True, True)
    # LP-FT: the head fit is measured, the probe is epoch 0's best, then two committed epochs, calibration, end
    assert kinds[1:3] == ["measurement", "best"] and recorder.events[2][1:] == (0, 0)
    epochs = [event for event in recorder.events if event[0] == "epoch"]
    assert [(e[1], e[3]) for e in epochs] == [(1, True), (2, True)]
    for event in recorder.events:  # a best checkpoint is announced once it is on disk
        if event[0] == "best":
            assert event[1] == event[2]
    assert kinds[-2:] == ["measurement", "end"] and recorder.events[-1] == ("end", result.best_epoch, 2, "val")
    saved = json.loads((result.run_dir / "result.json").read_text())
    assert saved["listener_note"] == "heard the end" and saved["mlflow_run_id"] is None


def test_a_listener_stops_the_run_like_an_early_stop(tiny_data, tiny_weights, tmp_path):
    recorder = Recorder(stop_after=1)
    config = config_for(tiny_data, tiny_weights, tmp_path, strategy="linear-probe", aug="none", epochs=4)
    result = finetune(config, progress=False, callbacks=[recorder])
    assert result.stopped_early and len(result.history) == 1
    assert json.loads((result.run_dir / "result.json").read_text())["stopped_early"] is True


def test_listeners_hear_a_failure_and_the_uncommitted_folder_is_removed(tiny_data, tiny_weights, tmp_path,
                                                                         monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the step broke")

    monkeypatch.setattr(loop, "train_one_epoch", broken)
    recorder = Recorder()
    config = config_for(tiny_data, tiny_weights, tmp_path, strategy="linear-probe", aug="none", name="broken")
    with pytest.raises(RuntimeError, match="the step broke"):
        finetune(config, progress=False, callbacks=[recorder])
    assert recorder.events[0][0] == "start" and recorder.events[-1] == ("failure", "RuntimeError")
    assert not (tmp_path / "broken").exists()


@pytest.mark.slow
def test_an_untracked_run_never_imports_mlflow(tiny_data, tiny_weights, tmp_path):
    """The trainer knows no tracking library: MLflow comes in only with its listener."""
    script = (
        "import sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from conftest import config_for\n"
        "from transferkit.train import finetune\n"
        f"finetune(config_for({str(tiny_data)!r}, {str(tiny_weights)!r}, {str(tmp_path)!r}, strategy='linear-probe',"
        " aug='none', calibrate=False), progress=False)\n"
        "print('mlflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=240)
    assert out.stdout.strip().splitlines()[-1] == "False"
