"""`transferkit data audit`: near-duplicates, label issues and outliers; reuse and refusal of features files.

The ranking logic is tested on synthetic vectors (a random-init tiny backbone gives no meaningful label
geometry); the CLI end to end on tiny generated images whose block patterns the tiny backbone tells apart.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASS_COLOURS, TINY_BACKBONE, extract_tiny
from PIL import Image

from transferkit.cli import main
from transferkit.features.label_issues import find_label_suspects, outlier_cutoff, outlier_scores
from transferkit.features.neighbours import duplicate_groups, nearest_neighbours

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pattern_image(path: Path, colour, seed: int) -> Path:
    """A 6x6 grid of random blends of the class colour, upscaled: one class colour, a distinct layout each."""
    rng = np.random.default_rng(seed)
    weight = rng.random((6, 6, 1))
    grid = weight * np.array(colour) + (1 - weight) * 0.3 * rng.integers(0, 255, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.astype(np.uint8)).resize((48, 48), Image.BILINEAR).save(path)
    return path


@pytest.fixture
def patterns(tmp_path) -> Path:
    """train 8 / val 4 images per class, cat/dog/fox; no duplicates, no wrong labels."""
    seed = 0
    for split, count in (("train", 8), ("val", 4)):
        for name in ("cat", "dog", "fox"):
            for i in range(count):
                pattern_image(tmp_path / "patterns" / split / name / f"{name}_{i}.png", CLASS_COLOURS[name], seed)
                seed += 1
    return tmp_path / "patterns"


def plant(data: Path) -> dict:
    """A resized JPEG copy of a train image in val (leakage), and a cat image filed under dog (label error)."""
    source = data / "train" / "cat" / "cat_0.png"
    with Image.open(source) as image:
        image.resize((38, 38)).save(data / "val" / "cat" / "cat_0_copy.jpg", quality=70)
    shutil.move(data / "train" / "cat" / "cat_3.png", data / "train" / "dog" / "cat_3.png")
    return {"pair": {"train/cat/cat_0.png", "val/cat/cat_0_copy.jpg"}, "flipped": "train/dog/cat_3.png"}


def audit_cli(runner, data, weights, out, *args):
    return runner.invoke(main, ["data", "audit", str(data), "--backbone", TINY_BACKBONE, "--weights", str(weights),
                                "--out", str(out), "--workers", "0", "--device", "cpu", *args])


# --------------------------------------------------------------------------- the methods, on vectors


def test_near_duplicate_pairs_are_the_same_in_blocks_and_grouped_by_component():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 16)).astype(np.float32)
    vectors[10] = vectors[3] + 0.01 * rng.normal(size=16)  # 3-10-20 chain into one group
    vectors[20] = vectors[10] + 0.01 * rng.normal(size=16)
    vectors[40] = vectors[7] + 0.01 * rng.normal(size=16)
    whole = nearest_neighbours(vectors, k=3, threshold=0.99)
    blocked = nearest_neighbours(vectors, k=3, threshold=0.99, block_bytes=4 * 50 * 7)  # 7 rows per block
    assert {tuple(p) for p in whole.pairs} == {tuple(p) for p in blocked.pairs} == {(3, 10), (3, 20), (10, 20), (7, 40)}
    np.testing.assert_array_equal(whole.indices, blocked.indices)
    assert whole.indices[3, 0] in (10, 20) and 3 not in whole.indices[3]  # never its own neighbour
    groups = duplicate_groups(50, whole.pairs, whole.pair_similarities)
    assert [g["members"] for g in groups] == [[3, 10, 20], [7, 40]]
    assert all(0.99 <= g["min_similarity"] <= g["max_similarity"] <= 1.0 + 1e-6 for g in groups)


def test_flipped_labels_rank_first_with_their_true_class_suggested():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 32)) * 3
    true = np.repeat(np.arange(3), 40)
    vectors = centres[true] + rng.normal(size=(120, 32))
    given = true.copy()
    flipped = np.array([5, 47, 90, 110])
    given[flipped] = (true[flipped] + 1) % 3
    issues = find_label_suspects(vectors, given, 3)
    assert set(issues.ranked[:len(flipped)]) == set(flipped)
    np.testing.assert_array_equal(issues.suggested[flipped], true[flipped])
    assert issues.quality[flipped].max() < np.delete(issues.quality, flipped).min()


def test_only_the_far_vector_is_an_outlier():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(200, 8)) * 0.1 + 1.0
    vectors[17] = -np.ones(8)
    scores = outlier_scores(nearest_neighbours(vectors, k=10, threshold=1.0).similarities)
    assert np.flatnonzero(scores > outlier_cutoff(scores)).tolist() == [17]


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_audit_finds_planted_leakage_and_label_error_and_writes_a_clean_csv(runner, patterns, tiny_weights,
                                                                            tmp_path):
    from mlflow import MlflowClient

    from transferkit.data.discover import discover

    planted = plant(patterns)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    clean = tmp_path / "lists" / "clean.csv"
    result = audit_cli(runner, patterns, tiny_weights, tmp_path / "audit", "--write-clean", str(clean),
                       "--tracking-uri", store)
    assert result.exit_code == 1, result.output
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    leakage = [{f["path"] for f in g["files"]} for g in report["near_duplicates"] if g["leakage"]]
    assert leakage == [planted["pair"]]
    assert report["near_duplicates"][0]["max_pixel_similarity"] >= 0.99
    assert [(s["path"], s["label"], s["suggested"]) for s in report["label_issues"]] == [
        (planted["flipped"], "dog", "cat")]
    assert report["outliers"] == [] and report["exit_code"] == 1
    for name in ("embedding_map.png", "gallery.png", "features.parquet"):
        assert (tmp_path / "audit" / name).stat().st_size > 0
    assert "leakage" in result.output and "dog -> cat" in result.output

    rows = list(csv.DictReader(clean.open()))
    paths = {Path(r["path"]).as_posix() for r in rows}
    assert len(rows) == 36 + 1 - 2  # 36 images and the copy, minus the copy and the mislabelled one
    assert "../patterns/train/cat/cat_0.png" in paths, paths
    assert not {"../patterns/val/cat/cat_0_copy.jpg", "../patterns/" + planted["flipped"]} & paths
    index = discover(clean)
    assert index.layout == "csv" and len(index.samples) == 35 and index.counts()["val"]["cat"] == 4
    assert list(patterns.rglob("*_copy.jpg"))  # no image touched

    run = MlflowClient(store).get_run(report["files"]["mlflow_run_id"])
    assert MlflowClient(store).get_experiment(run.info.experiment_id).name == "patterns"
    assert run.data.metrics["leakage_groups"] == 1 and run.data.metrics["label_issues"] == 1
    artifacts = {a.path for a in MlflowClient(store).list_artifacts(run.info.run_id, "audit")}
    assert {"audit/report.json", "audit/gallery.png", "audit/embedding_map.png"} <= artifacts
    assert "| `leakage_groups` | 1 |" in run.data.tags["mlflow.note.content"]  # the run page's description


def test_clean_csv_trains(runner, patterns, tiny_weights, tmp_path):
    """`--relabel` keeps the mislabelled image under its suggested class, and finetune reads the CSV."""
    planted = plant(patterns)
    clean = tmp_path / "relabelled.csv"
    assert audit_cli(runner, patterns, tiny_weights, tmp_path / "audit", "--no-track", "--write-clean", str(clean),
                     "--relabel").exit_code == 1
    labels = {Path(r["path"]).name: r["label"] for r in csv.DictReader(clean.open())}
    assert labels[Path(planted["flipped"]).name] == "cat" and "cat_0_copy.jpg" not in labels
    result = runner.invoke(main, ["finetune", "--backbone", TINY_BACKBONE, "--weights", str(tiny_weights),
                                  "--data", str(clean), "--out", str(tmp_path / "runs"), "--name", "r", "--no-track",
                                  "--workers", "0", "--batch-size", "8", "--img-size", "32", "--epochs", "1",
                                  "--strategy", "linear-probe", "--aug", "none"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "r").is_dir()
    second = audit_cli(runner, patterns, tiny_weights, tmp_path / "audit", "--no-track", "--write-clean", str(clean))
    assert second.exit_code == 2 and "already exists" in second.output


def test_clean_set_exits_0_and_reuses_its_features(runner, patterns, tiny_weights, tmp_path):
    out = tmp_path / "audit"
    first = audit_cli(runner, patterns, tiny_weights, out, "--no-track", "--json")
    assert first.exit_code == 0, first.output
    report = json.loads(first.output)
    assert report["summary"] == {"leakage_groups": 0, "conflict_groups": 0, "duplicate_groups": 0,
                                 "label_issues": 0, "outliers": 0}
    features = out / "features.parquet"
    written = features.stat().st_mtime_ns
    again = audit_cli(runner, patterns, tiny_weights, out, "--no-track", "--json")
    assert again.exit_code == 0 and features.stat().st_mtime_ns == written  # not extracted twice
    extracted = extract_tiny(patterns, tiny_weights, tmp_path / "mine.npz")
    given = audit_cli(runner, patterns, tiny_weights, tmp_path / "audit2", "--no-track", "--features", str(extracted))
    assert given.exit_code == 0, given.output
    assert not (tmp_path / "audit2" / "features.parquet").exists()


def test_refuses_features_of_other_weights_or_other_data(runner, patterns, tiny_weights, tmp_path):
    import timm
    from safetensors.torch import save_file

    features = extract_tiny(patterns, tiny_weights, tmp_path / "f.parquet")
    torch.manual_seed(1)
    other = tmp_path / "other" / f"{TINY_BACKBONE}.safetensors"
    other.parent.mkdir()
    save_file(timm.create_model(TINY_BACKBONE).state_dict(), str(other))
    shutil.copy(tiny_weights.with_suffix(".json"), other.with_suffix(".json"))
    result = audit_cli(runner, patterns, other, tmp_path / "a", "--no-track", "--features", str(features))
    assert result.exit_code == 2 and "other weights" in result.output
    pattern_image(patterns / "train" / "cat" / "new.png", CLASS_COLOURS["cat"], 99)
    result = audit_cli(runner, patterns, tiny_weights, tmp_path / "b", "--no-track", "--features", str(features))
    assert result.exit_code == 2 and "other data" in result.output
    assert not (tmp_path / "a" / "report.json").exists() and not (tmp_path / "b" / "report.json").exists()


def test_bad_options_fail_before_any_work(patterns, tiny_weights, tmp_path):
    from transferkit.errors import TransferkitError
    from transferkit.features.audit import audit

    for kwargs, message in (({"relabel": True}, "--relabel only applies"), ({"threshold": 1.5}, "threshold must be"),
                            ({"write_clean": tmp_path / "clean.txt"}, "must end in .csv")):
        with pytest.raises(TransferkitError, match=message):
            audit(patterns, TINY_BACKBONE, weights=tiny_weights, out=tmp_path / "a", **kwargs)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("extraction", [{"pool": "max"}, {"layer": -2}, {"tta": "hflip"}])
def test_refuses_features_made_with_another_pool_layer_or_tta(runner, patterns, tiny_weights, tmp_path, extraction):
    """Issue 24: a file of the same backbone, weights and data but other vectors flipped the verdict to clean."""
    features = extract_tiny(patterns, tiny_weights, tmp_path / "f.parquet", **extraction)
    result = audit_cli(runner, patterns, tiny_weights, tmp_path / "a", "--no-track", "--features", str(features))
    assert result.exit_code == 2, result.output
    assert f"was made with other {next(iter(extraction))}" in result.output
    assert not (tmp_path / "a" / "report.json").exists()


def test_unwritable_clean_csv_fails_before_any_work_naming_its_flag(patterns, tiny_weights, tmp_path, monkeypatch):
    from transferkit.errors import TransferkitError
    from transferkit.features import audit as audit_module

    def no_work(*args, **kwargs):
        raise AssertionError("features were extracted before --write-clean was checked")

    monkeypatch.setattr("transferkit.features.extract.extract_features", no_work)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for target, message in ((blocker / "clean.csv", "is a file, not a folder"), (Path("/proc/tk/clean.csv"), "no file can be made")):
        with pytest.raises(TransferkitError, match=f"^--write-clean {target} cannot be written: .*{message}"):
            audit_module.audit(patterns, TINY_BACKBONE, weights=tiny_weights, out=tmp_path / "a", write_clean=target)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("layout", [{"train": 1, "val": 1}, {"train": 1}])
def test_one_image_per_class_per_split_is_a_degraded_audit(runner, tiny_weights, tmp_path, layout):
    """Issue 24: 2 images per class made the label check's LDA raise a ValueError traceback."""
    from conftest import make_dataset

    data = make_dataset(tmp_path / "data", classes=("cat", "dog"), splits=layout)
    result = audit_cli(runner, data, tiny_weights, tmp_path / "a", "--no-track", "--json")
    assert result.exit_code in (0, 1) and isinstance(result.exception, (SystemExit, type(None))), result.output
    report = json.loads(result.output)
    assert "skipped" in report["label_check"] and report["label_issues"] == []
    assert (tmp_path / "a" / "report.json").is_file()


def test_out_never_replaces_files_the_audit_did_not_write(patterns, tiny_weights, tmp_path):
    from transferkit.errors import TransferkitError
    from transferkit.features.audit import audit

    run = tmp_path / "run"
    run.mkdir()
    (run / "best.json").write_text("{}")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.json").write_text('{"my": "report"}')
    for out in (run, mine):
        with pytest.raises(TransferkitError, match="holds files that are not an earlier audit's"):
            audit(patterns, TINY_BACKBONE, weights=tiny_weights, out=out, workers=0, device="cpu")
    assert (mine / "report.json").read_text() == '{"my": "report"}' and sorted(p.name for p in run.iterdir()) == ["best.json"]
