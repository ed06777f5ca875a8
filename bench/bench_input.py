"""Input pipeline throughput (no model): stock torchvision + timm eval transform vs transferkit.

Pipelines, same images, batch size and workers for all:
  (a) torchvision ImageFolder + PIL + timm.data.create_transform(**resolve_data_config(model))
  (b0) transferkit before issue 30: JPEG draft decode + timm's transform as timm builds it, in the workers
      (float32 batches)
  (b) transferkit ImageDataset: JPEG draft decode (torchvision decode_jpeg at full scale) + timm's eval
      transform fused into one resize, uint8 batches, normalised by the loader in the main process (what
      runs on the device on a GPU), no cache
  (c) the same with --cache memory / --cache disk, measured after the first epoch filled the cache

Each pipeline runs in its own process (clean peak memory): one warm-up epoch, then --epochs timed
epochs. The pipelines run in --rounds interleaved rounds and each keeps its best epoch: the machine is
shared, so the best repeat is the least disturbed one and load spikes hit every pipeline alike. An epoch is the
image set repeated --repeat times, so it lasts long enough to time. Memory is the peak of the summed
PSS (proportional set size: shared pages split between the processes sharing them) over the main and
worker processes, sampled every 50 ms, and the main process's own peak RSS.

    .venv/bin/python bench/bench_input.py       # all roads frames, the 1280x960 ones alone, 8 MP photos
    .venv/bin/python bench/bench_input.py --sets roads --workers 2 --batch-size 32

``--steps``: each step's cost (one thread, ms per image) on a few frames of every set, and each variant's parity
(mean / min cosine of tf_efficientnet_lite0 features, real weights, against timm's eval transform on a full
decode) on ../shared/data/roads and the 8 MP set, in every resize mode. ``--extract``: ``extract_features`` images/s
(start-up included) against the bare forward on the same images (bench_features.py's measure) on signdigits and the
1280x960 frames.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ROADS = SHARED / "data" / "roads"
PHOTOS = SHARED / "photos"
BACKBONE = "tf_efficientnet_lite0"
PIPELINES = ("a_torchvision_timm", "b0_before_issue30", "b_transferkit", "c_transferkit_memory", "c_transferkit_disk")
SIGNDIGITS = SHARED / "data" / "signdigits"
WEIGHTS = SHARED / "weights" / f"{BACKBONE}.safetensors"
LARGE_LONG_SIDE = 3264  # an 8 MP phone photo (3264 x 2448)
SETS = ("roads", "roads-1280", "photos-8mp")


def make_large_photos(folder: Path, variants: int = 6) -> Path:
    """Photos from ../shared/photos upscaled to 8 MP JPEGs, a few distinct crops/flips of each, in 2 class folders."""
    from PIL import Image, ImageOps

    sources = sorted(PHOTOS.glob("*.jpg"))
    if len(list(folder.glob("*/*.jpg"))) == len(sources) * variants:
        return folder
    for k, src in enumerate(sources):
        with Image.open(src) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
            for v in range(variants):
                w, h = img.size
                crop = img.crop((v * w // 40, v * h // 60, w - (variants - v) * w // 40, h - v * h // 60))
                crop = ImageOps.mirror(crop) if v % 2 else crop
                scale = LARGE_LONG_SIDE / max(crop.size)
                big = crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.LANCZOS)
                out = folder / ("ab"[k % 2]) / f"{src.stem}_{v}.jpg"
                out.parent.mkdir(parents=True, exist_ok=True)
                big.save(out, quality=92)
    return folder


def carina_frames(folder: Path) -> Path:
    """Links to the 1280x960 CaRINA frames of ../shared/data/roads, class folders kept."""
    from PIL import Image

    for path in sorted(ROADS.glob("*/*/*.jpg")):
        with Image.open(path) as img:
            if img.size != (1280, 960):
                continue
        link = folder / path.parent.name / f"{path.parent.parent.name}_{path.name}"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(path)
    return folder


def dataset_root(name: str, tmp: Path) -> Path:
    if name == "roads":
        return ROADS
    if name == "roads-1280":
        return carina_frames(tmp / "transferkit-bench-roads1280")
    return make_large_photos(tmp / "transferkit-bench-photos8mp")


def image_folders(root: Path) -> list[Path]:
    """ImageFolder roots: the split folders if there are any, else root."""
    splits = [root / s for s in ("train", "val", "test") if (root / s).is_dir()]
    return splits or [root]


def build_loader(pipeline: str, root: Path, batch_size: int, workers: int, repeat: int, cache_dir: Path):
    import timm
    import torch
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    from transferkit.data.cache import build_cache
    from transferkit.data.dataset import ImageDataset, make_loader
    from transferkit.models.backbones import load_backbone
    from transferkit.models.preprocessing import ImageTransform

    if pipeline.startswith("a_"):
        model = timm.create_model(BACKBONE, pretrained=False)
        transform = create_transform(**resolve_data_config(model=model))
        folders = [ImageFolder(str(f), transform=transform) for f in image_folders(root)]
        dataset = torch.utils.data.ConcatDataset(folders * repeat)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                           persistent_workers=workers > 0), len(dataset)
    _, preprocessing = load_backbone(BACKBONE, pretrained=False)
    paths = sorted(p for f in image_folders(root) for p in f.glob("*/*") if p.is_file()) * repeat
    mode = {"c_transferkit_memory": "memory", "c_transferkit_disk": "disk"}.get(pipeline, "none")
    cache = build_cache(mode, folder=cache_dir, interpolation=preprocessing.interpolation)
    transform = (ImageTransform(preprocessing.reference_transform()) if pipeline.startswith("b0_")
                 else preprocessing.eval_transform())
    dataset = ImageDataset(paths, [0] * len(paths), transform, min_short_side=preprocessing.decode_short_side,
                           cache=cache)
    loader = make_loader(dataset, batch_size, workers=workers)
    loader.cache_line = cache.describe(sorted(set(paths)), preprocessing.decode_short_side) if cache else ""
    return loader, len(dataset)


class PeakPSS:
    """Largest summed PSS of this process and its children, sampled in a thread."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self.process, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            total = 0
            for proc in [self.process, *self.process.children(recursive=True)]:
                try:
                    total += proc.memory_full_info().pss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_one(pipeline: str, root: Path, batch_size: int, workers: int, epochs: int, repeat: int) -> dict:
    """Child process: warm-up epoch, then the best of ``epochs`` timed epochs."""
    import resource

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as cache_dir, PeakPSS() as pss:
        loader, n = build_loader(pipeline, root, batch_size, workers, repeat, Path(cache_dir))
        times, cpu = [], []
        for _ in range(epochs + 1):
            start, start_cpu = time.perf_counter(), _cpu_seconds()
            seen = 0
            for batch, _labels in loader:
                seen += batch.shape[0]
            times.append(time.perf_counter() - start)
            cpu.append(_cpu_seconds() - start_cpu)
            assert seen == n and tuple(batch.shape[1:]) == (3, 224, 224), (seen, batch.shape)
            assert batch.dtype == torch.float32  # every pipeline ends in the model's normalised input
    return {"pipeline": pipeline, "images": n, "first_epoch_s": times[0], "best_epoch_s": min(times[1:]),
            "images_per_s": n / min(times[1:]), "cpu_ms_per_image": min(cpu[1:]) / n * 1000,
            "peak_pss_mb": pss.peak / 2**20, "main_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cache": getattr(loader, "cache_line", "")}


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its (persistent) loader workers so far."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="Timed epochs after the warm-up one; the best is kept.")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved runs of every pipeline; the best is kept.")
    parser.add_argument("--repeat", type=int, default=3, help="Image set repeats per epoch.")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="Where the generated sets go.")
    parser.add_argument("--steps", action="store_true", help="Per-step cost and parity instead of throughput.")
    parser.add_argument("--extract", action="store_true", help="Extraction vs bare forward instead of throughput.")
    parser.add_argument("--child", nargs=2, metavar=("PIPELINE", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_one(args.child[0], Path(args.child[1]), args.batch_size, args.workers, args.epochs, args.repeat)
        print(json.dumps(result))
        return
    if args.steps:
        return step_costs_and_parity(args)
    if args.extract:
        return extraction_ratios(args)

    import platform

    import psutil

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM; "
          f"python {platform.python_version()}; batch {args.batch_size}, workers {args.workers}, "
          f"epoch = set x {args.repeat}; per pipeline: best of {args.rounds} interleaved rounds x "
          f"{args.epochs} epochs after 1 warm-up")
    for name in args.sets:
        root = dataset_root(name, args.tmp)
        print(f"\n== {name}: {root} ({_size_summary(root)})")
        best: dict[str, dict] = {}
        for round_ in range(args.rounds):  # interleaved and rotated, so load from other users hits all alike
            shift = round_ % len(PIPELINES)
            for pipeline in PIPELINES[shift:] + PIPELINES[:shift]:
                r = _run_child(pipeline, root, args)
                if pipeline not in best or r["images_per_s"] > best[pipeline]["images_per_s"]:
                    best[pipeline] = {**r, "cpu_ms_per_image": min(r["cpu_ms_per_image"], best.get(
                        pipeline, r)["cpu_ms_per_image"])}
        baseline, baseline_cpu = (best[PIPELINES[0]][k] for k in ("images_per_s", "cpu_ms_per_image"))
        print(f"{'pipeline':<24}{'images/s':>10}{'vs (a)':>8}{'CPU ms/img':>12}{'vs (a)':>8}{'epoch 1 s':>11}"
              f"{'best s':>8}{'peak PSS MB':>13}{'main RSS MB':>13}")
        for pipeline in PIPELINES:
            r = best[pipeline]
            print(f"{pipeline:<24}{r['images_per_s']:>10.1f}{r['images_per_s'] / baseline:>7.1f}x"
                  f"{r['cpu_ms_per_image']:>12.2f}{baseline_cpu / r['cpu_ms_per_image']:>7.1f}x"
                  f"{r['first_epoch_s']:>11.2f}{r['best_epoch_s']:>8.2f}{r['peak_pss_mb']:>13.0f}{r['main_rss_mb']:>13.0f}")
        for pipeline in PIPELINES:
            if best[pipeline]["cache"]:
                print(f"  {pipeline}: {best[pipeline]['cache']}")


# --------------------------------------------------------------------------- --steps


def step_costs_and_parity(args) -> None:
    """Cost of each step on a few frames per set (one thread), then parity of each variant."""
    import torch

    torch.set_num_threads(1)
    print("step costs, ms per image, one thread, best of 3 (frames: the first 8 of each set)")
    for name in ("roads-1280", "photos-8mp", "signdigits"):
        paths = sorted(SIGNDIGITS.rglob("*.JPG"))[:8] if name == "signdigits" else sorted(
            p for f in image_folders(dataset_root(name, args.tmp)) for p in f.glob("*/*.jpg"))[:8]
        print(f"\n== {name} ({_size_summary_of(paths)})")
        for step, ms in _step_costs(paths).items():
            print(f"  {step:<58}{ms:>8.2f}")
    print("\nparity: mean (min) cosine to timm's eval transform on a full decode, tf_efficientnet_lite0")
    sets = {"roads": sorted(ROADS.rglob("*.jpg")),
            "photos-8mp": sorted(dataset_root("photos-8mp", args.tmp).glob("*/*.jpg"))}
    for name, paths in sets.items():
        for mode in ("crop", "squash", "letterbox"):
            for variant, (mean, low) in _parity(paths, mode).items():
                print(f"  {name:<11}{mode:<10}{variant:<52}{mean:.5f} ({low:.5f})", flush=True)


def _step_costs(paths) -> dict:
    from PIL import Image

    from transferkit.data import decode
    from transferkit.models.backbones import load_backbone

    _, pre = load_backbone(BACKBONE, pretrained=False)
    fused, reference = pre.eval_transform(), pre.reference_transform()
    geometry, tail = reference.transforms[:-2], reference.transforms[-2:]
    short = pre.decode_short_side

    def best(fn) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for path in paths:
                fn(path)
            times.append((time.perf_counter() - start) / len(paths) * 1000)
        return min(times)

    def pil_full(path):
        with Image.open(path) as img:
            return img.convert("RGB")

    def timm_geometry(img):
        for step in geometry:
            img = step(img)
        return img

    drafts = {p: decode.load_scaled(p, short) for p in paths}
    fulls = {p: decode.load_scaled(p) for p in paths}
    pil_drafts = {p: drafts[p].image for p in paths}
    crops = {p: timm_geometry(pil_drafts[p]) for p in paths}
    pixels = {p: fused.pixels(drafts[p]) for p in paths}
    scale = drafts[paths[0]].scale
    return {
        "decode: PIL, full scale": best(pil_full),
        "decode: torchvision decode_jpeg, full scale (used at 1/1)": best(lambda p: decode._decode_jpeg(p)),
        f"decode: load_scaled (PIL draft at 1/{scale}, DRAFT_MARGIN {decode.DRAFT_MARGIN})": best(
            lambda p: decode.load_scaled(p, short)),
        "resize+crop: timm's steps on the draft": best(lambda p: timm_geometry(pil_drafts[p])),
        "resize+crop: fused, one box resize on the draft (used)": best(lambda p: fused.pixels(drafts[p])),
        "resize+crop: fused on the full decode": best(lambda p: fused.pixels(fulls[p])),
        "resize+crop: fused on the full decode, reducing_gap 3": best(
            lambda p: _with_reducing_gap(fused, 3.0, fulls[p])),
        "to model input: ToTensor + Normalize per image (before)": best(lambda p: tail[1](tail[0](crops[p]))),
        "to model input: uint8 CHW per image + batched normalize (used)": best(lambda p: None) + _batched_normalize_ms(
            pre, [pixels[p] for p in paths]),
    }


def _with_reducing_gap(transform, gap: float, image):
    """``transform.pixels(image)`` with PIL's reducing_gap on its resize (what --steps measures)."""
    import copy
    from dataclasses import replace

    variant = copy.copy(transform)
    variant.plan = replace(transform.plan, reducing_gap=gap)
    return variant.pixels(image)


def _batched_normalize_ms(pre, pixels) -> float:
    import torch

    batch = torch.stack(pixels * 4)
    start = time.perf_counter()
    for _ in range(5):
        pre.normalize(batch)
    return (time.perf_counter() - start) / 5 / len(batch) * 1000


def _parity(paths, mode: str) -> dict:
    """Mean and min cosine per variant: draft margins, timm's steps vs fused, reducing_gap."""
    import torch
    from PIL import Image

    from transferkit.data import decode
    from transferkit.models.embedding import build_feature_model
    from transferkit.models.preprocessing import ImageTransform

    model, pre = build_feature_model(BACKBONE, weights=WEIGHTS, resize_mode=mode)
    model.eval()
    reference, fused = pre.reference_transform(), pre.eval_transform()
    short = pre.decode_short_side

    def features(make) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([model(torch.stack([make(p) for p in paths[i:i + 16]])) for i in range(0, len(paths), 16)])

    def margin(value, fn):
        saved, decode.DRAFT_MARGIN = decode.DRAFT_MARGIN, value
        try:
            return fn()
        finally:
            decode.DRAFT_MARGIN = saved

    timm_steps = ImageTransform(reference)
    target = features(lambda p: reference(Image.open(p).convert("RGB")))
    variants = {
        "full decode + fused": lambda: features(lambda p: fused(decode.load_scaled(p))),
        "full decode + fused, reducing_gap 3": lambda: features(
            lambda p: pre.normalize(_with_reducing_gap(fused, 3.0, decode.load_scaled(p)))),
        "draft 1.5 + timm's steps on the draft (before)": lambda: features(lambda p: timm_steps(decode.load_image(p, short))),
        "draft 1.5 + fused, planned on the full frame (used)": lambda: features(lambda p: fused(decode.load_scaled(p, short))),
        "draft 1.15 + fused": lambda: margin(1.15, lambda: features(lambda p: fused(decode.load_scaled(p, short)))),
        "draft 1.0 + fused": lambda: margin(1.0, lambda: features(lambda p: fused(decode.load_scaled(p, short)))),
    }
    result = {}
    for name, compute in variants.items():
        cosine = torch.nn.functional.cosine_similarity(compute(), target)
        result[name] = (cosine.mean().item(), cosine.min().item())
    return result


# --------------------------------------------------------------------------- --extract


def extraction_ratios(args) -> None:
    """bench_features.py's extraction-vs-bare-forward measure on signdigits and the 1280x960 frames (x6)."""
    import torch
    from bench_features import extraction_vs_bare_forward

    roads = carina_frames(args.tmp / "transferkit-bench-roads1280")
    repeated = args.tmp / "transferkit-bench-roads1280x6"
    for k in range(6):
        for src in sorted(roads.glob("*/*.jpg")):
            link = repeated / src.parent.name / f"{src.stem}_r{k}.jpg"
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(src.resolve())
    print(f"extraction (start-up included) vs bare forward, batch {args.batch_size}, {torch.get_num_threads()} torch "
          f"threads, best of {args.rounds}")
    for name, root in (("signdigits", SIGNDIGITS), ("roads-1280 x6", repeated)):
        with tempfile.TemporaryDirectory() as tmp:
            result = extraction_vs_bare_forward(root, Path(tmp) / "features.parquet", args.batch_size, args.rounds)
        print(f"== {name}: {json.dumps(result)}", flush=True)


def _size_summary_of(paths) -> str:
    from PIL import Image

    with Image.open(paths[0]) as img:
        return f"{len(paths)} frames, the first {img.width}x{img.height}"


def _run_child(pipeline: str, root: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", pipeline, str(root), "--batch-size", str(args.batch_size),
           "--workers", str(args.workers), "--epochs", str(args.epochs), "--repeat", str(args.repeat)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
    return json.loads(out.strip().splitlines()[-1])


def _size_summary(root: Path) -> str:
    from collections import Counter

    from PIL import Image

    counts = Counter()
    for path in sorted(p for f in image_folders(root) for p in f.glob("*/*") if p.is_file()):
        with Image.open(path) as img:
            counts[f"{img.width}x{img.height}"] += 1
    common = ", ".join(f"{n}x {size}" for size, n in counts.most_common(3))
    return f"{sum(counts.values())} JPEGs; {common}{', ...' if len(counts) > 3 else ''}"


if __name__ == "__main__":
    main()
