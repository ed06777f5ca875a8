"""`transferkit data check`: what is wrong with a dataset before any training time is spent on it.

Exit codes: 0 clean, 1 warnings only, 2 errors. Errors: unreadable files, the same image in two
classes or in two splits (leakage), classes missing from train, class folders without images.
Warnings: duplicates within one class, classes missing from val/test, imbalance above the limit,
images much smaller than the backbone input.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from transferkit.data.decode import ImageDecodeError, load_image
from transferkit.data.discover import DatasetIndex

CLEAN, WARNINGS, ERRORS = 0, 1, 2


@dataclass
class CheckReport:
    root: str
    layout: str
    classes: list[str]
    counts: dict[str, dict[str, int]]
    imbalance_ratio: float
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unreadable: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    small_images: list[dict] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return ERRORS if self.errors else WARNINGS if self.warnings else CLEAN

    def to_dict(self) -> dict:
        return {**asdict(self), "exit_code": self.exit_code}


def check_dataset(index: DatasetIndex, min_side: int = 224, max_imbalance: float = 3.0,
                  small_fraction: float = 0.5, workers: int = 4) -> CheckReport:
    """Decode every image once; report counts, corrupt files, duplicates, leakage and size problems."""
    counts = index.counts()
    train = counts.get("train", {})
    nonzero = [n for n in train.values() if n]
    report = CheckReport(str(index.root), index.layout, index.classes, counts,
                         round(max(nonzero) / min(nonzero), 2) if nonzero else 0.0)
    report.errors.extend(index.problems)
    _check_class_coverage(index, counts, report)
    if report.imbalance_ratio > max_imbalance:
        report.warnings.append(f"class imbalance {report.imbalance_ratio}:1 in train (limit {max_imbalance}:1); "
                               "consider --balance weights or sampler")
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=workers) as pool:  # a bar on a terminal only (disable=None)
        results = list(tqdm(pool.map(_inspect, index.samples), total=len(index.samples), desc="check", unit="img",
                            disable=None, leave=False))
    by_hash = defaultdict(list)
    for sample, (digest, size, error) in zip(index.samples, results):
        rel = index.relpath(sample)
        if error:
            report.unreadable.append({"path": rel, "split": sample.split, "error": error})
            continue
        by_hash[digest].append(sample)
        if min(size) < small_fraction * min_side:
            report.small_images.append({"path": rel, "width": size[0], "height": size[1]})
    if report.unreadable:
        report.errors.append(f"{len(report.unreadable)} unreadable or corrupt images "
                             f"(e.g. {report.unreadable[0]['path']}); remove or re-encode them")
    if report.small_images:
        report.warnings.append(f"{len(report.small_images)} images have a side under {int(small_fraction * min_side)} px, "
                               f"much smaller than the {min_side} px backbone input")
    _check_duplicates(index, by_hash, report)
    return report


def leaked(report: CheckReport) -> list[dict]:
    """The duplicate groups with a copy in train and another in val or test: the val/test scores of a model
    trained on them are inflated (finetune refuses them unless allowed)."""
    return [group for group in report.duplicates
            if "train" in (splits := {f["split"] for f in group["files"]}) and splits & {"val", "test"}]


def _check_class_coverage(index: DatasetIndex, counts, report: CheckReport) -> None:
    for split, per_class in counts.items():
        missing = [c for c, n in per_class.items() if n == 0]
        if not missing:
            continue
        message = f"classes missing from {split}: {', '.join(missing)}"
        (report.errors if split == "train" else report.warnings).append(message)


def _check_duplicates(index: DatasetIndex, by_hash, report: CheckReport) -> None:
    cross_class = cross_split = within = 0
    for group in by_hash.values():
        if len(group) < 2:
            continue
        labels = {s.label for s in group}
        splits = {s.split for s in group}
        kind = "cross-class" if len(labels) > 1 else "cross-split" if len(splits) > 1 else "within-class"
        cross_class += kind == "cross-class"
        cross_split += kind == "cross-split"
        within += kind == "within-class"
        report.duplicates.append({
            "kind": kind,
            "files": [{"path": index.relpath(s), "class": index.classes[s.label], "split": s.split} for s in group],
        })
    if cross_class:
        report.errors.append(f"{cross_class} images appear, byte-identical, under different classes; "
                             "merge the classes or fix the labels")
    if cross_split:
        report.errors.append(f"{cross_split} images appear in more than one split (leakage inflates val scores)")
    if within:
        report.warnings.append(f"{within} groups of exact duplicate images within a class")


def _inspect(sample) -> tuple[str | None, tuple[int, int] | None, str | None]:
    try:
        data = sample.path.read_bytes()
        image = load_image(sample.path)
    except (ImageDecodeError, OSError) as exc:
        return None, None, str(exc)
    return hashlib.sha256(data).hexdigest(), (image.shape[1], image.shape[0]), None
