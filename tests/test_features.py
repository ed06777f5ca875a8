"""Feature extraction: the vectors, the file formats, streaming, reuse, and the `extract` command."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY_BACKBONE, TINY_IMG, extract_tiny, make_image

from transferkit.cli import main
from transferkit.core.fileio import sha256_file
from transferkit.data import discover
from transferkit.errors import TransferkitError
from transferkit.features.extract import compute_features
from transferkit.features.feature_file import (
    _NpzSink,
    feature_identity_mismatch,
    read_features,
    read_metadata,
)
from transferkit.models.embedding import build_feature_model, embed


def _preprocessed(paths, preprocessing):
    from transferkit.data.decode import load_image

    transform = preprocessing.eval_transform()
    return torch.stack([transform(load_image(p)) for p in paths])


def test_parquet_schema_metadata_and_vectors(tiny_data, tiny_weights, tmp_path):
    out = extract_tiny(tiny_data, tiny_weights, tmp_path / "f.parquet")
    schema = pq.read_schema(out)
    assert schema.names == ["path", "label", "label_index", "split", "features"]
    features_type = schema.field("features").type
    assert (features_type.list_size, str(features_type.value_type)) == (256, "float")
    table, meta = read_features(out)
    index = discover(tiny_data)
    assert meta["backbone"] == TINY_BACKBONE
    assert meta["weights"] == f"sha256:{sha256_file(tiny_weights)}"
    assert meta["preprocessing"]["input_size"] == [3, TINY_IMG, TINY_IMG]
    assert (meta["pool"], meta["feature_dim"], meta["dtype"], meta["class_names"]) == ("avg", 256, "float32", ["cat", "dog"])
    assert meta["dataset"]["fingerprint"] == index.fingerprint() and meta["transferkit_version"]
    assert list(table.paths) == [index.relpath(s) for s in index.samples]
    assert list(table.labels[:8]) == ["cat"] * 8 and set(table.splits) == {"train", "val"}
    assert table.vectors.shape == (24, 256) and table.vectors.dtype == np.float32
    # the vectors are timm's own pre-logits features of the eval-preprocessed image
    model, preprocessing = build_feature_model(TINY_BACKBONE, weights=tiny_weights)
    with torch.inference_mode():
        expected = model.eval()(_preprocessed([tiny_data / table.paths[i] for i in (0, 23)], preprocessing))
    np.testing.assert_allclose(table.vectors[[0, 23]], expected.numpy(), rtol=1e-4, atol=1e-5)


def test_compute_features_is_the_same_loop_in_memory(tiny_data, tiny_weights, tmp_path):
    from transferkit.data.dataset import ImageDataset, make_loader
    table, _ = read_features(extract_tiny(tiny_data, tiny_weights, tmp_path / "f.parquet", batch_size=32))
    model, preprocessing = build_feature_model(TINY_BACKBONE, weights=tiny_weights)
    model.train()
    loader = make_loader(ImageDataset([tiny_data / p for p in table.paths], list(table.label_index),
                                      preprocessing.eval_transform()), 32, workers=0)
    vectors, labels = compute_features(model, loader, torch.device("cpu"))
    assert model.training, "the caller's train/eval mode is restored"
    np.testing.assert_array_equal(vectors, table.vectors)
    np.testing.assert_array_equal(labels, table.label_index)


def test_chunks_are_written_as_they_come(tiny_data, tiny_weights, tmp_path, monkeypatch):
    out = extract_tiny(tiny_data, tiny_weights, tmp_path / "f.parquet", batch_size=4, chunk_rows=5)
    row_groups = [pq.ParquetFile(out).metadata.row_group(i).num_rows for i in range(pq.ParquetFile(out).num_row_groups)]
    assert row_groups == [8, 8, 8]  # two batches of 4 reach 5 rows, then a row group is written
    writes = []
    original = _NpzSink._write
    monkeypatch.setattr(_NpzSink, "_write", lambda self, rows, vectors: writes.append(len(vectors)) or original(self, rows, vectors))
    npz = extract_tiny(tiny_data, tiny_weights, tmp_path / "f.npz", batch_size=4, chunk_rows=5)
    assert writes == [8, 8, 8]
    np.testing.assert_array_equal(read_features(npz)[0].vectors, read_features(out)[0].vectors)


def test_npz_and_parquet_hold_the_same_rows(tiny_data3, tiny_weights, tmp_path):
    a, meta_a = read_features(extract_tiny(tiny_data3, tiny_weights, tmp_path / "f.parquet", batch_size=7))
    b, meta_b = read_features(extract_tiny(tiny_data3, tiny_weights, tmp_path / "f.npz", batch_size=7))
    assert meta_a == meta_b
    for name in ("paths", "labels", "label_index", "splits", "vectors"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert set(a.splits) == {"train", "val"}  # val carved from class folders


def test_reuse_force_and_invalidation(tiny_data, tiny_weights, tmp_path):
    out = extract_tiny(tiny_data, tiny_weights, tmp_path / "f.parquet")
    stamp = out.stat().st_mtime_ns
    extract_tiny(tiny_data, tiny_weights, out)
    assert out.stat().st_mtime_ns == stamp, "up-to-date output is reused"
    extract_tiny(tiny_data, tiny_weights, out, force=True)
    assert out.stat().st_mtime_ns != stamp
    stamp = out.stat().st_mtime_ns
    extract_tiny(tiny_data, tiny_weights, out, pool="max")
    assert out.stat().st_mtime_ns != stamp and read_metadata(out)["pool"] == "max"
    make_image(tiny_data / "val" / "dog" / "new.png", (40, 200, 40), seed=99)
    extract_tiny(tiny_data, tiny_weights, out, pool="max")
    assert read_metadata(out)["rows"] == 25, "a changed dataset is re-extracted"
    assert not list(tmp_path.glob(".f.parquet*")), "no temp files left behind"


def test_split_pooling_layer_and_dtype(tiny_data, tiny_weights, tmp_path):
    val, _ = read_features(extract_tiny(tiny_data, tiny_weights, tmp_path / "v.parquet", split="val"))
    assert len(val) == 8 and set(val.splits) == {"val"}
    avg, _ = read_features(extract_tiny(tiny_data, tiny_weights, tmp_path / "a.parquet"))
    mx, _ = read_features(extract_tiny(tiny_data, tiny_weights, tmp_path / "m.parquet", pool="max"))
    assert mx.vectors.shape == avg.vectors.shape and not np.allclose(mx.vectors, avg.vectors)
    assert (mx.vectors >= avg.vectors - 1e-5).all(), "max pooling is never below average pooling"
    mid, meta = read_features(extract_tiny(tiny_data, tiny_weights, tmp_path / "l.parquet", layer="blocks.2"))
    assert mid.vectors.shape == (24, 32) and meta["layer"] == "blocks.2"  # feature_info: blocks.2 has 32 channels
    half, meta = read_features(extract_tiny(tiny_data, tiny_weights, tmp_path / "h.npz", dtype="float16"))
    assert meta["dtype"] == "float16"
    np.testing.assert_allclose(half.vectors, avg.vectors, rtol=2e-3, atol=2e-3)


def test_hflip_tta_makes_vectors_mirror_invariant(tiny_weights):
    model, _ = build_feature_model(TINY_BACKBONE, weights=tiny_weights)
    batch = torch.randn(2, 3, TINY_IMG, TINY_IMG)
    with torch.inference_mode():
        plain = embed(model.eval(), batch), embed(model, batch.flip(-1))
        tta = embed(model, batch, tta="hflip"), embed(model, batch.flip(-1), tta="hflip")
    assert not torch.allclose(*plain, atol=1e-4)
    torch.testing.assert_close(*tta, rtol=1e-4, atol=1e-5)


def test_vit_token_and_avg_pooling():
    model, _ = build_feature_model("test_vit", pretrained=False)
    batch = torch.randn(1, 3, *model.pretrained_cfg["input_size"][1:])
    with torch.inference_mode():
        token, avg = embed(model.eval(), batch, pool="token"), embed(model, batch, pool="avg")
    assert token.shape == avg.shape == (1, model.num_features) and not torch.allclose(token, avg)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"split": "test"}, "split 'test'"),
    ({"pool": "token"}, "class token"),
    ({"pool": "median"}, "unknown pool"),
    ({"layer": "blocks.99"}, "unknown layer"),
    ({"out_name": "f.csv"}, ".parquet or .npz"),
])
def test_bad_inputs_are_one_line_errors(tiny_data, tiny_weights, tmp_path, kwargs, message):
    out = tmp_path / kwargs.pop("out_name", "f.parquet")
    with pytest.raises(TransferkitError, match=message):
        extract_tiny(tiny_data, tiny_weights, out, **kwargs)
    assert not out.exists()


def test_read_features_refuses_foreign_files(tmp_path):
    foreign = tmp_path / "x.npz"
    np.savez(foreign, features=np.zeros((2, 3)))
    with pytest.raises(TransferkitError, match="not written by `transferkit extract`"):
        read_features(foreign)
    with pytest.raises(TransferkitError, match="does not exist"):
        read_features(tmp_path / "missing.parquet")


def test_extract_cli(runner, tiny_data, tiny_weights, tmp_path):
    out = tmp_path / "f.npz"
    args = ["extract", "--backbone", TINY_BACKBONE, "--weights", str(tiny_weights), "--data", str(tiny_data),
            "--out", str(out), "--workers", "0", "--device", "cpu", "--tta", "hflip"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "24 images x 256 features" in result.output
    assert read_metadata(out)["tta"] == "hflip"
    result = runner.invoke(main, [*args[:-6], "--split", "test"])
    assert result.exit_code == 2 and "error: split 'test'" in result.output


def test_feature_identity_ignores_key_order_and_tuples_but_not_values():
    """Stored metadata is JSON: the same mapping in another key order, or a tuple read back as a list, is the same."""
    stored = {"backbone": "resnet18", "model_kwargs": {"drop_rate": 0.1, "in_chans": 3}, "pool": "avg",
              "preprocessing": {"mean": [0.5, 0.5, 0.5], "input_size": [3, 224, 224]}}
    expected = {"pool": "avg", "model_kwargs": {"in_chans": 3, "drop_rate": 0.1}, "backbone": "resnet18",
                "preprocessing": {"input_size": (3, 224, 224), "mean": (0.5, 0.5, 0.5)}}
    assert feature_identity_mismatch(stored, expected) == []
    assert feature_identity_mismatch(stored, {**expected, "pool": "max", "layer": "blocks.3"}) == ["pool", "layer"]
