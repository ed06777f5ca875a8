"""Feature extraction and classical heads on real data (CPU): speed, overhead, accuracy, memory.

On ../shared/data/roads with ../shared/weights/tf_efficientnet_lite0.safetensors:

1. extraction images/s (``extract_features``: decode + eval transform + forward + parquet writes) against
   the bare model forward on pre-decoded, pre-transformed tensors, same batch size and torch threads;
   the roads file list is repeated (symlinks) to --repeat x 89 images so start-up does not dominate;
2. wall time of ``transferkit svm --backbone --data --no-track`` (extract + grid search + save) against one
   ``transferkit extract`` of the same data, both as fresh CLI processes; on the repeated roads frames or
   (``--svm-data signdigits3000``) on 3,000 photos in 10 classes;
3. val accuracy of linear-svm, rbf-svm and logistic (default grids, 5-fold CV on train) on the plain
   roads features;
4. peak RSS of an extraction at 1x and --rss-scale x the images, each in its own process.

The machine is shared: every timing is the best of --rounds interleaved repeats (the least disturbed one).

    .venv/bin/python bench/bench_features.py
    .venv/bin/python bench/bench_features.py --repeat 6 --rounds 2 --rss-base 89 --rss-scale 10
    .venv/bin/python bench/bench_features.py --only svm --svm-data signdigits3000 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import BACKBONE, ROADS, SHARED, WEIGHTS

SIGNDIGITS = SHARED / "data" / "signdigits"

CLI = [sys.executable, "-m", "transferkit"]


def repeated_dataset(folder: Path, images: int) -> Path:
    """``folder`` holding the roads files (train/val layout kept) as symlinks, repeated to ``images`` files."""
    sources = sorted(p for p in ROADS.rglob("*") if p.is_file())
    for k in range(images):
        src = sources[k % len(sources)]
        link = folder / src.relative_to(ROADS).parent / f"{src.stem}_r{k // len(sources)}{src.suffix}"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(src)
    return folder


def signdigits_3000(folder: Path, images: int = 3000) -> Path:
    """A 10-class set of ``images`` distinct photos: every signdigits train and validation image (1,752, as
    symlinks) plus mirrored copies of the first ones (re-encoded JPEGs), in one folder per class."""
    from PIL import Image, ImageOps

    sources = sorted(p for p in SIGNDIGITS.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for k in range(images):
        src = sources[k % len(sources)]
        target = folder / src.parent.name / f"{src.parent.parent.name}_{src.stem}{'_m' if k >= len(sources) else ''}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        if k < len(sources):
            target.symlink_to(src)
        else:
            ImageOps.mirror(Image.open(src).convert("RGB")).save(target, quality=95)
    return folder


def extraction_vs_bare_forward(data: Path, out: Path, batch_size: int, rounds: int) -> dict:
    import torch

    from transferkit.data import discover, load_image
    from transferkit.features.extract import extract_features
    from transferkit.models.embedding import build_feature_model

    model, preprocessing = build_feature_model(BACKBONE, weights=WEIGHTS)
    model.eval()
    index = discover(data)
    transform, short_side = preprocessing.eval_transform(), preprocessing.decode_short_side
    started = time.perf_counter()
    tensors = torch.stack([transform(load_image(s.path, short_side)) for s in index.samples])
    n = len(tensors)
    decode_img_s = n / (time.perf_counter() - started)
    bare, extract = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, n, batch_size):
                model.forward_head(model.forward_features(tensors[i:i + batch_size]), pre_logits=True)
        bare.append(n / (time.perf_counter() - started))
        started = time.perf_counter()
        extract_features(BACKBONE, data, out, weights=WEIGHTS, batch_size=batch_size, device="cpu", force=True)
        extract.append(n / (time.perf_counter() - started))
    return {"images": n, "batch_size": batch_size, "torch_threads": torch.get_num_threads(),
            "decode_transform_img_s_1_thread": round(decode_img_s, 1),
            "bare_forward_img_s": [round(v, 2) for v in bare], "extract_img_s": [round(v, 2) for v in extract],
            "ratio_best": round(max(extract) / max(bare), 3),
            # decoding has to share the cores the forward already fills: with the forward using all C cores,
            # CPU-seconds per image are C/bare + 1/decode, so extraction cannot exceed 1 / (1 + bare / (C * decode))
            "cpu_bound_ratio": round(1 / (1 + max(bare) / (torch.get_num_threads() * decode_img_s)), 3)}


def svm_vs_extract(data: Path, work: Path, rounds: int, model: str) -> dict:
    common = ["--backbone", BACKBONE, "--weights", str(WEIGHTS), "--data", str(data), "--device", "cpu"]
    extract_s, svm_s = [], []
    for r in range(rounds):
        extract_s.append(_timed([*CLI, "extract", *common, "--out", str(work / f"x{r}.parquet")]))
        svm_s.append(_timed([*CLI, "svm", *common, "--model", model, "--out", str(work / f"svm{r}"),
                             "--no-track"]))
    images = sum(1 for p in data.rglob("*") if p.is_file())
    return {"images": images, "model": model, "extract_s": extract_s, "svm_s": svm_s,
            "ratio_best": round(min(svm_s) / min(extract_s), 3)}


def head_accuracies(work: Path) -> dict:
    from transferkit.choices import HEAD_MODELS
    from transferkit.features.classical_heads import fit_head
    from transferkit.features.extract import extract_features

    features = extract_features(BACKBONE, ROADS, work / "roads.parquet", weights=WEIGHTS, device="cpu")
    result = {}
    for model in HEAD_MODELS:
        fitted = fit_head(features, model)
        result[model] = {"params": fitted.best_params, "cv_accuracy": round(fitted.cv_accuracy, 3),
                         **{k: round(fitted.metrics["val"][k], 3) for k in ("accuracy", "balanced_accuracy", "macro_f1")}}
    return result


def peak_rss(data: Path, out: Path) -> dict:
    """One extraction in a fresh process: its own peak RSS (VmHWM, which exec resets; getrusage's ru_maxrss
    would carry this parent's peak over) and that of its largest DataLoader worker."""
    code = ("import json, resource, sys\n"
            "from transferkit.features.extract import extract_features\n"
            f"extract_features({BACKBONE!r}, sys.argv[1], sys.argv[2], weights={str(WEIGHTS)!r}, device='cpu')\n"
            "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
            "print(json.dumps({'main_mib': int(hwm.split()[1]) / 1024,\n"
            "                  'worker_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))\n")
    done = subprocess.run([sys.executable, "-c", code, str(data), str(out)], capture_output=True, text=True, check=True)
    return {k: round(v, 1) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def _timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return round(time.perf_counter() - started, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=6, help="Roads file list repeats for (1) and (2) (6 -> 534 images).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved repeats; the best is reported.")
    parser.add_argument("--rss-base", type=int, default=89, help="Images in the 1x RSS run.")
    parser.add_argument("--rss-scale", type=int, default=10)
    parser.add_argument("--only", nargs="*", default=("speed", "svm", "accuracy", "rss"))
    parser.add_argument("--svm-data", choices=("roads", "signdigits3000"), default="roads",
                        help="(2) on the repeated roads frames, or on 3,000 signdigits photos in 10 classes.")
    parser.add_argument("--svm-model", default="logistic", help="Head of (2) (the svm command's default: logistic).")
    args = parser.parse_args()
    if not (WEIGHTS.is_file() and ROADS.is_dir()):
        sys.exit(f"needs {WEIGHTS} and {ROADS}")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = repeated_dataset(work / "data", 89 * args.repeat)
        results = {}
        if "speed" in args.only:
            results["1_extraction_vs_bare_forward"] = extraction_vs_bare_forward(
                data, work / "speed.parquet", args.batch_size, args.rounds)
            print(json.dumps({"1_extraction_vs_bare_forward": results["1_extraction_vs_bare_forward"]}), flush=True)
        if "svm" in args.only:
            svm_data = data if args.svm_data == "roads" else signdigits_3000(work / "signdigits3000")
            results["2_svm_vs_extract_wall"] = svm_vs_extract(svm_data, work, args.rounds, args.svm_model)
            print(json.dumps({"2_svm_vs_extract_wall": results["2_svm_vs_extract_wall"]}), flush=True)
        if "accuracy" in args.only:
            results["3_val_accuracy_roads"] = head_accuracies(work)
            print(json.dumps({"3_val_accuracy_roads": results["3_val_accuracy_roads"]}), flush=True)
        if "rss" in args.only:
            rss = {}
            for scale in (1, args.rss_scale):
                images = args.rss_base * scale
                rss[f"{images}_images"] = peak_rss(repeated_dataset(work / f"rss{scale}", images),
                                                   work / f"rss{scale}.parquet")
                print(json.dumps({"4_peak_rss": rss}), flush=True)
            small, large = (rss[f"{args.rss_base * s}_images"]["main_mib"] for s in (1, args.rss_scale))
            rss["main_growth"] = round(large / small - 1, 3)
            results["4_peak_rss"] = rss
        print(f"load average {os.getloadavg()[0]:.1f} at end")
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
