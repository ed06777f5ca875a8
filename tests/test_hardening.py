"""Issue 18 beyond the table of docs/reliability.md: what a row cannot show (file modes, fingerprints, races,
what the data index holds, the dead-folder property)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_BACKBONE, make_dataset, make_image
from PIL import Image

from transferkit.cli import main
from transferkit.data import discover
from transferkit.errors import TransferkitError


def test_fingerprint_sees_an_edit_in_place_at_the_same_size(tiny_data):
    image = tiny_data / "train" / "cat" / "cat_0.bmp"
    make_image(image, (200, 40, 40), fmt="BMP")
    before, size = discover(tiny_data).fingerprint(), image.stat().st_size
    make_image(image, (40, 200, 40), seed=7, fmt="BMP")
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 1))
    assert image.stat().st_size == size and discover(tiny_data).fingerprint() != before


def test_hidden_and_macos_folders_are_neither_classes_nor_images(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=3)
    make_image(data / "__MACOSX" / "cat" / "._cat_0.png", (0, 0, 0))
    make_image(data / "cat" / ".thumbs" / "t.png", (0, 0, 0))
    index = discover(data)
    assert index.classes == ["cat", "dog"]
    assert not [s for s in index.samples if ".thumbs" in s.path.parts]


def test_csv_with_bom_reads_like_without(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=3)
    rows = "".join(f"{p.relative_to(data).as_posix()},{p.parent.name}\n" for p in sorted(data.glob("*/*.png")))
    (data / "labels.csv").write_text("\ufeffpath,label\n" + rows, encoding="utf-8")
    assert discover(data / "labels.csv").classes == ["cat", "dog"]


def test_decoding_a_bomb_prints_no_pil_warning(tmp_path):
    from transferkit.data.decode import ImageDecodeError, load_image

    path = tmp_path / "bomb.png"
    Image.new("1", (9500, 9500)).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning (PIL's DecompressionBombWarning) fails the test
        with pytest.raises(ImageDecodeError, match="decompression-bomb limit"):
            load_image(path)


def test_a_dataloader_worker_error_keeps_its_one_line_message(tmp_path):
    import torch

    from transferkit.data.dataset import ImageDataset

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    loader = torch.utils.data.DataLoader(ImageDataset([bad], [0], lambda image: {"image": image}), num_workers=1)
    with pytest.raises(TransferkitError) as caught:
        next(iter(loader))
    assert str(caught.value).startswith(f"cannot decode image {bad}") and "Traceback" not in str(caught.value)


def test_checkpoints_get_the_usual_file_mode(tmp_path, tiny_weights):
    from transferkit.models.backbones import load_backbone
    from transferkit.models.saved_model import checkpoint_metadata, save_checkpoint

    model, preprocessing = load_backbone(TINY_BACKBONE, weights=tiny_weights, num_classes=2)
    path = save_checkpoint(tmp_path / "best", model, checkpoint_metadata(
        model, kind="classifier", class_names=["a", "b"], preprocessing=preprocessing))
    expected = 0o666 & ~_umask()
    assert path.stat().st_mode & 0o777 == expected and path.with_suffix(".json").stat().st_mode & 0o777 == expected


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _finetune(tiny_data, tiny_weights, out, *extra):
    return ["finetune", "--backbone", TINY_BACKBONE, "--weights", str(tiny_weights), "--data", str(tiny_data),
            "--out", str(out), "--name", "r", "--epochs", "1", "--batch-size", "4", "--workers", "0",
            "--img-size", "32", "--strategy", "linear-probe", "--aug", "none", "--no-track", *extra]


def test_a_start_killed_before_its_first_epoch_is_replaced_by_the_same_command(tiny_data, tiny_weights, tmp_path,
                                                                                runner):
    from transferkit.train.run_folder import OWNER_FILE

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("backbone: x\n")
    (run / "split.csv").write_text("path,label,split\n")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / OWNER_FILE).write_text(str(dead.pid))  # the start that wrote these was kill -9'd
    result = runner.invoke(main, _finetune(tiny_data, tiny_weights, tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    assert (run / "result.json").is_file() and not (run / OWNER_FILE).exists()


def test_a_same_name_start_still_running_is_not_replaced(tiny_data, tiny_weights, tmp_path, runner):
    from transferkit.train.run_folder import OWNER_FILE

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("backbone: x\n")
    (run / OWNER_FILE).write_text(str(os.getpid()))  # alive: another start of the same name, mid first epoch
    result = runner.invoke(main, _finetune(tiny_data, tiny_weights, tmp_path / "runs"))
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert (run / "config.yaml").read_text() == "backbone: x\n"


def test_nan_in_the_first_epoch_leaves_no_folder(tiny_data, tiny_weights, tmp_path, runner, monkeypatch):
    import torch

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", lambda self, logits, target: logits.sum() * np.nan)
    result = runner.invoke(main, _finetune(tiny_data, tiny_weights, tmp_path / "runs", "--strategy", "full",
                                           "--aug", "light"))
    assert result.exit_code == 1 and "loss became nan at epoch 1" in result.stderr
    assert not (tmp_path / "runs" / "r").exists()


def test_svm_default_folders_differ_per_dataset_and_never_replace(tmp_path, tiny_weights, runner, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folders = []
    for name in ("roads", "signs", "signs"):
        data = make_dataset(tmp_path / name, per_class=4)
        result = runner.invoke(main, ["svm", "--backbone", TINY_BACKBONE, "--weights", str(tiny_weights),
                                      "--data", str(data), "--no-track", "--workers", "0", "--cv", "2"])
        assert result.exit_code == 0, result.output
        folders.append(result.stdout.strip().splitlines()[-1].removeprefix("model -> "))
    assert folders == [f"runs/svm-{TINY_BACKBONE}-logistic-roads", f"runs/svm-{TINY_BACKBONE}-logistic-signs",
                       f"runs/svm-{TINY_BACKBONE}-logistic-signs-2"]


def test_a_failed_svm_save_leaves_no_model_folder(tmp_path, tiny_data, tiny_weights, runner, monkeypatch):
    from transferkit.features import classical_heads

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(classical_heads, "save_checkpoint", crash)  # after head.skops, before the backbone
    out = tmp_path / "svm"
    with pytest.raises(RuntimeError, match="disk full"):
        runner.invoke(main, ["svm", "--backbone", TINY_BACKBONE, "--weights", str(tiny_weights), "--data",
                             str(tiny_data), "--out", str(out), "--no-track", "--workers", "0", "--cv", "2"],
                      catch_exceptions=False)
    assert not out.exists() and not list(tmp_path.glob(".svm.*"))


def test_run_names_stay_inside_out():
    from transferkit.train.config import resolve_config

    for name in ("a/b", "../x", "/abs", "..", "", "a\\b"):
        with pytest.raises(TransferkitError, match="bad value for name"):
            resolve_config(overrides={"name": name})
    assert resolve_config(overrides={"name": "ok-name.2"}).name == "ok-name.2"


@pytest.mark.parametrize("key,value", [("lr", float("nan")), ("lr", float("inf")), ("epochs", float("inf")),
                                       ("weight_decay", float("nan")), ("grad_clip", float("-inf"))])
def test_non_finite_values_are_refused(key, value):
    from transferkit.train.config import resolve_config

    with pytest.raises(TransferkitError, match=f"bad value for {key}: .*finite"):
        resolve_config(overrides={key: value})


def test_unwritable_tracking_store_is_named(tmp_path):
    from transferkit.tracking.runs import check_tracking_store

    assert check_tracking_store(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}").endswith("mlflow.db")
    for uri in ("sqlite:////proc/x/mlflow.db", "/proc/mlruns", "file:///proc/1/mlruns"):
        with pytest.raises(TransferkitError, match="is not writable"):
            check_tracking_store(uri)


def test_resume_refuses_content_changes_by_name(tmp_path, tiny_data, tiny_weights, runner):
    result = runner.invoke(main, _finetune(tiny_data, tiny_weights, tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "r"
    (run / "result.json").unlink()
    image = tiny_data / "val" / "dog" / "dog_1.png"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # edited in place
    result = runner.invoke(main, ["finetune", "--resume", str(run)])
    assert result.exit_code == 2 and "files edited in place" in result.stderr
    assert runner.invoke(main, ["finetune", "--resume", str(run), "--allow-data-change"]).exit_code == 0
    assert Path(run / "result.json").is_file()


def test_the_loss_guard_leaves_training_intact(tiny_data, tiny_weights, tmp_path, runner):
    """The finiteness check sits in the training step: the step must still update the weights."""
    from safetensors.torch import load_file

    result = runner.invoke(main, _finetune(tiny_data, tiny_weights, tmp_path / "runs", "--strategy", "full"))
    assert result.exit_code == 0, result.output
    before, after = load_file(str(tiny_weights)), load_file(str(tmp_path / "runs" / "r" / "last.safetensors"))
    assert not np.allclose(before["conv_stem.weight"].numpy(), after["conv_stem.weight"].numpy())
