"""Dataset discovery, decoding of awkward files, and `transferkit data check`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import CLASS_COLOURS, SHARED_ROADS, make_dataset, make_image, requires_shared_roads
from PIL import Image

from transferkit.cli import main
from transferkit.data import ImageDecodeError, discover, load_image
from transferkit.data import decode as decode_module
from transferkit.errors import TransferkitError

# -- discovery ---------------------------------------------------------------------------------------------


def test_class_folders_get_a_stratified_seeded_val_split(tiny_data3):
    first = discover(tiny_data3, val_ratio=0.34, seed=7)
    again = discover(tiny_data3, val_ratio=0.34, seed=7)
    other = discover(tiny_data3, val_ratio=0.34, seed=8)
    assert first.layout == "class-folders" and first.classes == ["cat", "dog", "fox"]
    assert first.records() == again.records()
    assert first.records() != other.records()
    assert first.counts()["val"] == {"cat": 2, "dog": 2, "fox": 2}
    assert first.counts()["train"] == {"cat": 4, "dog": 4, "fox": 4}
    assert first.val_from_train


def test_split_folders_with_aliases(tmp_path):
    root = make_dataset(tmp_path / "d", splits={"train": 3, "validation": 2, "test": 1})
    index = discover(root)
    assert index.layout == "split-folders" and index.splits == ["train", "val", "test"]
    assert index.counts()["test"] == {"cat": 1, "dog": 1}
    assert not index.val_from_train


def test_csv_layout_with_relative_paths_and_splits(tmp_path):
    make_dataset(tmp_path / "imgs", per_class=3)
    rows = ["path,label,split"] + [f"imgs/{c}/{c}_{i}.png,{c},{'val' if i == 0 else 'train'}"
                                   for c in ("cat", "dog") for i in range(3)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    index = discover(tmp_path / "labels.csv")
    assert index.layout == "csv" and index.counts() == {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dog": 1}}


def test_extensions_are_case_insensitive(tmp_path):
    for cls in ("a", "b"):
        make_image(tmp_path / cls / "x.JPG", (10, 20, 30), fmt="JPEG")
        make_image(tmp_path / cls / "y.Png", (10, 20, 30), fmt="PNG")
        (tmp_path / cls / "notes.txt").write_text("not an image")
    assert len(discover(tmp_path, val_ratio=0).samples) == 4


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no images found"),
        (lambda p: make_dataset(p / "one", classes=("cat",)), "at least 2"),
        (lambda p: _with_empty_class(make_dataset(p / "d")), "without images"),
        (lambda p: make_dataset(p / "s", splits={"train": 2, "val": 1}, classes=("cat", "dog")) and
         shutil.rmtree(p / "s" / "val" / "dog") or p / "s", "differ between train and val"),
        (lambda p: _csv(p, "path,label,weight\n"), "unknown: weight"),
        (lambda p: _csv(p, "path,label\nnope.png,cat\n"), "missing files"),
    ],
    ids=["missing", "empty", "one-class", "empty-class", "split-classes", "csv-columns", "csv-missing"],
)
def test_bad_datasets_give_one_line_errors(tmp_path, build, message):
    with pytest.raises(TransferkitError, match=message) as err:
        discover(build(tmp_path))
    assert "\n" not in str(err.value)


def _with_empty_class(root):
    (root / "zebra").mkdir()
    return root


def _csv(root, text):
    (root / "l.csv").write_text(text)
    return root / "l.csv"


# -- decoding ----------------------------------------------------------------------------------------------


def test_awkward_modes_become_rgb(tmp_path):
    rgb = np.full((12, 16, 3), (200, 100, 50), np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    rgba = np.dstack([rgb, np.zeros((12, 16), np.uint8)])  # fully transparent → white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(np.full((12, 16), 65535, np.uint16)).save(tmp_path / "deep.png")
    for name in ("cmyk.jpg", "rgba.png", "gray.png", "palette.png", "deep.png"):
        arr = load_image(tmp_path / name)
        assert arr.shape == (12, 16, 3) and arr.dtype == np.uint8, name
    assert (load_image(tmp_path / "rgba.png") == 255).all()
    assert (load_image(tmp_path / "deep.png") == 255).all()
    assert np.abs(load_image(tmp_path / "cmyk.jpg").astype(int) - rgb).max() < 40


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").shape == (30, 10, 3)


def test_corrupt_truncated_and_bomb_files_are_refused(tmp_path, monkeypatch):
    (tmp_path / "junk.jpg").write_bytes(b"not a jpeg at all")
    good = make_image(tmp_path / "good.jpg", (1, 2, 3), size=(64, 64), fmt="JPEG")
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:300])
    for name in ("junk.jpg", "cut.jpg"):
        with pytest.raises(ImageDecodeError, match="cannot decode"):
            load_image(tmp_path / name)
    monkeypatch.setattr(decode_module, "MAX_PIXELS", 64 * 63)
    with pytest.raises(ImageDecodeError, match="decompression-bomb"):
        load_image(good)


def test_draft_decode_keeps_enough_pixels(tmp_path):
    big = make_image(tmp_path / "big.jpg", (90, 120, 30), size=(1280, 960), fmt="JPEG")
    assert load_image(big).shape == (960, 1280, 3)
    small = load_image(big, min_short_side=256)
    assert small.shape == (480, 640, 3)  # 1/2 DCT scale; 1/4 would drop under 256


# -- data check --------------------------------------------------------------------------------------------


def test_data_check_clean_dataset_exits_0(runner, tiny_data):
    result = runner.invoke(main, ["data", "check", str(tiny_data), "--img-size", "64"])
    assert result.exit_code == 0, result.output
    assert "clean" in result.output and "cat" in result.output


def test_data_check_reports_leakage_corruption_and_duplicates(runner, tiny_data):
    leaked = tiny_data / "train" / "cat" / "cat_0.png"
    shutil.copy(leaked, tiny_data / "val" / "cat" / "leak.png")
    shutil.copy(tiny_data / "train" / "dog" / "dog_0.png", tiny_data / "train" / "cat" / "wrong_label.png")
    (tiny_data / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = runner.invoke(main, ["data", "check", str(tiny_data), "--json", "--img-size", "64"])
    assert result.exit_code == 2
    report = json.loads(result.output)
    kinds = sorted(d["kind"] for d in report["duplicates"])
    assert kinds == ["cross-class", "cross-split"]
    assert [u["path"] for u in report["unreadable"]] == ["train/dog/broken.png"]
    assert report["counts"]["val"]["cat"] == 5


def test_data_check_warnings_exit_1(runner, tmp_path):
    root = make_dataset(tmp_path / "d", splits={"train": 2, "val": 1}, size=(40, 40))
    for i in range(8):  # imbalance 10:2 and tiny images for a 224 px backbone
        make_image(root / "train" / "cat" / f"extra{i}.png", CLASS_COLOURS["cat"], size=(40, 40), seed=100 + i)
    result = runner.invoke(main, ["data", "check", str(root)])
    assert result.exit_code == 1, result.output
    assert "imbalance 5.0:1" in result.output and "much smaller" in result.output


def test_data_check_missing_path_is_one_line_error(runner, tmp_path):
    result = runner.invoke(main, ["data", "check", str(tmp_path / "nope")])
    assert result.exit_code == 2 and result.output.strip().startswith("error:")
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.integration
@requires_shared_roads
def test_data_check_on_real_roads(runner):
    result = runner.invoke(main, ["data", "check", str(SHARED_ROADS), "--json"])
    report = json.loads(result.output)
    assert result.exit_code == 0, report["errors"] + report["warnings"]
    assert report["counts"] == {"train": {"paved": 45, "unpaved": 22}, "val": {"paved": 15, "unpaved": 7}}
