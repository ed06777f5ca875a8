"""Bad input that a row of docs/reliability.md cannot show: an in-place edit the data fingerprint must see,
hidden and macOS folders, a BOM in a labels CSV, PIL's bomb warning, a loader worker's decode error, non-finite
settings and an unwritable tracking store."""

from __future__ import annotations

import os
import warnings

import pytest
from conftest import make_dataset, make_image
from PIL import Image

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


@pytest.mark.parametrize("key,value", [("lr", float("nan")), ("lr", float("inf")), ("epochs", float("inf")),
                                       ("weight_decay", float("nan")), ("grad_clip", float("-inf"))])
def test_non_finite_values_are_refused(key, value):
    from transferkit.train.config import resolve_config

    with pytest.raises(TransferkitError, match=f"bad value for {key}: .*finite"):
        resolve_config(overrides={key: value})


@pytest.mark.slow
def test_unwritable_tracking_store_is_named(tmp_path):
    from transferkit.tracking.store import check_tracking_store

    assert check_tracking_store(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}").endswith("mlflow.db")
    for uri in ("sqlite:////proc/x/mlflow.db", "/proc/mlruns", "file:///proc/1/mlruns"):
        with pytest.raises(TransferkitError, match="is not writable"):
            check_tracking_store(uri)
