"""The resume state of a run: one file, written atomically after every epoch.

``resume.pt`` holds everything an uninterrupted run would still have in memory at the end of an epoch:
model weights, optimizer, schedule, grad scaler, RNG states, early-stopping counters and the metrics
history. It is the commit point of an epoch: a run killed at any moment resumes from the last file that
was fully written, so at most the current epoch is lost. Only tensors, numbers, strings, lists and dicts
go in, so it loads with ``torch.load(weights_only=True)`` (no pickled code from a file on disk).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from transferkit.core.fileio import atomic_path
from transferkit.errors import TransferkitError

STATE_FILE = "resume.pt"
COMPLETE_FILE = "result.json"  # written last: its presence is what makes a run folder complete


def save_state(run_dir: Path, state: dict) -> None:
    with atomic_path(run_dir / STATE_FILE) as tmp:
        torch.save(state, tmp)


def load_state(run_dir: Path) -> dict:
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise TransferkitError(f"{run_dir} has no {STATE_FILE}: it is not a transferkit run folder or it never finished an epoch")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TransferkitError(f"cannot read resume state {path} ({type(exc).__name__}); the file is damaged") from exc


def rng_state() -> dict:
    """Python, numpy and torch RNG states as plain lists and tensors."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
