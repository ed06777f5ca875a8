"""`transferkit data audit` on signdigits with planted label errors and near-duplicates (CPU).

On a copy of ../shared/data/signdigits (10 classes, train 1,444 / validation 308, 100x100 JPEGs) with
../shared/weights/tf_efficientnet_lite0.safetensors:

- 3 % of the train images (seeded) are moved to another class folder (a flipped label);
- 10 images (seeded, not flipped) get a near-duplicate: resized by 0.8 and re-encoded as JPEG quality 70,
  placed in the *other* split under the same class.

Measured:
1. precision and recall of the flipped labels among the first 2 x (number flipped) label suspects; how many
   of the 10 planted pairs are in one cross-split (leakage) group; leakage groups holding no planted pair;
2. wall time of `transferkit data audit` (which extracts) against one `transferkit extract` of the same
   data, both fresh CLI processes, best of --rounds interleaved repeats (the machine is shared);
3. the thresholds: similarity of --calibration planted copies to their sources, against every image's
   genuine nearest neighbour in the dataset, for the centred embedding cosine and the thumbnail correlation.

    .venv/bin/python bench/bench_audit.py [--rounds 1] [--calibration 200] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import BACKBONE, SHARED, WEIGHTS

SIGNDIGITS = SHARED / "data" / "signdigits"
CLI = [sys.executable, "-m", "transferkit"]
FLIP_SHARE = 0.03
PLANTED = 10
OTHER_SPLIT = {"train": "validation", "validation": "train"}


def near_duplicate(source: Path, target: Path) -> Path:
    """``source`` resized by 0.8 and re-encoded at JPEG quality 70."""
    from PIL import Image

    with Image.open(source) as image:
        image = image.convert("RGB")
        smaller = image.resize((round(image.width * 0.8), round(image.height * 0.8)), Image.BICUBIC)
    target.parent.mkdir(parents=True, exist_ok=True)
    smaller.save(target, format="JPEG", quality=70)
    return target


def planted_copy(folder: Path, seed: int = 0) -> dict:
    """Copy signdigits to ``folder``, flip 3 % of train labels and plant 10 cross-split near-duplicates."""
    shutil.copytree(SIGNDIGITS, folder)
    rng = random.Random(seed)
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    classes = sorted({p.parts[1] for p in files})
    train = [p for p in files if p.parts[0] == "train"]
    flipped = []
    for rel in rng.sample(train, round(FLIP_SHARE * len(train))):
        new_class = rng.choice([c for c in classes if c != rel.parts[1]])
        target = Path("train", new_class, rel.name)
        (folder / rel).rename(folder / target)
        flipped.append(target.as_posix())
    untouched = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file()
                       and p.relative_to(folder).as_posix() not in flipped)
    pairs = []
    for rel in rng.sample(untouched, PLANTED):
        copy = Path(OTHER_SPLIT[rel.parts[0]], rel.parts[1], f"{rel.stem}_neardup.jpg")
        near_duplicate(folder / rel, folder / copy)
        pairs.append((rel.as_posix(), copy.as_posix()))
    return {"flipped": flipped, "pairs": pairs}


def timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode not in (0, 1):
        sys.exit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return elapsed, done


def scores(report: dict, planted: dict) -> dict:
    flipped = set(planted["flipped"])
    first = [s["path"] for s in report["label_issues"][:2 * len(flipped)]]
    hits = sum(path in flipped for path in first)
    groups = [{f["path"] for f in g["files"]} for g in report["near_duplicates"] if g["leakage"]]
    found = sum(any({a, b} <= group for group in groups) for a, b in planted["pairs"])
    planted_files = {path for pair in planted["pairs"] for path in pair}
    return {
        "flipped": len(flipped), "suspects_listed": len(report["label_issues"]), "first_k": 2 * len(flipped),
        "precision": round(hits / max(len(first), 1), 3), "recall": round(hits / len(flipped), 3),
        "planted_pairs_found_as_leakage": f"{found}/{len(planted['pairs'])}",
        "false_leakage_groups": sum(not (group & planted_files) for group in groups),
        "leakage_groups": len(groups), "all_near_duplicate_groups": len(report["near_duplicates"]),
        "outliers": len(report["outliers"]), "out_of_fold_accuracy": report["label_check"].get("out_of_fold_accuracy"),
    }


def calibration(data: Path, features: Path, count: int, work: Path, seed: int = 0) -> dict:
    """Similarity of planted copies to their sources vs genuine nearest neighbours, in both of audit's spaces."""
    from transferkit.features.extract import extract_features
    from transferkit.features.feature_file import read_features
    from transferkit.features.neighbours import (
        centred_unit,
        l2_normalise,
        nearest_neighbours,
        thumbnail_signatures,
    )

    table, _ = read_features(features)
    planted = np.array(["_neardup" in p for p in table.paths])
    originals = table.vectors[~planted]
    paths = list(table.paths[~planted])
    sources = random.Random(seed).sample(paths, count)
    copies = work / "copies"
    for rel in sources:
        near_duplicate(data / rel, copies / Path(rel).parts[1] / f"{Path(rel).stem}_{Path(rel).parts[0]}.jpg")
    copy_table, _ = read_features(extract_features(BACKBONE, copies, work / "copies.parquet", weights=WEIGHTS,
                                                   val_ratio=0, workers=1))
    by_name = {f"{Path(p).parts[1]}/{Path(p).stem}_{Path(p).parts[0]}.jpg": i for i, p in enumerate(paths)}
    source_rows = [by_name[p] for p in copy_table.paths]
    mean = l2_normalise(originals).mean(axis=0)
    embedding = np.sum(centred_unit(copy_table.vectors, mean) * centred_unit(originals[source_rows], mean), axis=1)
    genuine_embedding = nearest_neighbours(originals, k=1, threshold=1.0).similarities[:, 0]
    thumbs = thumbnail_signatures([data / p for p in paths])
    copy_thumbs = thumbnail_signatures([copies / p for p in copy_table.paths])
    pixels = np.sum(copy_thumbs * thumbs[source_rows], axis=1)
    genuine_pixels = nearest_neighbours(thumbs, k=1, threshold=1.0, centre=False).similarities[:, 0]

    def summary(copy_sims, genuine, candidates):
        return {
            "copy_to_source_percentiles_0_1_5_50": np.percentile(copy_sims, [0, 1, 5, 50]).round(4).tolist(),
            "genuine_nearest_percentiles_50_99_99.9_100": np.percentile(genuine, [50, 99, 99.9, 100]).round(4).tolist(),
            "copies_found_at": {t: round(float((copy_sims >= t).mean()), 3) for t in candidates},
            "images_whose_genuine_nearest_reaches": {t: int((genuine >= t).sum()) for t in candidates},
        }

    return {"copies": count, "embedding_centred_cosine": summary(embedding, genuine_embedding, (0.8, 0.9, 0.95)),
            "thumbnail_correlation": summary(pixels, genuine_pixels, (0.97, 0.98, 0.99, 0.995))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--calibration", type=int, default=200, help="planted copies for the threshold (0: skip)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the working folder here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-audit-")) if args.keep is None else args.keep
    data = work / "signdigits"
    planted = planted_copy(data, seed=args.seed)
    common = ["--backbone", BACKBONE, "--weights", str(WEIGHTS)]
    extract_s, audit_s = [], []
    for round_ in range(args.rounds):
        seconds, _ = timed([*CLI, "extract", *common, "--data", str(data), "--out", str(work / f"x{round_}.parquet")])
        extract_s.append(round(seconds, 1))
        out = work / f"audit{round_}"
        seconds, done = timed([*CLI, "data", "audit", str(data), *common, "--out", str(out), "--json", "--no-track"])
        audit_s.append(round(seconds, 1))
        report = json.loads(done.stdout)
        print(json.dumps({"round": round_, "extract_s": extract_s[-1], "audit_s": audit_s[-1],
                          "audit_timings": report["timings"], "exit_code": done.returncode}), flush=True)
    print(json.dumps({"1_planted": scores(report, planted)}), flush=True)
    print(json.dumps({"2_audit_vs_extract_wall": {"extract_s": extract_s, "audit_s": audit_s,
                                                  "ratio_best": round(min(audit_s) / min(extract_s), 3)}}), flush=True)
    if args.calibration:
        print(json.dumps({"3_threshold": calibration(data, out / "features.parquet", args.calibration, work,
                                                     seed=args.seed)}), flush=True)
    if args.keep is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
