"""Small file helpers: atomic writes and content hashes.

Every output transferkit writes goes through :func:`atomic_path` so an interrupted command never
leaves a half-written file that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from transferkit.errors import TransferkitError

ROW_FILE_SUFFIXES = (".csv", ".json", ".parquet")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``target``; rename it onto ``target`` only if the block succeeds."""
    target = Path(target)
    ensure_writable_dir(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600, and so do writers that replace the file (safetensors): outputs get the usual mode
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; it becomes ``target`` only if the block succeeds.

    A folder's files then appear together or not at all (no new head beside an old backbone). An existing
    ``target`` with anything in it is never replaced.
    """
    target = Path(target)
    refuse_non_empty(target)
    ensure_writable_dir(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        try:
            if target.is_dir():
                target.rmdir()  # empty (checked above); fails if something appeared meanwhile
            os.rename(tmp, target)
        except OSError as exc:
            raise TransferkitError(f"cannot create {target}: {exc.strerror or exc}; pick another output folder") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def free_name(parent: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``... if ``parent`` already holds that name (never overwrite a run)."""
    candidate, n = name, 1
    while (Path(parent) / candidate).exists():
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def refuse_non_empty(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise TransferkitError(f"{target} already exists; transferkit never overwrites a model: "
                               "pick another output folder or remove it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(target: str | os.PathLike, data) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_rows(rows: Sequence[dict], out: str | os.PathLike) -> Path:
    """Rows to .csv / .json / .parquet (:data:`ROW_FILE_SUFFIXES`) by the name's suffix, atomically."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix == ".json":
        write_json(out, list(rows))
        return out
    if suffix not in ROW_FILE_SUFFIXES:
        raise TransferkitError(f"cannot write {out}: use one of {', '.join(ROW_FILE_SUFFIXES)}")
    import pandas as pd

    frame = pd.DataFrame(list(rows))
    with atomic_path(out) as tmp:
        if suffix == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            frame.to_parquet(tmp, index=False)
    return out


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TransferkitError(f"cannot create output folder {path}: {exc.strerror}; choose a writable --out") from exc
    if not os.access(path, os.W_OK):
        raise TransferkitError(f"output folder {path} is not writable; choose a writable --out")
    return path


def check_writable_file(path: str | os.PathLike, flag: str) -> Path:
    """Fail now, naming ``flag``, where ``path`` could not be written at the end of a long command: a folder, or
    a place where no file can be made (tried with a temporary file in its nearest existing folder). Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise TransferkitError(f"{flag} {path} is a folder; name a file")
    existing = next(folder for folder in path.absolute().parents if folder.exists())
    if not existing.is_dir():
        raise TransferkitError(f"{flag} {path} cannot be written: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise TransferkitError(f"{flag} {path} cannot be written: no file can be made in {existing} "
                               f"({exc.strerror or exc}); choose a writable path") from exc
    return path


def check_plot_file(path: str | os.PathLike, flag: str) -> Path:
    """A figure's output, checked before the work it plots: a writable ``.png`` that replaces nothing but an
    earlier figure (a PNG matplotlib wrote), never a checkpoint or a user's file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise TransferkitError(f"{flag} {path} must end in .png (the figure is written as a PNG)")
    check_writable_file(path, flag)
    if path.exists() or path.is_symlink():
        try:
            with Image.open(path) as image:
                earlier_figure = image.format == "PNG" and image.info.get("Software", "").startswith("Matplotlib")
        except (OSError, UnidentifiedImageError):
            earlier_figure = False
        if not earlier_figure:
            raise TransferkitError(f"{flag} {path} already exists and is not an earlier figure; choose another {flag}")
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def safe_name(text: str) -> str:
    """``text`` as one file or folder name: ``hf-hub:timm/resnet50.a1_in1k`` → ``hf-hub-timm-resnet50.a1_in1k``."""
    import re

    return re.sub(r"[^\w.+-]+", "-", text).strip("-") or "unnamed"
