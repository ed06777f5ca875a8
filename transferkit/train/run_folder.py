"""Run folders: a new one claimed atomically per start, and a start that died before committing replaced.

The PID of the process starting a run is kept in ``OWNER_FILE`` until its first epoch commits: a folder left
by a start that died before that (only ``UNCOMMITTED_FILES`` in it, and its owner gone) is replaced by the
next start of the same name; any other existing folder is never touched.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from transferkit.core.fileio import ensure_writable_dir, free_name
from transferkit.errors import TransferkitError

OWNER_FILE = ".started-by"
# What a start writes before its first epoch commits (best.*: the LP-FT head's epoch-0 checkpoint).
UNCOMMITTED_FILES = (OWNER_FILE, "config.yaml", "split.csv", "best.safetensors", "best.json")


def new_run_folder(out: Path, name: str | None, default_name: str) -> str:
    """Claim ``out/name`` (or the first free ``out/default_name[-N]``) for this process; returns the name."""
    ensure_writable_dir(out)
    if name is None:
        while not claim(out / (name := free_name(out, default_name))):
            pass  # another process took that name between the check and the claim
        return name
    if not claim(out / name):
        raise TransferkitError(f"run folder {out / name} already exists; pick another --name or --resume it")
    return name


def committed(run_dir: Path) -> None:
    """The first epoch is written: a run now, never replaced by a new start."""
    (run_dir / OWNER_FILE).unlink(missing_ok=True)


def claim(run_dir: Path) -> bool:
    """Create ``run_dir`` for this process; False if it exists and is not an abandoned start."""
    try:
        run_dir.mkdir()
    except FileExistsError:
        if not abandoned(run_dir):
            return False
        shutil.rmtree(run_dir, ignore_errors=True)
        try:
            run_dir.mkdir()
        except FileExistsError:
            return False  # a simultaneous start took it first
    (run_dir / OWNER_FILE).write_text(str(os.getpid()))
    return True


def abandoned(run_dir: Path) -> bool:
    owner = run_dir / OWNER_FILE
    if not owner.is_file():
        return False
    if any(p.name not in UNCOMMITTED_FILES and not p.name.endswith(".tmp")
           for p in run_dir.iterdir()):
        return False
    try:
        os.kill(int(owner.read_text()), 0)
    except (ValueError, ProcessLookupError):
        return True
    except PermissionError:
        return False
    return False
