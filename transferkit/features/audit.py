"""`data audit`: label errors, near-duplicates, leakage and outliers, found on a frozen backbone's features.

One extraction (or an up-to-date `extract` output, reused) gives every image a vector, and one cheap
reduced-scale decode a 16x16 thumbnail; then:

- near-duplicates: pairs whose centred embeddings have cosine >= ``threshold`` (same content, e.g. a crop
  or shift) or whose thumbnails correlate >= ``pixel_threshold`` (a resized / re-encoded copy, which moves
  backbone features more than one would hope; see :mod:`transferkit.features.neighbours`), grouped by
  connected components; a group is *leakage* when it spans splits, a *conflict* when it spans classes;
- label issues: cleanlab's confident learning on out-of-fold probabilities of a shrinkage LDA
  (:mod:`transferkit.features.label_issues`), each with its given and suggested label and a score;
- outliers: images whose nearest neighbours are all far away.

Findings go to ``report.json``, ``embedding_map.png`` and ``gallery.png`` in ``out``, to MLflow when tracking
is on, and optionally to a cleaned CSV (path,label,split) that `finetune --data` reads. No image is ever
moved, deleted or edited.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from transferkit.core.fileio import atomic_path, check_writable_file, ensure_writable_dir, write_json
from transferkit.errors import TransferkitError
from transferkit.features.label_issues import CLASSIFIER, DEFAULT_FOLDS

# Centred cosine of tf_efficientnet_lite0 features: no two distinct signdigits images reach 0.89
# (docs/benchmarks/audit.md), so 0.95 flags only the same content.
DEFAULT_THRESHOLD = 0.95
# Thumbnail correlation: planted copies >= 0.998, any two distinct signdigits images <= 0.975.
DEFAULT_PIXEL_THRESHOLD = 0.99
DEFAULT_TOP = 12
OUTLIER_NEIGHBOURS = 10
FEATURES_FILE = "features.parquet"
OUTPUT_FILES = ("report.json", "embedding_map.png", "gallery.png", FEATURES_FILE)  # what an audit writes in --out
CLEAN, SUSPECTS = 0, 1
SPLIT_PRIORITY = {"train": 0, "val": 1, "test": 2}
# How the audit's vectors are made; a --features file must have been made the same way (not another pool/layer).
FEATURE_SETTINGS = {"pool": "avg", "layer": None, "tta": "none"}


@dataclass
class AuditReport:
    """What the audit found; ``to_dict()`` is ``report.json``. Lists are ordered most severe first."""

    dataset: str
    fingerprint: str
    backbone: str
    weights: str
    features: str
    classes: list[str]
    images: int
    threshold: float
    pixel_threshold: float
    near_duplicates: list[dict] = field(default_factory=list)
    label_issues: list[dict] = field(default_factory=list)
    outliers: list[dict] = field(default_factory=list)
    label_check: dict = field(default_factory=dict)
    outlier_cutoff: float | None = None
    timings: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)

    @property
    def summary(self) -> dict:
        groups = self.near_duplicates
        return {
            "leakage_groups": sum(g["leakage"] for g in groups),
            "conflict_groups": sum(g["conflict"] for g in groups),
            "duplicate_groups": len(groups),
            "label_issues": len(self.label_issues),
            "outliers": len(self.outliers),
        }

    @property
    def exit_code(self) -> int:
        return SUSPECTS if self.near_duplicates or self.label_issues or self.outliers else CLEAN

    def to_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary, "exit_code": self.exit_code}


def audit(data, backbone: str, *, weights=None, weights_config=None, pretrained: bool = True, features=None,
          out: str | os.PathLike = "audit", threshold: float = DEFAULT_THRESHOLD,
          pixel_threshold: float = DEFAULT_PIXEL_THRESHOLD, top: int = DEFAULT_TOP,
          folds: int = DEFAULT_FOLDS, val_ratio: float = 0.2, seed: int = 0, batch_size: int = 32,
          workers: int | None = None, device: str = "auto", write_clean: str | os.PathLike | None = None, relabel: bool = False,
          track: bool = False, tracking_uri: str | None = None, experiment: str | None = None) -> AuditReport:
    """Audit the dataset at ``data`` with ``backbone``'s frozen features; see the module docstring.

    ``features`` is a file from `transferkit extract` of the same data, backbone and weights (refused
    otherwise); without it, features are extracted once into ``out/features.parquet`` and reused by the
    next audit while data and weights are unchanged. ``top`` bounds the gallery, not the report.
    """
    from transferkit.data import discover
    from transferkit.features.feature_file import read_features
    from transferkit.features.neighbours import thumbnail_signatures

    for name, value in (("threshold", threshold), ("pixel threshold", pixel_threshold)):
        if not 0.0 < value <= 1.0:
            raise TransferkitError(f"{name} must be in (0, 1], got {value}; it is a cosine similarity")
    if relabel and write_clean is None:
        raise TransferkitError("--relabel only applies with --write-clean FILE.csv")
    index = discover(data, val_ratio=val_ratio, seed=seed)
    clean_csv = _check_clean_target(write_clean) if write_clean is not None else None
    _check_out(Path(out))
    started = time.perf_counter()
    if features is not None:  # before ``out`` is made: a refused file leaves nothing behind
        check_features_match(features, index, backbone, weights=weights, weights_config=weights_config,
                             pretrained=pretrained)
    out = ensure_writable_dir(out)
    if features is None:
        from transferkit.features.extract import extract_features

        features = extract_features(backbone, data, out / FEATURES_FILE, weights=weights,
                                    weights_config=weights_config, pretrained=pretrained, batch_size=batch_size,
                                    workers=workers, device=device, val_ratio=val_ratio, seed=seed,
                                    **FEATURE_SETTINGS)
    features_s = time.perf_counter() - started
    table, metadata = read_features(features)
    signatures = thumbnail_signatures([index.root / path for path in table.paths])
    report = analyse_features(table, metadata, index, signatures=signatures, threshold=threshold,
                              pixel_threshold=pixel_threshold, folds=folds, seed=seed)
    report.features = str(features)
    analysed = time.perf_counter()
    report.files = write_outputs(report, table, out, top=top)
    if clean_csv is not None:
        report.files["clean_csv"] = str(write_clean_csv(report, index, clean_csv, relabel=relabel))
    finished = time.perf_counter()
    report.timings = {"features_s": round(features_s, 2), "analysis_s": round(analysed - started - features_s, 2),
                      "outputs_s": round(finished - analysed, 2), "total_s": round(finished - started, 2)}
    write_json(out / "report.json", report.to_dict())
    if track:
        report.files["mlflow_run_id"] = _track(report, index, out, tracking_uri=tracking_uri, experiment=experiment)
        write_json(out / "report.json", report.to_dict())
    return report


def check_features_match(path, index, backbone: str, *, weights=None, weights_config=None,
                         pretrained: bool = True) -> None:
    """Refuse a features file made from other weights, another backbone, pooling, layer or TTA, or other data
    than this audit's: every key of the features identity (:data:`~transferkit.features.feature_file.IDENTITY_KEYS`)."""
    from transferkit.features.feature_file import IDENTITY_KEYS, feature_identity_mismatch, read_metadata
    from transferkit.models.backbones import backbone_identity
    from transferkit.models.embedding import build_feature_model, feature_dim

    metadata = read_metadata(path)
    model, preprocessing = build_feature_model(backbone, weights=weights, weights_config=weights_config,
                                               pretrained=pretrained)
    identity = backbone_identity(model)
    ours = {**identity, **preprocessing.to_metadata(), **FEATURE_SETTINGS,
            "feature_dim": feature_dim(model, FEATURE_SETTINGS["pool"], FEATURE_SETTINGS["layer"])}
    differ = feature_identity_mismatch(metadata, {key: ours[key] for key in IDENTITY_KEYS})
    if identity["weights"] == "random-init":
        differ.append("weights (random-init: two random backbones are never the same)")
    if differ:
        raise TransferkitError(f"features file {path} was made with other {', '.join(differ)} than this audit uses "
                               f"({backbone}, weights {identity['weights']}, pool {FEATURE_SETTINGS['pool']} of the "
                               "last layer, no TTA); drop --features to extract afresh, or pass the matching "
                               "--backbone/--weights")
    dataset = metadata.get("dataset", {})
    if dataset.get("fingerprint") != index.fingerprint() or metadata.get("split") != "all":
        raise TransferkitError(f"features file {path} was made from other data (or another split, val ratio, seed) "
                               f"than {index.root}; drop --features to extract afresh, or re-run `transferkit extract`")


def analyse_features(table, metadata, index, *, signatures: np.ndarray | None = None,
                     threshold: float = DEFAULT_THRESHOLD, pixel_threshold: float = DEFAULT_PIXEL_THRESHOLD,
                     folds: int = DEFAULT_FOLDS, seed: int = 0) -> AuditReport:
    """The audit proper on ``read_features`` output whose rows are ``index``'s images (no file I/O).

    ``signatures`` (:func:`~transferkit.features.neighbours.thumbnail_signatures` of the same rows) add the
    pairs whose thumbnails correlate at ``pixel_threshold`` or more to the embedding pairs.
    """
    from transferkit.features.label_issues import outlier_cutoff, outlier_scores
    from transferkit.features.neighbours import centred_unit, duplicate_groups, nearest_neighbours

    report = AuditReport(str(index.root), index.fingerprint(), metadata["backbone"], metadata["weights"], "",
                         list(metadata["class_names"]), len(table), float(threshold), float(pixel_threshold))
    neighbours = nearest_neighbours(table.vectors, k=OUTLIER_NEIGHBOURS, threshold=threshold)
    pairs = neighbours.pairs
    if signatures is not None:
        by_pixels = nearest_neighbours(signatures, k=0, threshold=pixel_threshold, centre=False).pairs
        pairs = np.unique(np.concatenate([pairs, by_pixels]), axis=0)
    unit = centred_unit(table.vectors)
    similarities = np.einsum("ij,ij->i", unit[pairs[:, 0]], unit[pairs[:, 1]])
    for group in duplicate_groups(len(table), pairs, similarities):
        members = group.pop("members")
        pixels = {} if signatures is None else {"max_pixel_similarity": _max_offdiagonal(signatures[members])}
        report.near_duplicates.append({
            "leakage": len(set(table.splits[members])) > 1,
            "conflict": len(set(table.label_index[members])) > 1,
            **{k: round(v, 4) for k, v in {**group, **pixels}.items()},
            "files": [_file(table, i) for i in members],
        })
    report.near_duplicates.sort(key=lambda g: (not g["leakage"], not g["conflict"]))  # stable: size order kept
    _add_label_issues(report, table, folds=folds, seed=seed)
    if len(table) > OUTLIER_NEIGHBOURS:
        scores = outlier_scores(neighbours.similarities)
        report.outlier_cutoff = round(outlier_cutoff(scores), 4)
        flagged = np.flatnonzero(scores > report.outlier_cutoff)
        report.outliers = [{**_file(table, i), "score": round(float(scores[i]), 4)}
                           for i in flagged[np.argsort(-scores[flagged], kind="stable")]]
    return report


def _max_offdiagonal(rows: np.ndarray) -> float:
    similarities = rows @ rows.T
    np.fill_diagonal(similarities, -np.inf)
    return float(similarities.max())


def _file(table, i: int) -> dict:
    """Row ``i`` of a feature table as the ``{path, label, split}`` the report lists."""
    return {"path": str(table.paths[i]), "label": str(table.labels[i]), "split": str(table.splits[i])}


def _add_label_issues(report: AuditReport, table, *, folds: int, seed: int) -> None:
    from transferkit.features.label_issues import find_label_suspects

    counts = np.bincount(table.label_index, minlength=len(report.classes))
    present = counts[counts > 0]
    if len(present) < 2 or present.min() < 2:
        small = [report.classes[c] for c in np.flatnonzero((counts > 0) & (counts < 2))]
        report.label_check = {"skipped": f"needs two classes with 2+ images each (too few: {', '.join(small)})"}
        return
    used = min(folds, int(present.min()))  # as out_of_fold_probabilities caps them
    smallest_fit = len(table) - int(np.ceil(present / used).sum())  # stratified: the largest held-out fold
    if smallest_fit <= len(present):  # LDA needs more images than classes in each fold it is fitted on
        report.label_check = {"skipped": f"needs more images than classes ({len(present)}) in each of the {used} "
                                         f"cross-validation folds; {len(table)} images are too few"}
        return
    issues = find_label_suspects(table.vectors, table.label_index, len(report.classes), folds=folds, seed=seed)
    report.label_check = {"classifier": CLASSIFIER,
                          "folds": issues.folds,
                          "out_of_fold_accuracy": round(float((issues.suggested == table.label_index).mean()), 4)}
    report.label_issues = [{**_file(table, i), "suggested": report.classes[issues.suggested[i]],
                            "score": round(float(issues.quality[i]), 4)} for i in issues.ranked]


# --------------------------------------------------------------------------- outputs


def write_outputs(report: AuditReport, table, out: Path, *, top: int = DEFAULT_TOP) -> dict:
    """The embedding map and the gallery of top suspects; returns ``{name: path}``."""
    from transferkit.reports.plots import embedding_map_png, suspect_gallery_png

    root = Path(report.dataset)
    position = {path: i for i, path in enumerate(table.paths)}
    marks = {
        "label issue": [position[s["path"]] for s in report.label_issues],
        "near-duplicate (leakage/conflict)": [position[f["path"]] for g in report.near_duplicates
                                              if g["leakage"] or g["conflict"] for f in g["files"]],
        "outlier": [position[s["path"]] for s in report.outliers],
    }
    files = {"embedding_map": embedding_map_png(projection_2d(table.vectors), table.label_index, report.classes,
                                                marks, out / "embedding_map.png")}
    sections = {
        "label issues (given → suggested, score)": [
            {"path": root / s["path"], "caption": f"{s['label']} → {s['suggested']} ({s['score']:.3f})"}
            for s in report.label_issues[:top]],
        "near-duplicate groups, every member (group, split/label, similarity)": [  # one row per group (issue 25)
            [{"path": root / f["path"], "caption": f"#{g_i} {f['split']}/{f['label']} ({g['max_similarity']:.3f})"}
             for f in g["files"]] for g_i, g in enumerate(report.near_duplicates[:max(1, top // 2)])],
        "outliers (label, distance)": [
            {"path": root / s["path"], "caption": f"{s['label']} ({s['score']:.2f})"} for s in report.outliers[:top]],
    }
    files["gallery"] = suspect_gallery_png(sections, out / "gallery.png")
    return {name: str(path) for name, path in files.items()}


def projection_2d(vectors: np.ndarray) -> np.ndarray:
    """PCA of the L2-normalised vectors: instant at any size, unlike t-SNE, and distances stay honest."""
    from sklearn.decomposition import PCA

    from transferkit.features.neighbours import l2_normalise

    if len(vectors) < 2:
        return np.zeros((len(vectors), 2))
    points = PCA(n_components=min(2, vectors.shape[1]), random_state=0).fit_transform(l2_normalise(vectors))
    return np.pad(points, ((0, 0), (0, 2 - points.shape[1])))


def clean_rows(report: AuditReport, index, *, relabel: bool = False) -> list[dict]:
    """The dataset's rows without the flagged images (absolute paths).

    Label issues are dropped, or given their suggested label with ``relabel``; outliers are dropped; of each
    near-duplicate group one image stays: a train one if any, else val, else test (so leakage goes), and
    among those the first listed.
    """
    drop = {s["path"] for s in report.outliers}
    for group in report.near_duplicates:
        keep = min(group["files"], key=lambda f: SPLIT_PRIORITY.get(f["split"], 3))
        drop.update(f["path"] for f in group["files"] if f is not keep)
    suggested = {s["path"]: s["suggested"] for s in report.label_issues}
    if not relabel:
        drop.update(suggested)
        suggested = {}
    rows = []
    for record, sample in zip(index.records(), index.samples):
        if record["path"] not in drop:
            rows.append({"path": sample.path.resolve(), "label": suggested.get(record["path"], record["label"]),
                         "split": record["split"]})
    return rows


def write_clean_csv(report: AuditReport, index, target: str | os.PathLike, *, relabel: bool = False) -> Path:
    """:func:`clean_rows` as a ``path,label,split`` CSV, paths relative to the CSV (as `discover` reads them)."""
    from transferkit.data.discover import CSV_COLUMNS

    target = Path(target)
    with atomic_path(target) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in clean_rows(report, index, relabel=relabel):
            path = Path(os.path.relpath(row["path"], target.resolve().parent)).as_posix()
            writer.writerow({**row, "path": path})
    return target


def _check_out(out: Path) -> None:
    """``out`` is a new or empty folder or an earlier audit's (complete: its report.json; interrupted: nothing but
    the audit's own file names), so the report and PNGs never replace a user's or a run's files."""
    if out.exists() and not out.is_dir():
        raise TransferkitError(f"--out {out} is a file; the audit writes a folder (report.json, PNGs, features)")
    entries = {p.name for p in out.iterdir() if not p.name.startswith(".")} if out.is_dir() else set()
    if entries and not (_is_audit_report(out / "report.json")
                        or (entries <= set(OUTPUT_FILES) and "report.json" not in entries)):
        raise TransferkitError(f"--out {out} holds files that are not an earlier audit's; the audit never "
                               "replaces them: choose a new or empty folder")
    check_writable_file(out / "report.json", "--out")


def _is_audit_report(path: Path) -> bool:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and {"summary", "label_check", "exit_code"} <= report.keys()


def _check_clean_target(target) -> Path:
    target = Path(target)
    if target.suffix.lower() != ".csv":
        raise TransferkitError(f"--write-clean {target} must end in .csv (path,label,split, as `finetune --data` reads)")
    if target.exists():
        raise TransferkitError(f"{target} already exists; choose another --write-clean path or remove it")
    return check_writable_file(target, "--write-clean")


def _track(report: AuditReport, index, out: Path, *, tracking_uri, experiment) -> str:
    """One MLflow run (its id is returned): counts as metrics, the report and PNGs as artifacts, the dataset."""
    from transferkit.tracking.tracker import open_run

    params = {"backbone": report.backbone, "weights": report.weights, "threshold": report.threshold,
              "pixel_threshold": report.pixel_threshold,
              "images": report.images, **{f"label_check.{k}": v for k, v in report.label_check.items()
                                          if k != "out_of_fold_accuracy"}}
    with open_run("data audit", data=report.dataset, backbone=report.backbone, strategy="audit",
                  dataset_fingerprint=report.fingerprint, params=params, tracking_uri=tracking_uri,
                  experiment=experiment) as tracker:
        tracker.log_dataset(index, report.fingerprint, context="audit")
        tracker.log_metrics({**report.summary, **report.timings,
                             "out_of_fold_accuracy": report.label_check.get("out_of_fold_accuracy")})
        for name in ("report.json", "embedding_map.png", "gallery.png"):
            if (out / name).is_file():
                tracker.log_artifact(out / name, "audit")
        if report.files.get("clean_csv"):
            tracker.log_artifact(report.files["clean_csv"], "audit")
        tracker.describe(
            f"data audit of {Path(report.dataset).name} with {report.backbone}",
            [f"data: `{report.dataset}`: {report.images} images, {len(report.classes)} classes",
             "details: artifacts `audit/report.json`, `audit/gallery.png`, `audit/embedding_map.png`"],
            report.summary)
    return tracker.run_id
