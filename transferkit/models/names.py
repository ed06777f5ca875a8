"""Backbone names without importing timm (which imports torch: seconds), and which weights are on this machine.

timm's registry of names is stored once per timm version in the user cache, written whenever timm is imported
anyway (a run, `transferkit backbones`), so a misspelt ``--backbone`` fails before torch loads and ``backbones
PATTERN`` filters in milliseconds. Before the first store the name check waits for timm, as it did before.
Local weights are ``$TRANSFERKIT_WEIGHTS_DIR/<name>.safetensors`` and timm's models in the Hugging Face hub cache.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import struct
from importlib import metadata
from pathlib import Path

from transferkit.errors import TransferkitError, did_you_mean

WEIGHTS_DIR_ENV = "TRANSFERKIT_WEIGHTS_DIR"
HUB_PREFIX = "hf-hub:"
HUB_TIMM_REPO = "models--timm--"  # the hub cache's folder of timm/<name>.<tag>


def names_file() -> Path:
    """``~/.cache/transferkit/timm-<version>-models.json``: another timm version has other names."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "transferkit" / f"timm-{metadata.version('timm')}-models.json"


def stored_names() -> dict | None:
    """``{"all": [...], "pretrained": [...]}`` as timm listed them, or None when not stored yet."""
    try:
        stored = json.loads(names_file().read_text())
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) and {"all", "pretrained"} <= stored.keys() else None


def store_names(timm) -> dict:
    """timm's names, written to :func:`names_file` if absent (an unwritable cache only costs speed)."""
    names = {"all": timm.list_models(), "pretrained": sorted({n.split(".")[0] for n in timm.list_models(pretrained=True)})}
    target = names_file()
    if not target.is_file():
        try:
            from transferkit.core.fileio import atomic_path

            with atomic_path(target) as tmp:
                tmp.write_text(json.dumps(names))
        except (OSError, TransferkitError):
            pass
    return names


def all_names() -> dict:
    """The stored names, or timm's (importing it, and storing them for next time)."""
    stored = stored_names()
    if stored is None:
        import timm

        stored = store_names(timm)
    return stored


def is_hub_name(name: str) -> bool:
    """``hf-hub:org/name``: a model on the Hugging Face hub that timm builds from its own config there."""
    return name.startswith(HUB_PREFIX)


def check_name(name: str) -> None:
    """Refuse a name timm does not have, from the stored list only (nothing stored: timm checks it later)."""
    if is_hub_name(name) or name in local_weights():
        return
    stored = stored_names()
    if stored is not None and name not in stored["all"]:
        raise unknown_backbone(name, stored["all"])


def unknown_backbone(name: str, names) -> TransferkitError:
    hint = did_you_mean(name, names) or f"; run `transferkit backbones '*{name[:4]}*'` to list names"
    return TransferkitError(f"unknown backbone {name!r}{hint}")


def matching(pattern: str = "", pretrained: bool = False) -> list[str]:
    """Names matching a shell-style ``pattern`` (all when empty), in timm's order."""
    names = all_names()
    pool = names["all"]
    if pretrained:
        tagged = set(names["pretrained"])
        pool = [n for n in pool if n in tagged]
    return fnmatch.filter(pool, pattern) if pattern else list(pool)


def weights_file_name(name: str) -> str:
    """The file ``$TRANSFERKIT_WEIGHTS_DIR`` holds for ``name``: ``<name>.safetensors``, an ``hf-hub:org/x`` name
    made one file name (``hf-hub-org-x.safetensors``)."""
    from transferkit.core.fileio import safe_name

    return f"{safe_name(name)}.safetensors"


def local_weights() -> dict[str, Path]:
    """``{backbone: file}`` of the weights folder (``$TRANSFERKIT_WEIGHTS_DIR``)."""
    folder = os.environ.get(WEIGHTS_DIR_ENV)
    if not folder or not Path(folder).expanduser().is_dir():
        return {}
    return {path.name.removesuffix(".safetensors"): path
            for path in sorted(Path(folder).expanduser().glob("*.safetensors"))}


def hub_cached() -> set[str]:
    """timm backbones with a snapshot in the Hugging Face hub cache (``timm/<name>.<tag>``)."""
    from huggingface_hub import constants

    try:
        folders = os.listdir(constants.HF_HUB_CACHE)
    except OSError:
        return set()
    return {folder.removeprefix(HUB_TIMM_REPO).split(".")[0] for folder in folders if folder.startswith(HUB_TIMM_REPO)}


def parameter_count(path: Path) -> int | None:
    """Parameters in a .safetensors file, from its JSON header alone (no tensor is read)."""
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
    except (OSError, ValueError, struct.error):
        return None
    return sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")
