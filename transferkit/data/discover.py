"""Dataset discovery: class folders, split folders or a CSV, turned into one index of samples.

Layouts accepted:
- ``root/<class>/*``: everything is train; a stratified, seeded val split is carved out.
- ``root/{train,val|valid|validation,test}/<class>/*``: splits as given (val carved from train if absent).
- ``labels.csv`` with columns ``path,label[,split]``, paths relative to the CSV.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.data.decode import is_image_file
from transferkit.errors import TransferkitError

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
SPLITS = ("train", "val", "test")
CSV_COLUMNS = ("path", "label", "split")
LAYOUT = ("a folder of class folders (DATA/<class>/<image>), split folders (DATA/train/<class>/<image> beside "
          "val/, test/) or a labels CSV (columns path,label[,split])")
# Folders that are never classes or images: macOS zip metadata, and hidden ones (.thumbs, .git) anywhere.
IGNORED_FOLDERS = ("__MACOSX",)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    split: str


@dataclass
class DatasetIndex:
    """Every image with its class index and split; ``classes`` is sorted and shared by all splits."""

    root: Path
    classes: list[str]
    samples: list[Sample]
    layout: str
    val_from_train: bool = False
    problems: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    @property
    def splits(self) -> list[str]:
        present = {s.split for s in self.samples}
        return [name for name in SPLITS if name in present]

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: count}} with zeros kept, so missing classes show."""
        result = {}
        for name in self.splits:
            counter = Counter(s.label for s in self.split(name))
            result[name] = {cls: counter.get(i, 0) for i, cls in enumerate(self.classes)}
        return result

    def relpath(self, sample: Sample) -> str:
        try:
            return sample.path.relative_to(self.root).as_posix()
        except ValueError:
            return sample.path.as_posix()

    def records(self) -> list[dict]:
        """The split as plain rows (path relative to root, class name, split), saved with every run."""
        return [{"path": self.relpath(s), "label": self.classes[s.label], "split": s.split} for s in self.samples]

    def fingerprint(self) -> str:
        """Changes when any file is added, removed, relabelled, moved between splits or edited.

        An edit is seen by size and modification time (ns): an image rewritten in place at the same size
        (BMP, TIFF) still changes it. Hashing every byte would cost a full read of the dataset per run.
        """
        digest = hashlib.sha256()
        for s in sorted(self.samples, key=lambda s: self.relpath(s)):
            try:
                stat = s.path.stat()
                content = f"{stat.st_size}\t{stat.st_mtime_ns}"
            except OSError:
                content = "missing"
            digest.update(f"{self.relpath(s)}\t{self.classes[s.label]}\t{s.split}\t{content}\n".encode())
        return digest.hexdigest()[:16]


def discover(path: str | os.PathLike, val_ratio: float = 0.2, seed: int = 0, strict: bool = True) -> DatasetIndex:
    """Index the dataset at ``path``. ``strict=False`` records problems instead of raising (for `data check`)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise TransferkitError(f"data path {root} does not exist; pass a folder of class folders or a CSV")
    if not 0.0 <= val_ratio < 1.0:
        raise TransferkitError(f"val ratio must be in [0, 1), got {val_ratio}")
    if root.is_file():
        if is_image_file(root.name):
            raise TransferkitError(f"--data {root} is a single image; it must be {LAYOUT}")
        index = _from_csv(root)
    else:
        split_dirs = _split_dirs(root)
        index = _from_split_dirs(root, split_dirs) if "train" in split_dirs else _from_class_dirs(root)
    _validate(index, strict)
    if not index.split("val") and val_ratio > 0:
        _carve_val(index, val_ratio, seed)
    return index


def _split_dirs(root: Path) -> dict[str, Path]:
    """{split: folder}; two folders naming one split (``Train/`` beside ``train/``) are refused, not merged."""
    found: dict[str, list[Path]] = {}
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and folder.name.lower() in SPLIT_ALIASES:
            found.setdefault(SPLIT_ALIASES[folder.name.lower()], []).append(folder)
    for split, folders in found.items():
        if len(folders) > 1:
            raise TransferkitError(f"{root} has {len(folders)} folders for the {split} split "
                                   f"({', '.join(f.name + '/' for f in folders)}); merge them into one")
    return {split: folders[0] for split, folders in found.items()}


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_FOLDERS


def _from_class_dirs(root: Path) -> DatasetIndex:
    by_class = _scan_classes(root)
    classes = sorted(by_class)
    samples = [Sample(p, classes.index(c), "train") for c in classes for p in by_class[c]]
    return DatasetIndex(root, classes, samples, "class-folders")


def _from_split_dirs(root: Path, split_dirs: dict[str, Path]) -> DatasetIndex:
    per_split = {split: _scan_classes(folder) for split, folder in split_dirs.items()}
    classes = sorted(set().union(*per_split.values()))
    problems = []
    train_classes = set(per_split["train"])
    for split, by_class in per_split.items():
        if split != "train" and set(by_class) != train_classes:
            extra, missing = sorted(set(by_class) - train_classes), sorted(train_classes - set(by_class))
            problems.append(
                f"class names differ between train and {split}: "
                + "; ".join(x for x in (extra and f"only in {split}: {', '.join(extra)}",
                                        missing and f"missing from {split}: {', '.join(missing)}") if x)
            )
    samples = [Sample(p, classes.index(c), split)
               for split in SPLITS if split in per_split
               for c in sorted(per_split[split]) for p in per_split[split][c]]
    return DatasetIndex(root, classes, samples, "split-folders", problems=problems)


def _scan_classes(folder: Path) -> dict[str, list[Path]]:
    """{class: sorted image paths}; a class folder without images is kept (empty) so it can be reported."""
    by_class = {}
    for class_dir in sorted(d for d in folder.iterdir() if d.is_dir() and not _is_ignored(d.name)):
        by_class[class_dir.name] = sorted(
            p for p in class_dir.rglob("*")
            if p.is_file() and is_image_file(p.name)
            and not any(_is_ignored(part) for part in p.relative_to(class_dir).parts)
        )
    return by_class


def _from_csv(csv_path: Path) -> DatasetIndex:
    base = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:  # -sig: Excel's UTF-8 starts with a BOM
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as exc:
        raise TransferkitError(f"{csv_path} is not a text CSV ({exc.reason} at byte {exc.start}); --data must be "
                               f"{LAYOUT}") from exc
    except (OSError, csv.Error) as exc:
        raise TransferkitError(f"cannot read CSV {csv_path}: {exc}") from exc
    unknown = [c for c in columns if c not in CSV_COLUMNS]
    if unknown or not {"path", "label"} <= set(columns):
        raise TransferkitError(
            f"CSV {csv_path} has columns {columns}; expected path,label[,split] (unknown: {', '.join(unknown) or 'none'})"
        )
    too_long = [line for line, row in rows if None in row]  # DictReader keeps surplus fields under the key None
    if too_long:
        raise TransferkitError(f"CSV {csv_path}: {_lines(too_long)} {'has' if len(too_long) == 1 else 'have'} more "
                               f"fields than the {len(columns)} columns; quote paths or labels that contain commas")
    entries, missing, blank = [], [], []
    for line, row in rows:
        row = {k.strip(): (v or "").strip() for k, v in row.items()}
        split = SPLIT_ALIASES.get((row.get("split") or "train").lower())
        if split is None:
            raise TransferkitError(f"CSV {csv_path} line {line}: unknown split {row['split']!r}; use train, val or test")
        if not row["label"] or not row["path"]:
            blank.append(line)
            continue
        path = (base / row["path"]).resolve()
        if not path.is_file():
            missing.append(row["path"])
        entries.append((line, path, row["label"], split))
    if missing:
        raise TransferkitError(f"CSV {csv_path} lists {len(missing)} missing files (e.g. {', '.join(missing[:3])})")
    classes = sorted({label for _, _, label, _ in entries})
    samples = [Sample(p, classes.index(label), split) for _, p, label, split in entries]
    index = DatasetIndex(base, classes, samples, "csv")
    if blank:
        index.problems.append(f"{_lines(blank)} of {csv_path.name} {'has' if len(blank) == 1 else 'have'} "
                              "a blank path or label; fill them in or delete the rows")
    index.problems.extend(_listed_twice(entries, csv_path.name))
    train_classes = {s.label for s in index.split("train")}
    for split in index.splits:
        if split != "train" and {s.label for s in index.split(split)} != train_classes:
            index.problems.append(f"class names differ between train and {split}")
    return index


def _listed_twice(entries, csv_name: str) -> list[str]:
    """A file under two labels (or in two splits) would train against itself or leak into val."""
    rows_of = {}
    for line, path, label, split in entries:
        rows_of.setdefault(path, []).append((line, label, split))
    clashes = [rows for rows in rows_of.values() if len({(label, split) for _, label, split in rows}) > 1]
    if not clashes:
        return []
    lines = [line for line, _, _ in clashes[0]]
    labels = sorted({f"{label}/{split}" for _, label, split in clashes[0]})
    return [f"{len(clashes)} files are listed under different labels or splits in {csv_name} "
            f"(e.g. {_lines(lines)}: {', '.join(labels)}); keep one row per file"]


def _lines(numbers: list[int], shown: int = 5) -> str:
    text = ", ".join(str(n) for n in numbers[:shown]) + (f" and {len(numbers) - shown} more" if len(numbers) > shown else "")
    return f"line{'s' if len(numbers) > 1 else ''} {text}"


def _validate(index: DatasetIndex, strict: bool) -> None:
    if not index.samples:
        raise TransferkitError(_no_images(index.root))
    counts = Counter(s.label for s in index.samples)
    empty = [c for i, c in enumerate(index.classes) if counts.get(i, 0) == 0]
    if empty:
        index.problems.append(f"class folders without images: {', '.join(empty)}")
    if len(index.classes) - len(empty) < 2:
        raise TransferkitError(f"{index.root} has {len(index.classes) - len(empty)} class with images; a classifier needs at least 2")
    if strict and index.problems:
        raise TransferkitError(f"{index.root}: {index.problems[0]} (see `transferkit data check`)")


def _no_images(root: Path) -> str:
    """Why a folder gave no samples: images lying loose without class folders are the usual reason."""
    for folder in [root, *(d for d in sorted(root.iterdir()) if d.is_dir() and d.name.lower() in SPLIT_ALIASES)]:
        loose = [p for p in folder.iterdir() if p.is_file() and is_image_file(p.name)]
        if loose:
            return (f"{folder} holds {len(loose)} images but no class folders; --data must be {LAYOUT} "
                    f"(e.g. {folder}/<class>/{loose[0].name})")
    return f"no images found under {root}; --data must be {LAYOUT}"


def _carve_val(index: DatasetIndex, val_ratio: float, seed: int) -> None:
    """Stratified, seeded: the same files land in val on every rerun with the same seed and ratio."""
    rng = np.random.default_rng(seed)
    moved = set()
    for label in range(len(index.classes)):
        paths = sorted(s.path for s in index.samples if s.split == "train" and s.label == label)
        n_val = int(round(len(paths) * val_ratio))
        if len(paths) >= 2:
            n_val = min(max(n_val, 1), len(paths) - 1)
        else:
            n_val = 0
        moved.update(paths[i] for i in rng.permutation(len(paths))[:n_val])
    index.samples = [Sample(s.path, s.label, "val") if s.split == "train" and s.path in moved else s
                     for s in index.samples]
    index.val_from_train = True
