"""--resume: an interrupted run continues from its last committed epoch and ends with the same history."""

from __future__ import annotations

import pytest
from conftest import config_for, read_metrics

from transferkit.cli import main
from transferkit.train import finetune, loop
from transferkit.train.resume_state import COMPLETE_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Crash(KeyboardInterrupt):
    """Stands in for kill -9: raised after an epoch's training, before anything of it is written."""


def crash_in_epoch(monkeypatch, crash_epoch: int) -> None:
    real = loop.train_one_epoch

    def train_then_die(epoch, *args, **kwargs):
        result = real(epoch, *args, **kwargs)  # the model and optimizer have moved on in memory...
        if epoch == crash_epoch:
            raise Crash  # ...and are lost, as in a kill before the commit
        return result

    monkeypatch.setattr(loop, "train_one_epoch", train_then_die)


def recipe(tiny_data, tiny_weights, out, name):
    # freeze-unfreeze crosses a phase boundary; mixup and augmentation consume random numbers every epoch
    return config_for(tiny_data, tiny_weights, out, strategy="freeze-unfreeze", epochs=3, freeze_epochs=1,
                      aug="light", mixup=0.4, name=name, warmup_epochs=1)


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory):
    from conftest import make_dataset

    return make_dataset(tmp_path_factory.mktemp("resume") / "data", splits={"train": 8, "val": 4})


@pytest.fixture(scope="module")
def uninterrupted(shared_data, tiny_weights, tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests (one_torch_thread): CPU sums are bitwise equal only at equal thread counts
    try:
        return finetune(recipe(shared_data, tiny_weights, tmp_path_factory.mktemp("runs"), "uninterrupted"),
                        progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("crash_epoch", [1, 2], ids=["at-phase-change", "within-phase"])
def test_interrupted_run_resumes_to_the_same_history(runner, shared_data, tiny_weights, uninterrupted, tmp_path,
                                                     monkeypatch, crash_epoch):
    tiny_data, reference = shared_data, uninterrupted

    with monkeypatch.context() as patch:
        crash_in_epoch(patch, crash_epoch)
        with pytest.raises(Crash):
            finetune(recipe(tiny_data, tiny_weights, tmp_path, "interrupted"), progress=False)
    run_dir = tmp_path / "interrupted"
    assert not (run_dir / COMPLETE_FILE).exists()  # an unfinished run does not look complete
    assert len(read_metrics(run_dir)) == crash_epoch + 1  # LP-FT's epoch 0 and only the committed epochs

    result = runner.invoke(main, ["finetune", "--resume", str(run_dir), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert (run_dir / COMPLETE_FILE).exists()
    assert read_metrics(run_dir) == read_metrics(reference.run_dir)
    assert "; best epoch " in result.output and f"saved to {run_dir}\n" in result.output  # the footer


def test_resume_refuses_complete_runs_and_changed_settings(runner, tiny_data, tiny_weights, tmp_path):
    done = finetune(config_for(tiny_data, tiny_weights, tmp_path, strategy="linear-probe", aug="none"), progress=False)
    result = runner.invoke(main, ["finetune", "--resume", str(done.run_dir)])
    assert result.exit_code == 2 and "already complete" in result.output
    (done.run_dir / COMPLETE_FILE).unlink()
    result = runner.invoke(main, ["finetune", "--resume", str(done.run_dir), "--lr", "0.5"])
    assert result.exit_code == 2 and "cannot change lr" in result.output
    result = runner.invoke(main, ["finetune", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "config.yaml" in result.output
