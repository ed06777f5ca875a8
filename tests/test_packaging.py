"""A package that installs like one: bundled recipes and presets by name (also from a wheel), optional extras
that say how to install them, and ``hf-hub:`` backbone names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_BACKBONE, make_image

from transferkit.choices import AUG_PRESETS
from transferkit.errors import TransferkitError

REPO = Path(__file__).resolve().parents[1]
# one bundled name of each kind, as --recipe, --aug and --space take them
BUNDLED = {"recipes": "quick-cpu", "recipes/augment": "light", "recipes/sweeps": "backbones-cpu"}
RESOLVE_BUNDLED = f"""
import json
from transferkit.core.bundled import resolve_yaml
found = {{kind: resolve_yaml(name, kind, kind) for kind, name in {BUNDLED!r}.items()}}
print(json.dumps({{kind: [str(path), path.read_text()] for kind, path in found.items()}}))
"""


def environment_without_pythonpath() -> dict[str, str]:
    """So that a subprocess imports transferkit from its own install, not from a path this process was given."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def resolve_bundled_in(python: Path | str, cwd: Path) -> dict[str, list[str]]:
    """kind -> [path, text] of each of ``BUNDLED`` as transferkit's own lookup finds it in a fresh ``python``."""
    done = subprocess.run([str(python), "-c", RESOLVE_BUNDLED], cwd=cwd, env=environment_without_pythonpath(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def assert_are_the_top_level_recipes(found: dict[str, list[str]], installed_under: Path) -> None:
    for kind, (path, text) in found.items():
        source = REPO / kind / f"{BUNDLED[kind]}.yaml"
        assert Path(path).is_relative_to(installed_under), path
        assert text == source.read_text() and text.strip(), kind


def test_recipes_presets_and_sweep_files_resolve_by_name():
    from transferkit.core.bundled import bundled_names
    from transferkit.data.augment import load_augmentation, preset_path
    from transferkit.sweep.space import read_sweep_file
    from transferkit.train.config import read_recipe, resolve_config

    assert bundled_names("recipes/augment") == sorted(AUG_PRESETS)
    assert {"quick-cpu", "linear-probe", "roads-resnet50"} <= set(bundled_names("recipes"))
    assert resolve_config("quick-cpu").backbone == "tf_efficientnet_lite0"
    assert read_recipe("quick-cpu") == read_recipe(REPO / "recipes" / "quick-cpu.yaml")
    assert "transform" in preset_path("light").read_text() and load_augmentation("heavy").transforms
    assert read_sweep_file("backbones-cpu")
    with pytest.raises(TransferkitError, match=r"recipe 'quick-gpu' is neither a file nor a bundled name \(linear-probe"):
        read_recipe("quick-gpu")


def test_setup_cfg_lists_every_subpackage_and_maps_the_recipes():
    """setup.cfg lists its packages (find: cannot see recipes/ as transferkit.recipes), so a new subpackage
    must be added there or the wheel silently lacks it."""
    import configparser

    options = configparser.ConfigParser()
    options.read(REPO / "setup.cfg")
    listed = set(options["options"]["packages"].split())
    on_disk = {".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "transferkit").rglob("__init__.py")}
    assert listed == on_disk | {"transferkit.recipes"}
    assert options["options"]["package_dir"].split() == ["transferkit.recipes", "=", "recipes"]
    assert not (REPO / "transferkit" / "recipes").exists()  # one copy, at the top level


def test_editable_install_reads_the_top_level_recipes(tmp_path):
    """This venv's editable transferkit, away from the checkout, finds the bundled names in recipes/."""
    assert_are_the_top_level_recipes(resolve_bundled_in(sys.executable, cwd=tmp_path), REPO / "recipes")


def test_missing_extra_is_one_line_naming_the_pip_extra(runner, tiny_classifier, tmp_path, monkeypatch):
    from transferkit.cli import main
    from transferkit.use.export import export

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(TransferkitError, match=r"onnxruntime is not installed; this needs pip install 'transferkit\[export\]'"):
        export(tiny_classifier, out=tmp_path / "m.onnx")
    result = runner.invoke(main, ["export", "--model", str(tiny_classifier), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1].startswith("error: onnxruntime is not")
    assert not (tmp_path / "m.onnx").exists()
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)
    image = make_image(tmp_path / "cat.png", (200, 40, 40))
    result = runner.invoke(main, ["explain", "--model", str(tiny_classifier), str(image), "--out", str(tmp_path / "cam")])
    assert result.exit_code == 2 and "pip install 'transferkit[explain]'" in result.output


def _fake_hub_cache(root: Path, repo_id: str, tiny_weights: Path) -> Path:
    """A Hugging Face cache holding ``repo_id`` as timm publishes models (config.json + model.safetensors)."""
    import shutil

    commit = "0" * 40
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    shutil.copy(tiny_weights, snapshot / "model.safetensors")
    (snapshot / "config.json").write_text(json.dumps({
        "architecture": TINY_BACKBONE, "num_classes": 1000,
        "pretrained_cfg": {"input_size": [3, 64, 64], "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5],
                           "std": [0.5, 0.5, 0.5], "crop_pct": 1.0, "crop_mode": "squash", "num_classes": 1000,
                           "classifier": "classifier"}}))
    return root


def test_hf_hub_names_work_wherever_a_backbone_name_does(tmp_path, tiny_weights, monkeypatch):
    import huggingface_hub.constants

    from transferkit.core.fileio import safe_name
    from transferkit.models.backbones import backbone_identity, load_backbone, weights_file_name
    from transferkit.tracking.naming import default_run_name

    name = "hf-hub:transferkit-test/tiny"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(_fake_hub_cache(tmp_path / "hub", name[7:], tiny_weights)))
    model, preprocessing = load_backbone(name, num_classes=3)
    assert backbone_identity(model)["weights"] == "hub:transferkit-test/tiny"
    assert preprocessing.resize_mode == "squash"  # the hub config's own crop_mode, read
    assert "/" not in default_run_name(name, "full") and ":" not in default_run_name(name, "full")
    assert weights_file_name(name) == "hf-hub-transferkit-test-tiny.safetensors" == safe_name(name) + ".safetensors"
    monkeypatch.setenv("TRANSFERKIT_WEIGHTS_DIR", str(tmp_path / "weights"))
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / weights_file_name(name)).write_bytes(tiny_weights.read_bytes())
    model, _ = load_backbone(name, num_classes=0)
    assert backbone_identity(model)["weights"].startswith("sha256:")
    with pytest.raises(TransferkitError, match="cannot read the config of hf-hub:nobody/nothing"):
        load_backbone("hf-hub:nobody/nothing", pretrained=False)


def wheel_site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A new venv holding the wheel built from the checkout's tracked and new files (no deps: they come from
    this venv)."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    source = tmp_path / "src"
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard"], check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((REPO / name).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True)
    (wheel,) = (tmp_path / "dist").glob("transferkit-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "torch").is_dir())
    (wheel_site_packages(venv) / "deps.pth").write_text(str(deps) + "\n")  # torch & co. from this venv; not its editable transferkit
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True)
    return venv


def test_wheel_in_a_fresh_venv_holds_the_top_level_recipes(wheel_venv, tmp_path):
    found = resolve_bundled_in(wheel_venv / "bin" / "python", cwd=tmp_path)
    assert_are_the_top_level_recipes(found, wheel_site_packages(wheel_venv) / "transferkit" / "recipes")


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_trains_from_a_bundled_recipe(wheel_venv, tmp_path, tiny_data, tiny_weights):
    """The installed command, outside any checkout: a preset and a recipe by name, then a short finetune."""
    command = str(wheel_venv / "bin" / "transferkit")
    env = environment_without_pythonpath()
    env["TRANSFERKIT_WEIGHTS_DIR"] = str(tiny_weights.parent)

    def run(*args):
        done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    assert "HorizontalFlip" in run(command, "augment", "show", "light")
    out = run(command, "finetune", "--recipe", "quick-cpu", "--data", str(tiny_data),
              "--backbone", TINY_BACKBONE, "--epochs", "1", "--batch-size", "4", "--workers", "0", "--no-track",
              "--out", str(tmp_path / "runs"), "--name", "wheel")
    assert "best epoch 1" in out and (tmp_path / "runs" / "wheel" / "best.safetensors").is_file()
