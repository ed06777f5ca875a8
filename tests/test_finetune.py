"""`transferkit finetune` end to end on a tiny generated dataset and the tiny test_efficientnet (64 px)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import FINETUNE_IMG, TINY_BACKBONE, config_for, read_metrics, run_cli
from safetensors.torch import load_file

from transferkit.cli import main
from transferkit.tasks import get_task
from transferkit.train import finetune
from transferkit.train.config import resolve_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


STRATEGY_EPOCHS = {"linear-probe": 1, "full": 1, "freeze-unfreeze": 1, "discriminative": 1, "partial:1": 1}  # any budget >= 1


@pytest.mark.parametrize("strategy", list(STRATEGY_EPOCHS))
def test_every_strategy_trains_a_loadable_classifier(runner, tiny_data, tiny_weights, tmp_path, strategy):
    from transferkit.models.predictors import load_predictor

    epochs = STRATEGY_EPOCHS[strategy]
    result = run_cli(runner, tiny_data, tiny_weights, tmp_path / "runs", "--strategy", strategy, "--epochs", str(epochs),
                     "--name", "r", "--lr", "0.01", "--aug", "light")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "r"
    footer = [line for line in result.stdout.splitlines() if ", saved to " in line]
    assert len(footer) == 1 and "; best epoch " in footer[0] and footer[0].endswith(f"saved to {run_dir}")
    assert f"transferkit evaluate --model {run_dir}" in result.stdout  # the next commands follow
    for name in ("config.yaml", "metrics.csv", "split.csv", "curves.png", "best.safetensors", "best.json",
                 "last.safetensors", "last.json", "resume.pt", "result.json"):
        assert (run_dir / name).is_file(), name
    rows = read_metrics(run_dir, drop_timing=False)
    probe = [0] if strategy == "freeze-unfreeze" else []  # LP-FT's probe is epoch 0, a row like the epochs
    assert [int(r["epoch"]) for r in rows] == probe + list(range(1, epochs + 1))
    assert list(rows[0]) == list(get_task().epoch_columns)
    assert resolve_config(run_dir / "config.yaml").strategy == strategy
    best = json.loads((run_dir / "best.json").read_text())
    assert best["class_names"] == ["cat", "dog"] and best["recipe"]["strategy"] == strategy
    assert len(best["split"]) == 24 and best["preprocessing"]["input_size"] == [3, FINETUNE_IMG, FINETUNE_IMG]
    # the best checkpoint reproduces its own recorded val accuracy through the public predictor
    predictor = load_predictor(run_dir)
    val = sorted((tiny_data / "val").rglob("*.png"))
    probs = predictor.predict_proba([str(p) for p in val])
    truth = np.array([predictor.class_names.index(p.parent.name) for p in val])
    assert (probs.argmax(1) == truth).mean() == pytest.approx(best["metrics"]["val_accuracy"])
    check_frozen_parts_unchanged(strategy, tiny_weights, run_dir / "last.safetensors")


def check_frozen_parts_unchanged(strategy, initial, trained_path):
    """Frozen parameters and the running statistics of frozen BatchNorm are bit-identical after training."""
    import timm

    from transferkit.train.strategies import stage_groups

    before, after = load_file(str(initial)), load_file(str(trained_path))
    if strategy in ("full", "discriminative"):
        trainable_modules = [""]  # everything
    elif strategy == "partial:1":
        last_stage = stage_groups(timm.create_model(TINY_BACKBONE, num_classes=2))[-1]
        trainable_modules = sorted({name.rsplit(".", 1)[0] + "." for name in last_stage})
    else:
        trainable_modules = [] if strategy == "linear-probe" else [""]  # freeze-unfreeze ends with everything
    body = [k for k in before if not k.startswith("classifier.")]  # the 1000-class ImageNet head is replaced
    frozen = [k for k in body if not any(k.startswith(m) for m in trainable_modules)]
    moved = [k for k in frozen if not torch.equal(before[k], after[k])]
    assert moved == []
    assert "bn1.running_mean" in frozen or strategy not in ("linear-probe", "partial:1")
    changed = [k for k in body if not torch.equal(before[k], after[k])]
    assert bool(changed) == (strategy != "linear-probe")  # the body did train where it should
    assert after["classifier.weight"].shape[0] == 2


def test_train_bn_lets_frozen_batchnorm_adapt(tiny_data, tiny_weights, tmp_path):
    config = config_for(tiny_data, tiny_weights, tmp_path, strategy="linear-probe", aug="light", name="b", train_bn=True)
    result = finetune(config, progress=False)
    before, after = load_file(str(tiny_weights)), load_file(str(result.run_dir / "last.safetensors"))
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])
    assert torch.equal(before["conv_stem.weight"], after["conv_stem.weight"])


@pytest.mark.slow
def test_same_seed_same_metrics(tiny_data, tiny_weights, tmp_path):
    runs = [finetune(config_for(tiny_data, tiny_weights, tmp_path, strategy="full", aug="light", mixup=0.2,
                                name=f"s{i}"), progress=False) for i in range(2)]
    assert read_metrics(runs[0].run_dir) == read_metrics(runs[1].run_dir)
    other = finetune(config_for(tiny_data, tiny_weights, tmp_path, strategy="full", aug="light", mixup=0.2,
                                name="s-other", seed=1), progress=False)
    assert read_metrics(other.run_dir) != read_metrics(runs[0].run_dir)


def test_balanced_sampler_draws_classes_evenly():
    from transferkit.train.loaders import train_loader

    labels = np.array([0] * 30 + [1] * 10)
    dataset = torch.utils.data.TensorDataset(torch.zeros(40, 1), torch.from_numpy(labels))
    loader = train_loader(dataset, labels, batch_size=40, seed=0, balance="sampler", workers=0, device="cpu")
    drawn = []
    for epoch in range(25):
        loader.sampler.set_epoch(epoch)
        drawn += [int(y) for _, batch in loader for y in batch]
    assert abs(np.mean(drawn) - 0.5) < 0.05  # the data is 25 % class 1; the sampler makes it ~50 %
    loader.sampler.set_epoch(3)
    first = [int(i) for _, i in loader.sampler]
    loader.sampler.set_epoch(3)
    assert [int(i) for _, i in loader.sampler] == first  # an epoch's draw is a function of (seed, epoch)


def test_tracked_run_logs_metrics_per_epoch_artifacts_and_model(tiny_data, tiny_weights, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = config_for(tiny_data, tiny_weights, tmp_path, strategy="linear-probe", aug="none", epochs=2, name="t",
                        track=True, tracking_uri=uri, experiment="tiny")
    result = finetune(config, progress=False)
    run_id = json.loads((result.run_dir / "result.json").read_text())["mlflow_run_id"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert [m.step for m in client.get_metric_history(run_id, "epoch/val_accuracy")] == [1, 2]
    assert {"config.yaml", "metrics.csv", "curves.png"} <= {a.path for a in client.list_artifacts(run_id)}
    assert client.get_run(run_id).data.params["strategy"] == "linear-probe"
    assert result.model_uri == f"runs:/{run_id}/model"


def test_stalled_val_loss_cuts_the_lr_tenfold_then_stops_early(tiny_data, tiny_weights, tmp_path):
    # an LR this small leaves val loss flat: plateau (patience 0) divides it by 10 after each epoch without
    # progress (from epoch 2 on), and early stopping (patience 2) ends the 6-epoch run after epoch 3
    config = config_for(tiny_data, tiny_weights, tmp_path, strategy="linear-probe", aug="none", epochs=6, lr=1e-6,
                        scheduler="plateau", plateau_patience=0, early_stopping=2, min_lr=0.0)
    result = finetune(config, progress=False)
    assert result.stopped_early and [r["epoch"] for r in result.history] == [1, 2, 3]
    assert [r["lr"] for r in result.history] == pytest.approx([1e-6, 1e-6, 1e-7])
    assert json.loads((result.run_dir / "result.json").read_text())["stopped_early"] is True
    assert result.best_epoch == 1


@pytest.mark.slow
def test_balance_and_plateau_options_run(tiny_data3, tiny_weights, tmp_path):
    config = config_for(tiny_data3, tiny_weights, tmp_path, strategy="full", balance="sampler", scheduler="plateau",
                        optimizer="sgd", grad_clip=1.0, accum_steps=2, batch_size=4, name="o", epochs=2,
                        aug="none")
    result = finetune(config, progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2]
    weighted = finetune(config_for(tiny_data3, tiny_weights, tmp_path, balance="weights", name="w",
                                   strategy="linear-probe", aug="none"), progress=False)
    assert weighted.best["val_loss"] > 0


def test_run_folders_are_never_overwritten(tiny_data, tiny_weights, tmp_path, runner):
    first = finetune(config_for(tiny_data, tiny_weights, tmp_path, strategy="linear-probe", aug="none"), progress=False)
    second = finetune(config_for(tiny_data, tiny_weights, tmp_path, strategy="linear-probe", aug="none"), progress=False)
    assert first.run_dir != second.run_dir and first.run_dir.name.startswith(f"{TINY_BACKBONE}-linear-probe-")
    result = run_cli(runner, tiny_data, tiny_weights, tmp_path, "--name", first.run_dir.name, "--strategy", "full")
    assert result.exit_code == 2 and "already exists" in result.output


def _bad_input_cases(tmp_path, tiny_data, tiny_weights):
    """{case: (extra CLI args, expected message)}; ``--resume`` cases get no other flags."""
    import shutil

    import timm
    from conftest import make_dataset
    from safetensors.torch import save_file

    missing_val = make_dataset(tmp_path / "mv", splits={"train": 4, "val": 2})
    for image in (missing_val / "val" / "dog").iterdir():
        image.unlink()  # the class folder stays, empty
    other_backbone = tmp_path / "other.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=2).state_dict(), str(other_backbone))
    data3 = make_dataset(tmp_path / "d3", classes=("cat", "dog", "fox"), per_class=4)
    three = finetune(config_for(data3, tiny_weights, tmp_path / "prev", strategy="linear-probe", aug="none",
                                batch_size=4), progress=False)
    (three.run_dir / "result.json").unlink()  # as if it had been interrupted...
    shutil.rmtree(data3 / "fox")  # ...and the data changed since
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("a file where --out wants a folder")
    return {
        "missing-val": (["--data", str(missing_val)], "classes missing from val: dog"),
        "batch-too-big": (["--batch-size", "100"], "larger than the 16 training images"),
        "weights-other-backbone": (["--weights", str(other_backbone)], "do not fit backbone"),
        "weights-other-classes": (["--weights", str(three.run_dir / "best.safetensors")], "for 3 classes"),
        "resume-other-classes": (["--resume", str(three.run_dir)], "resume with the same data"),
        "unwritable-out": (["--out", str(not_a_folder / "runs")], "choose a writable --out"),
        "bad-strategy": (["--strategy", "partial:-1"], "bad value for strategy"),
    }


def test_bad_inputs_fail_in_one_line_without_a_complete_run(runner, tiny_data, tiny_weights, tmp_path):
    cases = _bad_input_cases(tmp_path, tiny_data, tiny_weights)
    for name, (args, message) in cases.items():
        out = tmp_path / "runs"
        if args[0] == "--resume":
            result = runner.invoke(main, ["finetune", *args])
        else:
            result = run_cli(runner, tiny_data, tiny_weights, out, "--strategy", "full", "--epochs", "1", *args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2, (name, result.output)
        assert lines[-1].startswith("error: ") and message in lines[-1], (name, result.output)
        assert not list(tmp_path.glob("**/result.json")), name
