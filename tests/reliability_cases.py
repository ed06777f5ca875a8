"""Every bad-input case transferkit has been tried on, run the same way by the tests and by the doc generator.

``bench/reliability_table.py`` runs all cases and writes ``docs/reliability.md``; ``tests/test_reliability_table.py``
runs each case and asserts that what it observes is the doc's row, so the table cannot go stale silently.
A case builds its inputs in a fresh folder (tiny generated images, the tiny ``test_efficientnet``), runs one
command, and reports its exit code, its last message line and what it left on disk.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from conftest import TINY_BACKBONE, make_dataset, make_image
from PIL import Image

HEADER = ("case", "issue", "command", "exit", "message", "left on disk")
NOTICE_PREFIXES = ("error: ", "warning: ", "skipped ", "the run stopped", "interrupted")
_BUILT: dict = {}  # inputs several cases share, built once per weights file and copied into each case's folder


@dataclass
class Workspace:
    """A fresh folder for one case; paths in messages are shown relative to it."""

    root: Path
    weights: Path
    _data: dict = field(default_factory=dict)

    def data(self, name: str = "data", **layout) -> Path:
        if name not in self._data:
            self._data[name] = make_dataset(self.root / name, **(layout or {"splits": {"train": 8, "val": 4}}))
        return self._data[name]

    def finetune(self, *extra: str, data: Path | None = None, name: str = "r", track: bool = False,
                 epochs: bool = True) -> list[str]:
        args = ["finetune", "--backbone", TINY_BACKBONE, "--weights", str(self.weights),
                "--data", str(data or self.data()), "--out", str(self.root / "runs"), "--name", name,
                "--batch-size", "4", "--workers", "0", "--img-size", "32", "--strategy", "full"]
        return args + (["--epochs", "1"] if epochs else []) + ([] if track else ["--no-track"]) + list(extra)

    def csv(self, rows: list[list[str]], header: str = "path,label", name: str = "labels.csv", bom=False) -> Path:
        data = self.data()
        path = data / name
        text = header + "\n" + "\n".join(",".join(row) for row in rows) + "\n"
        path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
        return path

    def csv_of_data(self, extra: list[list[str]] = (), **kwargs) -> Path:
        """A labels CSV listing the generated train images, plus ``extra`` rows."""
        data = self.data()
        rows = [[p.relative_to(data).as_posix(), p.parent.name] for p in sorted(data.glob("train/*/*.png"))]
        return self.csv(rows + list(extra), **kwargs)

    def trained_run(self, name: str = "done", *, own_data: bool = False) -> Path:
        """A finished 1-epoch run; copied from one trained once unless it must be trained on this case's data."""
        target = self.root / "runs" / name
        if own_data:
            _invoke(self.finetune("--strategy", "linear-probe", "--aug", "none", name=name))
        else:
            shutil.copytree(self._built("run", lambda ws: ws.trained_run("done", own_data=True)), target)
        return target

    def svm_model(self) -> Path:
        """An SVM model folder (with its features.parquet), built once."""
        def build(ws):
            _invoke(["svm", "--backbone", TINY_BACKBONE, "--weights", str(ws.weights), "--data", str(ws.data()),
                     "--out", str(ws.root / "svm"), "--no-track", "--workers", "0", "--cv", "2", "--device", "cpu"])
            return ws.root / "svm"

        shutil.copytree(self._built("svm", build), self.root / "svm")
        return self.root / "svm"

    def _built(self, kind: str, build: Callable[[Workspace], Path]) -> Path:
        key = (kind, str(self.weights))
        if key not in _BUILT:
            folder = Path(tempfile.mkdtemp(prefix=f"transferkit-{kind}-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            _BUILT[key] = build(Workspace(folder, self.weights))
        return _BUILT[key]


def _invoke(args: list[str]) -> None:
    from click.testing import CliRunner

    from transferkit.cli import main

    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output


@dataclass(frozen=True)
class Case:
    id: str
    issue: str  # issue 18's item number, "smaller", or "earlier" (bad inputs handled before issue 18)
    setup: Callable[[Workspace], list[str]]  # builds inputs, returns the command's arguments
    exit: int  # the exit code the case must give
    watch: tuple[str, ...] = ("runs",)  # folders whose leftovers the table reports
    sigterm_after: str | None = None  # run as a subprocess; SIGTERM once stderr shows this text (or "file:GLOB")
    slow: bool = False  # left out of `make test-fast` (a subprocess, or a sweep: seconds, not a fraction of one)
    patch: Callable[[], contextlib.AbstractContextManager] | None = None  # simulates a fault in-process


# --------------------------------------------------------------------------- inputs


def _corrupt(ws: Workspace, kind: str) -> Path:
    data = ws.data()
    target = data / "train" / "cat" / "cat_0.png"
    if kind == "random":
        target.write_bytes(np.random.default_rng(0).bytes(600))
    elif kind == "truncated-jpeg":
        target.unlink()
        jpeg = make_image(data / "train" / "cat" / "cat_0.jpg", (200, 40, 40), fmt="JPEG")
        jpeg.write_bytes(jpeg.read_bytes()[:-200])  # headers intact: only decoding finds the cut
    return data


def _wide_png(ws: Workspace) -> Path:
    data = ws.data()
    Image.new("L", (60000, 1)).save(data / "train" / "cat" / "strip.png")
    return data


def _bomb_png(ws: Workspace) -> Path:
    data = ws.data()
    Image.new("1", (9500, 9500)).save(data / "train" / "cat" / "bomb.png")  # 90 M pixels, 12 KB on disk
    return data


def _recipe(ws: Workspace, text: str) -> str:
    path = ws.root / "recipe.yaml"
    path.write_text(text)
    return str(path)


def _bad_aug(ws: Workspace) -> str:
    path = ws.root / "aug.yaml"
    path.write_text("transform: {__class_fullname__: Compose, transforms: [{__class_fullname__: NoSuchTransform, p: 1}]}\n")
    return str(path)


def _resumable_after_data_change(ws: Workspace) -> Path:
    run = ws.trained_run("r", own_data=True)
    (run / "result.json").unlink()  # as if interrupted after its last epoch
    make_image(ws.data() / "train" / "cat" / "new.png", (200, 40, 40), seed=99)
    return run


def _two_split_folders(ws: Workspace) -> Path:
    data = ws.data()
    make_dataset(data / "Train_", classes=("cat", "dog"), per_class=2)
    (data / "Train_").rename(data / "Train")
    return data


def _mac_zip_leftovers(ws: Workspace) -> Path:
    data = ws.data("flat", classes=("cat", "dog"), per_class=6)
    make_image(data / "__MACOSX" / "cat" / "._cat_0.png", (0, 0, 0))
    make_image(data / "cat" / ".thumbs" / "t.png", (0, 0, 0))
    return data


def _head_replaced(ws: Workspace, kind: str) -> Path:
    model = ws.svm_model()
    head = model / "head.skops"
    if kind == "random":
        head.write_bytes(np.random.default_rng(0).bytes(256))
    elif kind == "truncated":
        head.write_bytes(head.read_bytes()[:200])
    else:
        import skops.io
        from sklearn.dummy import DummyClassifier
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        from transferkit.models.saved_model import find_checkpoint, read_checkpoint_metadata

        width = read_checkpoint_metadata(find_checkpoint(model))["feature_dim"]
        x = np.random.default_rng(0).normal(size=(12, width + (3 if kind == "width" else 0)))
        y = np.arange(12) % (3 if kind == "classes" else 2)
        clf = DummyClassifier(strategy="constant", constant=1) if kind == "dummy" else LogisticRegression()
        skops.io.dump(Pipeline([("scale", StandardScaler()), ("clf", clf)]).fit(x, y), head)
    return model


def _unwritable_store() -> str:
    return "sqlite:////proc/transferkit-test/mlflow.db"


def _evaluate(ws: Workspace, model: Path, *extra: str) -> list[str]:
    return ["evaluate", "--model", str(model), "--data", str(ws.data()), "--workers", "0", "--device", "cpu", *extra]


def _serve(ws: Workspace, *extra: str) -> list[str]:
    """`serve` refusing an option before it loads anything (the model path does not exist: a regression that got
    past the check would end on that error, not serve forever)."""
    return ["serve", "--model", str(ws.root / "runs" / "none"), *extra]


def _dense_strip(ws: Workspace, dense_size: str) -> list[str]:
    """`predict --dense` of a 1280x64 strip: at a large --dense-size its resized frame is a multi-GB tensor."""
    strip = ws.root / "strip.png"
    Image.new("RGB", (1280, 64), (200, 40, 40)).save(strip)
    return ["predict", "--model", str(ws.trained_run()), str(strip), "--dense", "--dense-size", dense_size,
            "--out", str(ws.root / "maps"), "--device", "cpu"]


def _leaky(ws: Workspace) -> Path:
    """Issue 25: a train image copied into val, byte for byte."""
    data = ws.data()
    shutil.copy(sorted(data.glob("train/cat/*.png"))[0], data / "val" / "cat" / "copy.png")
    return data


def _flat(ws: Workspace) -> Path:
    """Issue 25: images lying in one folder, no class folders."""
    flat = ws.root / "flat"
    flat.mkdir()
    for path in sorted(ws.data().glob("train/*/*.png"))[:6]:
        shutil.copy(path, flat / f"{path.parent.name}_{path.name}")
    return flat


def _export(ws: Workspace, out: str, *extra: str) -> list[str]:
    return ["export", "--model", str(ws.trained_run()), "--out", out, *extra]


def _user_file(ws: Workspace, name: str) -> str:
    """Issue 24: a file of the user's that a command's --out must not replace."""
    path = ws.root / "mine" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("mine\n")
    return str(path)


def _audit(ws: Workspace, *extra: str, data: Path | None = None, out: Path | None = None) -> list[str]:
    return ["data", "audit", str(data or ws.data()), "--backbone", TINY_BACKBONE, "--weights", str(ws.weights),
            "--out", str(out or ws.root / "audit"), "--workers", "0", "--device", "cpu", "--no-track", *extra]


def _features_pooled(ws: Workspace, pool: str) -> str:
    out = ws.root / f"f-{pool}.parquet"
    _invoke(["extract", "--backbone", TINY_BACKBONE, "--weights", str(ws.weights), "--data", str(ws.data()),
             "--out", str(out), "--workers", "0", "--device", "cpu", "--pool", pool])
    return str(out)


def _sweep(ws: Workspace, *extra: str, spec: str = "", data: Path | None = None, track: bool = False) -> list[str]:
    """A one-backbone sweep of 1-epoch linear probes on a random init (no weights needed), folders in <tmp>."""
    path = ws.root / "sweep.yaml"
    path.write_text(f"backbones: [{TINY_BACKBONE}]\ntop_k: 1\nfixed: {{pretrained: false, img_size: 32, epochs: 1, "
                    "batch_size: 4, workers: 0, device: cpu, strategy: linear-probe, early_stopping: 0}\n" + spec)
    return ["sweep", "--data", str(data or ws.data()), "--space", str(path), "--out", str(ws.root / "sweeps"),
            *([] if track else ["--no-track"]), *extra]


def _swept(ws: Workspace) -> list[str]:
    """A finished sweep of study ``s`` in a sqlite study database; returns the options that name that study."""
    study = ["--storage", f"sqlite:///{ws.root / 'study.db'}", "--study", "s"]
    _invoke(_sweep(ws, *study))
    return study


def _used_study_folder(ws: Workspace) -> list[str]:
    folder = ws.root / "sweeps" / "s"
    (folder / "trial-000-test_efficientnet").mkdir(parents=True)
    (folder / "leaderboard.csv").write_text("trial,state\n0,COMPLETE\n")
    return _sweep(ws, "--study", "s")


def _study_on(ws: Workspace, data: str, *extra: str) -> list[str]:
    """Study ``s`` swept once on the case's data, then swept again on ``data``: other classes, or the same folder
    with a file added."""
    study = _swept(ws)
    if data == "other":
        other = ws.data("other", classes=("cat", "fox"), splits={"train": 8, "val": 4})
    else:
        other = ws.data()
        make_image(other / "train" / "cat" / "new.png", (200, 40, 40), seed=99)
    return [*_sweep(ws, data=other), *study, *extra]


# --------------------------------------------------------------------------- the cases

CASES = [
    # 1: svm never overwrites a model
    Case("svm-into-existing-model", "1", lambda ws: ["svm", "--features", str(ws.svm_model() / "features.parquet"),
                                                     "--out", str(ws.root / "svm"), "--no-track"], 2, ("svm",)),
    # 2: extract sees content changes
    Case("extract-after-same-size-edit", "2", lambda ws: _extract_after_edit(ws), 0, ("feats",)),
    # 3: blank labels
    Case("csv-blank-label-finetune", "3", lambda ws: ws.finetune(
        data=ws.csv_of_data([["train/cat/cat_1.png", ""]])), 2),
    Case("csv-blank-label-check", "3", lambda ws: ["data", "check", str(ws.csv_of_data([["train/dog/dog_1.png", " "]]))],
         2, ()),
    # 4: resume on changed data
    Case("resume-after-data-change", "4", lambda ws: ["finetune", "--resume", str(_resumable_after_data_change(ws))], 2),
    Case("resume-allow-data-change", "4", lambda ws: ["finetune", "--resume", str(_resumable_after_data_change(ws)),
                                                      "--allow-data-change"], 0),
    # 5: images that would exhaust memory
    Case("wide-60000x1-png", "5", lambda ws: ws.finetune(data=_wide_png(ws)), 2),
    Case("bomb-sized-png", "5", lambda ws: ws.finetune(data=_bomb_png(ws)), 2),
    # 6, 10: heads that are not what transferkit wrote
    Case("head-dummy-classifier", "6", lambda ws: _evaluate(ws, _head_replaced(ws, "dummy"), "--no-track"), 2, ("svm",)),
    Case("head-other-class-count", "10", lambda ws: _evaluate(ws, _head_replaced(ws, "classes"), "--no-track"), 2,
         ("svm",)),
    Case("head-other-feature-width", "10", lambda ws: _evaluate(ws, _head_replaced(ws, "width"), "--no-track"), 2,
         ("svm",)),
    Case("head-random-bytes", "10", lambda ws: _evaluate(ws, _head_replaced(ws, "random"), "--no-track"), 2, ("svm",)),
    Case("head-truncated", "10", lambda ws: _evaluate(ws, _head_replaced(ws, "truncated"), "--no-track"), 2, ("svm",)),
    # 7: corrupt training images, dead folders
    Case("corrupt-image", "7", lambda ws: ws.finetune(data=_corrupt(ws, "random")), 2),
    Case("corrupt-image-skip", "7", lambda ws: ws.finetune(
        "--recipe", _recipe(ws, "bad_images: skip\n"), data=_corrupt(ws, "random")), 0),
    Case("truncated-jpeg-with-workers", "7", lambda ws: [*ws.finetune(data=_corrupt(ws, "truncated-jpeg")),
                                                        "--workers", "1"], 2),
    Case("bad-aug-yaml", "7", lambda ws: ws.finetune("--aug", _bad_aug(ws)), 2),
    # 8: tracking store
    Case("finetune-unwritable-store", "8", lambda ws: ws.finetune("--tracking-uri", _unwritable_store(), track=True),
         2),
    Case("evaluate-unwritable-store", "8", lambda ws: _evaluate(ws, ws.trained_run(), "--tracking-uri",
                                                                _unwritable_store()), 2),
    Case("svm-unwritable-store", "8", lambda ws: ["svm", "--backbone", TINY_BACKBONE, "--weights", str(ws.weights),
                                                  "--data", str(ws.data()), "--out", str(ws.root / "svm"),
                                                  "--tracking-uri", _unwritable_store()], 2, ("svm",)),
    # 9: non-finite values
    Case("lr-nan", "9", lambda ws: ws.finetune("--lr", "nan"), 2),
    Case("lr-inf", "9", lambda ws: ws.finetune("--lr", "inf"), 2),
    Case("recipe-epochs-inf", "9", lambda ws: ws.finetune("--recipe", _recipe(ws, "epochs: .inf\n"), epochs=False), 2),
    Case("recipe-weight-decay-nan", "9", lambda ws: ws.finetune("--recipe", _recipe(ws, "weight_decay: .nan\n")), 2),
    Case("loss-nan-in-epoch-2-simulated", "9", lambda ws: ws.finetune("--epochs", "2"), 1,
         patch=lambda: _loss_nan_after(4)),
    # 10: malformed input
    Case("csv-extra-field", "10", lambda ws: ws.finetune(data=ws.csv_of_data([["train/cat/cat_1.png", "cat", "x"]])), 2),
    Case("name-with-slash", "10", lambda ws: ws.finetune(name="a/b"), 2),
    Case("name-dotdot", "10", lambda ws: ws.finetune(name="../x"), 2, ("runs", "x")),
    Case("name-absolute", "10", lambda ws: ws.finetune(name=str(ws.root / "abs")), 2, ("runs", "abs")),
    Case("svm-grid-not-a-number", "10", lambda ws: ["svm", "--features", str(_features(ws)), "--grid", "C=abc",
                                                   "--out", str(ws.root / "svm"), "--no-track"], 2, ("svm",)),
    Case("svm-grid-negative-c", "10", lambda ws: ["svm", "--features", str(_features(ws)), "--grid", "C=-1",
                                                 "--out", str(ws.root / "svm"), "--no-track"], 2, ("svm",)),
    # smaller
    Case("partial-99", "smaller", lambda ws: ws.finetune("--strategy", "partial:99"), 2),
    Case("csv-with-bom", "smaller", lambda ws: ["data", "check", str(ws.csv_of_data(bom=True))], 1, ()),
    Case("Train-beside-train", "smaller", lambda ws: ws.finetune(data=_two_split_folders(ws)), 2),
    Case("macosx-and-hidden-folders", "smaller", lambda ws: ["data", "check", str(_mac_zip_leftovers(ws))], 1, ()),
    Case("csv-same-file-two-labels", "smaller", lambda ws: ws.finetune(
        data=ws.csv_of_data([["train/cat/cat_1.png", "dog"]])), 2),
    Case("sigterm-during-finetune", "smaller", lambda ws: ws.finetune("--epochs", "3", track=True), 130,
         sigterm_after="epoch 2/3"),
    Case("sigterm-during-extract", "smaller", lambda ws: [
        "extract", "--backbone", TINY_BACKBONE, "--weights", str(ws.weights), "--out", str(ws.root / "feats" / "f.npz"),
        "--data", str(ws.data("many", classes=("cat", "dog"), per_class=100)), "--batch-size", "1", "--workers", "0"],
        130, ("feats",), sigterm_after="file:feats/.f.npz.*.tmp"),
    # earlier bad inputs (handled before issue 18), kept in the table so regressions show
    Case("data-path-missing", "earlier", lambda ws: ws.finetune(data=ws.root / "nope"), 2),
    Case("batch-larger-than-train", "earlier", lambda ws: ws.finetune("--batch-size", "100"), 2),
    Case("unknown-recipe-key", "earlier", lambda ws: ws.finetune("--recipe", _recipe(ws, "lrr: 0.1\n")), 2),
    Case("name-exists", "earlier", lambda ws: ws.finetune(name=ws.trained_run("r").name), 2),
    Case("resume-complete-run", "earlier", lambda ws: ["finetune", "--resume", str(ws.trained_run("r"))], 2),
    Case("pickle-weights", "earlier", lambda ws: ws.finetune("--weights", str(_pickle_weights(ws))), 2),
    # --- serve (24) ---
    Case("serve-max-upload-inf", "24", lambda ws: _serve(ws, "--max-upload-mb", "inf"), 2, ()),
    Case("serve-max-upload-1e308", "24", lambda ws: _serve(ws, "--max-upload-mb", "1e308"), 2, ()),
    Case("serve-allowed-host-url", "24", lambda ws: _serve(ws, "--allowed-host", "http://evil.example.com/"), 2, ()),
    Case("dense-size-3000", "24", lambda ws: _dense_strip(ws, "3000"), 2, ("maps",)),
    Case("dense-strip-resized-past-limit", "24", lambda ws: _dense_strip(ws, "1000"), 2, ("maps",)),
    # --- export/calibration/audit (24) ---
    Case("export-out-onto-own-checkpoint", "24", lambda ws: _export(ws, str(ws.root / "runs/done/best.safetensors")),
         2),
    Case("export-out-onto-model-metadata", "24", lambda ws: _export(ws, str(ws.root / "runs/done/best")), 2),
    Case("export-out-user-file-overwrite", "24", lambda ws: _export(ws, _user_file(ws, "notes.txt"), "--overwrite"),
         2, ("mine",)),
    Case("export-opset-13", "24", lambda ws: _export(ws, str(ws.root / "exports" / "m.onnx"), "--opset", "13"), 0,
         ("exports",)),
    Case("export-opset-99", "24", lambda ws: _export(ws, str(ws.root / "exports" / "m.onnx"), "--opset", "99"), 2,
         ("exports",)),
    Case("predict-out-onto-model-metadata", "24", lambda ws: [
        "predict", "--model", str(ws.trained_run()), str(ws.data() / "val"), "--out",
        str(ws.root / "runs/done/best.json"), "--workers", "0", "--device", "cpu"], 2),
    Case("evaluate-out-into-run-folder", "24", lambda ws: _evaluate(ws, ws.trained_run(), "--no-track", "--out",
                                                                    str(ws.root / "runs/done")), 2),
    Case("extract-out-user-parquet", "24", lambda ws: [
        "extract", "--backbone", TINY_BACKBONE, "--weights", str(ws.weights), "--data", str(ws.data()),
        "--out", _user_file(ws, "table.parquet"), "--workers", "0"], 2, ("mine",)),
    Case("calibration-2-val-images", "24", lambda ws: ws.finetune(
        data=ws.data("tiny-val", splits={"train": 8, "val": 1})), 0),
    Case("audit-features-other-pool", "24", lambda ws: _audit(ws, "--features", _features_pooled(ws, "max")), 2,
         ("audit",)),
    Case("audit-write-clean-unwritable", "24", lambda ws: _audit(
        ws, "--write-clean", "/proc/transferkit-test/clean.csv"), 2, ("audit",)),
    Case("audit-out-into-run-folder", "24", lambda ws: _audit(ws, out=ws.trained_run()), 2),
    Case("audit-one-image-per-class-per-split", "24", lambda ws: _audit(
        ws, data=ws.data("tiny", splits={"train": 1, "val": 1})), 0, ("audit",)),
    Case("lr-find-plot-unwritable", "24", lambda ws: [
        "lr-find", "--backbone", TINY_BACKBONE, "--weights", str(ws.weights), "--data", str(ws.data()),
        "--plot", "/proc/transferkit-test/lr.png"], 2, ()),
    Case("lr-find-plot-onto-checkpoint", "24", lambda ws: [
        "lr-find", "--backbone", TINY_BACKBONE, "--weights", str(ws.weights), "--data", str(ws.data()),
        "--plot", str(ws.trained_run() / "best.safetensors")], 2),
    # --- first contact (25) ---
    Case("leakage-train-val", "25", lambda ws: ws.finetune(data=_leaky(ws)), 2),
    Case("leakage-allowed", "25", lambda ws: ws.finetune("--allow-leakage", data=_leaky(ws)), 0),
    Case("data-single-image", "25", lambda ws: ws.finetune(data=sorted(ws.data().glob("train/cat/*.png"))[0]), 2),
    Case("data-flat-folder", "25", lambda ws: ws.finetune(data=_flat(ws)), 2),
    Case("key-value-typo", "25", lambda ws: ws.finetune("epoch=2"), 2),
    # --- dashboard (25) ---
    Case("ui-port-out-of-range", "25", lambda ws: ["ui", "--port", "70000"], 2, ()),
    Case("augment-preview-0-samples", "25", lambda ws: [
        "augment", "preview", "--data", str(ws.data()), "-n", "0", "--out", str(ws.root / "p.png"),
        "--backbone", TINY_BACKBONE, "--weights", str(ws.weights)], 2, ()),
    # --- sweep (24) ---
    Case("sweep-file-top-k-abc", "24", lambda ws: _sweep(ws, spec="top_k: abc\n"), 2, ("sweeps",)),
    Case("sweep-file-trials-abc", "24", lambda ws: _sweep(ws, spec="trials: abc\n"), 2, ("sweeps",)),
    Case("sweep-top-k-0", "24", lambda ws: _sweep(ws, "--top-k", "0"), 2, ("sweeps",)),
    Case("sweep-study-dotdot", "24", lambda ws: _sweep(ws, "--study", "../x"), 2, ("sweeps", "x")),
    Case("sweep-study-absolute", "24", lambda ws: _sweep(ws, "--study", str(ws.root / "abs")), 2, ("sweeps", "abs")),
    Case("sweep-study-folder-in-use", "24", _used_study_folder, 2, ("sweeps",)),
    Case("sweep-study-on-other-data", "24", lambda ws: _study_on(ws, "other"), 2, ("sweeps",), slow=True),
    Case("sweep-study-on-changed-data", "24", lambda ws: _study_on(ws, "changed"), 2, ("sweeps",), slow=True),
    Case("sweep-study-changed-data-allowed", "24", lambda ws: _study_on(ws, "changed", "--allow-data-change"), 0,
         ("sweeps",), slow=True),
    Case("sweep-storage-password", "24", lambda ws: _sweep(
        ws, "--storage", "postgresql+nosuchdriver://optuna:s3cret@127.0.0.1:1/db"), 2, ("sweeps",), slow=True),
    Case("sweep-tracking-uri-password", "24", lambda ws: _sweep(
        ws, "--tracking-uri", "http://admin:s3cret@127.0.0.1:1", track=True), 2, ("sweeps",)),
    # --- sweep speaks finetune's language (25) ---
    Case("sweep-flag-batch-size-0", "25", lambda ws: _sweep(ws, "--batch-size", "0"), 2, ("sweeps",)),
    Case("sweep-setting-typo", "25", lambda ws: _sweep(ws, "epoch=2"), 2, ("sweeps",)),
    Case("sweep-setting-bad-lr", "25", lambda ws: _sweep(ws, "lr=-1"), 2, ("sweeps",)),
    Case("sweep-fixed-and-searched", "25", lambda ws: _sweep(ws, "--strategy", "full", "--strategies", "full"), 2,
         ("sweeps",)),
    Case("sweep-ensemble-1", "25", lambda ws: _sweep(ws, "--ensemble", "1"), 2, ("sweeps",)),
]


def _extract_after_edit(ws: Workspace) -> list[str]:
    from click.testing import CliRunner

    from transferkit.cli import main

    data = ws.data()
    image = data / "train" / "cat" / "cat_0.bmp"
    make_image(image, (200, 40, 40), fmt="BMP")
    args = ["extract", "--backbone", TINY_BACKBONE, "--weights", str(ws.weights), "--data", str(data),
            "--out", str(ws.root / "feats" / "f.parquet"), "--workers", "0", "--device", "cpu"]
    assert CliRunner().invoke(main, args).exit_code == 0
    make_image(image, (40, 200, 40), seed=5, fmt="BMP")  # same size, other pixels
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))
    return args


@contextlib.contextmanager
def _loss_nan_after(calls: int):
    """The training loss turns NaN after ``calls`` batches (4 = one epoch of the cases' 16 images at batch 4)."""
    import torch

    original = torch.nn.CrossEntropyLoss.forward
    count = [0]

    def forward(self, *args):
        count[0] += 1
        loss = original(self, *args)
        return loss * float("nan") if count[0] > calls else loss

    torch.nn.CrossEntropyLoss.forward = forward
    try:
        yield
    finally:
        torch.nn.CrossEntropyLoss.forward = original


def _features(ws: Workspace) -> Path:
    from click.testing import CliRunner

    from transferkit.cli import main

    out = ws.root / "f.parquet"
    result = CliRunner().invoke(main, ["extract", "--backbone", TINY_BACKBONE, "--weights", str(ws.weights),
                                       "--data", str(ws.data()), "--out", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    return out


def _pickle_weights(ws: Workspace) -> Path:
    import pickle

    path = ws.root / "evil.pth"
    path.write_bytes(pickle.dumps({"x": os.getcwd}))
    return path


# --------------------------------------------------------------------------- running and reporting


def run_case(case: Case, root: Path, weights: Path) -> dict:
    """Run ``case`` in ``root`` (a fresh folder); returns its table row as a dict."""
    ws = Workspace(root, weights)
    args = case.setup(ws)
    store = root / "mlflow" / "mlflow.db"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    if case.sigterm_after:
        code, stderr = _run_with_sigterm(args, case.sigterm_after, env, root)
        stdout = ""
    else:
        with case.patch() if case.patch else contextlib.nullcontext():
            code, stdout, stderr = _run_in_process(args, env)
    message = _message(stdout, stderr)
    if store.exists():
        message += f" / MLflow run {_last_run_status(store)}"
    return {"case": case.id, "issue": case.issue, "command": _shown(args, root, weights), "exit": str(code),
            "message": _shown(message, root, weights), "left on disk": _leftovers(root, case.watch)}


def _message(stdout: str, stderr: str) -> str:
    """What the command said about the case: its notices (the --resume hint, warnings, skips) and error line;
    `data check`'s findings; else the last line of its output."""
    said = [line for line in stderr.splitlines() if line.startswith(NOTICE_PREFIXES)]
    findings = [line for line in stdout.splitlines() if line.startswith(("ERROR", "WARNING"))]
    return " / ".join(said or findings or stdout.strip().splitlines()[-1:])


def _run_in_process(args: list[str], env: dict) -> tuple[int, str, str]:
    from click.testing import CliRunner

    from transferkit.cli import main

    result = CliRunner().invoke(main, args, env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is a bug the case must show, not a row
    return result.exit_code, result.stdout, result.stderr


def _run_with_sigterm(args: list[str], wait_for: str, env: dict, root: Path) -> tuple[int, str]:
    log = root / "stderr.log"
    with open(log, "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "transferkit", *args], stderr=err, text=True,
                                   env={**os.environ, **env}, cwd=root)
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            if (list(root.glob(wait_for[5:])) if wait_for.startswith("file:") else wait_for in log.read_text()):
                process.send_signal(signal.SIGTERM)
                break
            time.sleep(0.01)
        code = process.wait(timeout=120)
    # A SIGTERM that lands inside an eval() during a lazy import (namedtuple does one) makes CPython 3.11 end the
    # process by re-raising SIGINT after our handler has printed "interrupted" and exited 130; a shell reports
    # both as 130 (128 + SIGINT), so the table does too.
    if code == -signal.SIGINT:
        code = 128 + signal.SIGINT
    text = log.read_text()
    log.unlink()
    return code, text


def _last_run_status(store: Path) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time DESC"])
    return runs[0].info.status if runs else "none"


def _leftovers(root: Path, watch: tuple[str, ...]) -> str:
    """Each watched folder: absent, empty, or its entries; run folders as complete / resumable / unfinished."""
    parts = []
    for name in watch:
        folder = root / name
        if not folder.exists():
            parts.append(f"no {name}/")
            continue
        tmp = [p.name for p in folder.rglob("*.tmp")]
        entries = sorted(folder.iterdir())
        if not entries:
            parts.append(f"{name}/ empty")
        for entry in entries:
            parts.append(f"{name}/{entry.name}{_kind(entry)}")
        if tmp:
            parts.append(f"{len(tmp)} .tmp files")
    return "; ".join(parts)


def _kind(entry: Path) -> str:
    if not entry.is_dir():
        return ""
    names = {p.name for p in entry.iterdir()}
    if "result.json" in names:
        return " (complete run)"
    if "resume.pt" in names:
        return " (resumable run)"
    if "model.safetensors" in names:
        return " (model: " + ", ".join(sorted(n for n in names if not n.startswith("."))) + ")"
    return "/ (" + ", ".join(sorted(names)) + ")" if names else "/ (empty)"


def _shown(value, root: Path, weights: Path) -> str:
    text = " ".join(value) if isinstance(value, list) else str(value)
    text = text.replace(str(weights), "WEIGHTS").replace(str(root), "<tmp>")
    text = re.sub(r"\[\d+\.\ds\]", "[…s]", text)  # timings
    text = re.sub(r"\b[0-9a-f]{32}\b", "<run id>", text)
    text = re.sub(r"\d{8}-\d{6}", "<time>", text)
    return text.replace("|", "\\|")


def render(rows: list[dict]) -> str:
    out = io.StringIO()
    out.write(TABLE_INTRO)
    out.write("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER) + "\n")
    for row in rows:
        cells = [f"`{row['command']}`" if key == "command" else row[key] for key in HEADER]
        out.write("| " + " | ".join(cells) + " |\n")
    return out.getvalue()


def parse(markdown: str) -> dict[str, dict]:
    """The doc's rows by case id (the inverse of :func:`render`)."""
    rows = {}
    for line in markdown.splitlines():
        if not line.startswith("| ") or line.startswith("| case |"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        row = dict(zip(HEADER, cells))
        row["command"] = row["command"].strip("`")
        row = {k: v.replace("|", "\\|") if k in ("command", "message") else v for k, v in row.items()}
        rows[row["case"]] = row
    return rows


TABLE_INTRO = """# Reliability: what transferkit does with bad input

Generated by `bench/reliability_table.py` from the cases in `tests/reliability_cases.py`; do not edit by hand.
`tests/test_reliability_table.py` runs every case and fails if a row here differs from what the command does now.
Each case runs in a fresh folder (`<tmp>`) on tiny generated images and the tiny `test_efficientnet`
(`WEIGHTS`); `issue` is the item of issue 18 it covers (`earlier`: refused before issue 18). Exit codes:
0 done, 1 a run that failed (or `data check` warnings), 2 bad input, 130 interrupted.

"""

