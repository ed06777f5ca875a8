"""Ensembles and weight soups: several saved models made into one model folder every command takes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import make_dataset
from safetensors.torch import load_file, save_file

from transferkit.cli import main
from transferkit.combine.ensemble import build_ensemble, greedy_selection
from transferkit.combine.soup import make_soup
from transferkit.errors import TransferkitError
from transferkit.models.predictors import load_predictor
from transferkit.models.saved_model import CHECKPOINT_METADATA_KEY, read_checkpoint_metadata
from transferkit.use.predict import predict_paths


@pytest.fixture(scope="module")
def cat_dog(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("combine_data"), classes=("cat", "dog"),
                        splits={"train": 4, "val": 4})


def _variant(source, folder, *, noise: float = 0.0, temperature: float = 1.0, seed: int = 0, **metadata_changes):
    """A copy of the model folder ``source`` with its classifier weights nudged and its metadata changed."""
    folder.mkdir(parents=True)
    checkpoint = source / "model.safetensors"
    state = load_file(str(checkpoint))
    generator = torch.Generator().manual_seed(seed)
    for key in ("classifier.weight", "classifier.bias"):
        state[key] = state[key] + noise * torch.randn(state[key].shape, generator=generator)
    metadata = {**read_checkpoint_metadata(checkpoint), "temperature": temperature, **metadata_changes}
    save_file(state, str(folder / "model.safetensors"), metadata={CHECKPOINT_METADATA_KEY: json.dumps(metadata)})
    (folder / "model.json").write_text(json.dumps(metadata))
    return folder


@pytest.fixture(scope="module")
def members(tiny_classifier, tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    return [_variant(tiny_classifier, root / "a", noise=0.5, temperature=2.0, seed=1),
            _variant(tiny_classifier, root / "b", noise=0.5, temperature=0.5, seed=2)]


def _images(data, split="val"):
    return sorted((data / split).rglob("*.png"))


def test_ensemble_is_the_weighted_mean_of_its_members_calibrated_probabilities(members, cat_dog, tmp_path):
    out = build_ensemble(members, tmp_path / "ens")
    ensemble = load_predictor(out)
    paths = _images(cat_dog)
    assert [m.temperature for m in ensemble.members] == [2.0, 0.5]  # the members, in order, as saved
    member_probs = [member.predict_proba(paths) for member in ensemble.members]
    by_hand = np.mean(member_probs, axis=0)
    probs, errors = predict_paths(ensemble, paths, workers=0)  # what predict and evaluate use
    assert not any(errors)
    np.testing.assert_allclose(probs, by_hand, atol=1e-6)
    np.testing.assert_allclose(ensemble.predict_proba(paths), by_hand, atol=1e-6)
    # the members' temperatures are applied: without them the average is another one
    raw = np.mean([torch.softmax(torch.log(torch.from_numpy(p)) * t, 1).numpy()
                   for p, t in zip(member_probs, (2.0, 0.5))], axis=0)
    assert not np.allclose(raw, by_hand, atol=1e-3)


def test_ensemble_refuses_members_of_other_classes_and_a_member_that_changed(members, tiny_classifier, tmp_path):
    other = _variant(tiny_classifier, tmp_path / "fox", class_names=["cat", "fox"])
    with pytest.raises(TransferkitError, match=r"predicts classes cat, fox, but .* predicts cat, dog; combine models"):
        build_ensemble([members[0], other], tmp_path / "mixed")
    copies = [shutil.copytree(m, tmp_path / m.name) for m in members]
    out = build_ensemble(copies, tmp_path / "ens")
    _variant(tiny_classifier, tmp_path / "nudged", noise=1.0)
    shutil.copy(tmp_path / "nudged" / "model.safetensors", copies[1] / "model.safetensors")
    with pytest.raises(TransferkitError, match=r"changed since the ensemble .* was made \(sha256 differs\)"):
        load_predictor(out)


def test_greedy_selection_weighs_the_better_member_and_never_ends_worse_than_uniform():
    labels = np.array([0, 1, 0, 1, 0, 1])
    good = np.array([[0.9, 0.1], [0.2, 0.8], [0.8, 0.2], [0.3, 0.7], [0.7, 0.3], [0.1, 0.9]])
    bad = good[:, ::-1].copy()
    mixed = np.full_like(good, 0.5)
    members = [bad, good, mixed]
    counts = greedy_selection(members, labels, rounds=10)
    assert counts.argmax() == 1 and counts[0] == counts.min()
    nll = lambda p: -np.log(p[np.arange(6), labels]).mean()  # noqa: E731
    combined = sum(c * p for c, p in zip(counts / counts.sum(), members))
    assert nll(combined) < nll(np.mean(members, axis=0))
    assert np.array_equal(greedy_selection(members, labels, rounds=1) >= 1, [True, True, True])


@pytest.mark.slow
def test_cli_ensemble_then_evaluate_and_predict(runner, members, cat_dog, tmp_path):
    out = tmp_path / "ens"
    result = runner.invoke(main, ["ensemble", *map(str, members), "--data", str(cat_dog), "--selection", "greedy",
                                  "--out", str(out), "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"written to {out}" in result.output and "val (8 images)" in result.output
    metadata = read_checkpoint_metadata(out / "model.safetensors")
    assert metadata["kind"] == "ensemble" and abs(sum(m["weight"] for m in metadata["members"]) - 1) < 1e-9
    evaluated = runner.invoke(main, ["evaluate", "--model", str(out), "--data", str(cat_dog), "--split", "val",
                                     "--no-track", "--workers", "0", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    accuracy = json.loads(evaluated.output)["val_accuracy"]
    assert accuracy == pytest.approx(metadata["chosen_on"]["ensemble"]["accuracy"])
    predicted = runner.invoke(main, ["predict", "--model", str(out), str(cat_dog / "val"), "--workers", "0",
                                     "--out", str(tmp_path / "p.csv")])
    assert predicted.exit_code == 0, predicted.output
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + 8
    again = runner.invoke(main, ["ensemble", *map(str, members), "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    greedy_without_data = runner.invoke(main, ["ensemble", *map(str, members), "--selection", "greedy",
                                               "--out", str(tmp_path / "g")])
    assert greedy_without_data.exit_code == 2 and "pass --data" in greedy_without_data.output


def test_soup_of_identical_runs_is_the_run(tiny_classifier, cat_dog, tmp_path):
    copies = [shutil.copytree(tiny_classifier, tmp_path / name) for name in ("a", "b")]
    out = make_soup(copies, tmp_path / "soup", data=cat_dog, recipe="uniform", workers=0, device="cpu")
    soup = load_file(str(out / "model.safetensors"))
    original = load_file(str(tiny_classifier / "model.safetensors"))
    assert soup.keys() == original.keys()
    for key in original:
        torch.testing.assert_close(soup[key], original[key])
    info = read_checkpoint_metadata(out / "model.safetensors")["soup"]
    assert not info["bn_reestimated"] and all(m["in_soup"] for m in info["members"])


def test_greedy_soup_leaves_out_a_run_that_lowers_val_accuracy(tiny_classifier, cat_dog, tmp_path):
    good = shutil.copytree(tiny_classifier, tmp_path / "good")
    state = load_file(str(tiny_classifier / "model.safetensors"))
    state["classifier.weight"] = -10 * state["classifier.weight"]  # predicts the other class, and surely
    state["classifier.bias"] = -10 * state["classifier.bias"]
    (tmp_path / "flipped").mkdir()
    metadata = read_checkpoint_metadata(tiny_classifier / "model.safetensors")
    save_file(state, str(tmp_path / "flipped" / "model.safetensors"),
              metadata={CHECKPOINT_METADATA_KEY: json.dumps(metadata)})
    out = make_soup([tmp_path / "flipped", good], tmp_path / "soup", data=cat_dog, workers=0, device="cpu")
    info = read_checkpoint_metadata(out / "model.safetensors")["soup"]
    kept = {m["path"].split("/")[-2]: m["in_soup"] for m in info["members"]}
    assert kept == {"flipped": False, "good": True}
    assert info["val"]["accuracy"] == max(m["val"]["accuracy"] for m in info["members"])


def test_soup_refuses_runs_of_other_backbones_or_starting_weights(tiny_classifier, cat_dog, tmp_path):
    other = _variant(tiny_classifier, tmp_path / "other", pretrained_weights="sha256:another")
    with pytest.raises(TransferkitError, match="differ in pretrained_weights: only runs of one backbone"):
        make_soup([tiny_classifier, other], tmp_path / "soup", data=cat_dog)
    with pytest.raises(TransferkitError, match="at least 2 models"):
        make_soup([tiny_classifier], tmp_path / "soup", data=cat_dog)


def test_explain_an_ensemble_maps_each_finetuned_member_for_the_ensembles_class(members, cat_dog, tmp_path):
    from transferkit.use.explain import explain

    ensemble = build_ensemble(members, tmp_path / "ens")
    image = _images(cat_dog)[0]
    written = explain(ensemble, [image], tmp_path / "cams", device="cpu")
    predicted = load_predictor(ensemble).predict_proba([image])[0].argmax()
    name = ("cat", "dog")[predicted]
    assert sorted(p.name for p in written) == [f"{image.stem}.{name}.gradcam.member-{i}.png" for i in (0, 1)]


def test_serve_answers_with_the_ensembles_probabilities(members, cat_dog, tmp_path):
    from transferkit.use.serve import ModelService

    ensemble = load_predictor(build_ensemble(members, tmp_path / "ens"))
    image = _images(cat_dog)[0]
    service = ModelService(ensemble, topk=2)
    try:
        answer = service.answer(image.read_bytes())
    finally:
        service.cams.close()
    expected = ensemble.predict_proba([image])[0]
    assert {row["class"]: row["probability"] for row in answer["top"]} == pytest.approx(
        dict(zip(ensemble.class_names, expected.tolist())), abs=1e-5)
    assert answer["cam_class"] == ensemble.class_names[expected.argmax()]


def test_the_ensembles_own_temperature_rescales_the_average(members, cat_dog, tmp_path):
    from transferkit.models.predictors import rescale
    from transferkit.models.saved_model import save_checkpoint

    out = build_ensemble(members, tmp_path / "ens")
    metadata = {**read_checkpoint_metadata(out / "model.safetensors"), "temperature": 0.5}
    save_checkpoint(out / "model", torch.nn.Module(), metadata)
    ensemble = load_predictor(out)
    paths = _images(cat_dog)
    mean = np.mean([m.predict_proba(paths) for m in ensemble.members], axis=0)
    sharpened = ensemble.predict_proba(paths)
    np.testing.assert_allclose(sharpened, rescale(mean, 0.5), atol=1e-6)
    assert (sharpened.argmax(1) == mean.argmax(1)).all() and (sharpened.max(1) >= mean.max(1) - 1e-7).all()
