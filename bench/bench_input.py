"""Input pipeline throughput (no model): stock torchvision + timm eval transform vs transferkit.

Pipelines, same images, batch size and workers for all:
  (a) torchvision ImageFolder + PIL + timm.data.create_transform(**resolve_data_config(model))
  (b) transferkit ImageDataset: JPEG draft decode + albumentations eval transform, no cache
  (c) the same with --cache memory / --cache disk, measured after the first epoch filled the cache

Each pipeline runs in its own process (clean peak memory): one warm-up epoch, then --epochs timed
epochs. The pipelines run in --rounds interleaved rounds and each keeps its best epoch: the machine is
shared, so the best repeat is the least disturbed one and load spikes hit every pipeline alike. An epoch is the
image set repeated --repeat times, so it lasts long enough to time. Memory is the peak of the summed
PSS (proportional set size: shared pages split between the processes sharing them) over the main and
worker processes, sampled every 50 ms, and the main process's own peak RSS.

    .venv/bin/python bench/bench_input.py       # all roads frames, the 1280x960 ones alone, 8 MP photos
    .venv/bin/python bench/bench_input.py --sets roads --workers 2 --batch-size 32
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
PIPELINES = ("a_torchvision_timm", "b_transferkit", "c_transferkit_memory", "c_transferkit_disk")
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

    if pipeline.startswith("a_"):
        model = timm.create_model(BACKBONE, pretrained=False)
        transform = create_transform(**resolve_data_config(model=model))
        folders = [ImageFolder(str(f), transform=transform) for f in image_folders(root)]
        dataset = torch.utils.data.ConcatDataset(folders * repeat)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                           persistent_workers=workers > 0), len(dataset)
    _, preprocessing = load_backbone(BACKBONE, pretrained=False)
    paths = sorted(p for f in image_folders(root) for p in f.glob("*/*") if p.is_file()) * repeat
    mode = {"b_transferkit": "none", "c_transferkit_memory": "memory", "c_transferkit_disk": "disk"}[pipeline]
    cache = build_cache(mode, folder=cache_dir, interpolation=preprocessing.interpolation)
    dataset = ImageDataset(paths, [0] * len(paths), preprocessing.eval_transform(),
                           min_short_side=preprocessing.decode_short_side, cache=cache)
    return make_loader(dataset, batch_size, workers=workers), len(dataset)


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
        times = []
        for _ in range(epochs + 1):
            start = time.perf_counter()
            seen = 0
            for batch, _labels in loader:
                seen += batch.shape[0]
            times.append(time.perf_counter() - start)
            assert seen == n and tuple(batch.shape[1:]) == (3, 224, 224), (seen, batch.shape)
    return {"pipeline": pipeline, "images": n, "first_epoch_s": times[0], "best_epoch_s": min(times[1:]),
            "images_per_s": n / min(times[1:]), "peak_pss_mb": pss.peak / 2**20,
            "main_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="Timed epochs after the warm-up one; the best is kept.")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved runs of every pipeline; the best is kept.")
    parser.add_argument("--repeat", type=int, default=3, help="Image set repeats per epoch.")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="Where the generated sets go.")
    parser.add_argument("--child", nargs=2, metavar=("PIPELINE", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_one(args.child[0], Path(args.child[1]), args.batch_size, args.workers, args.epochs, args.repeat)
        print(json.dumps(result))
        return

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
                    best[pipeline] = r
        baseline = best[PIPELINES[0]]["images_per_s"]
        print(f"{'pipeline':<24}{'images/s':>10}{'vs (a)':>8}{'epoch 1 s':>11}{'best s':>8}"
              f"{'peak PSS MB':>13}{'main RSS MB':>13}")
        for pipeline in PIPELINES:
            r = best[pipeline]
            print(f"{pipeline:<24}{r['images_per_s']:>10.1f}{r['images_per_s'] / baseline:>7.1f}x"
                  f"{r['first_epoch_s']:>11.2f}{r['best_epoch_s']:>8.2f}{r['peak_pss_mb']:>13.0f}{r['main_rss_mb']:>13.0f}")


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
