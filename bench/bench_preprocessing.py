"""Preprocessing parity and speed: transferkit's eval transform against timm's own, before and after the
Preprocessing object (issue 16).

For each resize mode (crop, squash, letterbox) and dataset, the features of ``tf_efficientnet_lite0`` (real
weights from ../shared/weights) are compared by cosine similarity with the features of timm's own eval
transform (``timm.data.create_transform(**data_config, is_training=False)`` on the fully decoded PIL image):

- ``before``: the albumentations/cv2 eval transform of commit 4be90e4 with its draft decode (read from git);
- ``after``: :class:`transferkit.models.preprocessing.Preprocessing` with the draft decode (what runs now);
- ``after_full_decode``: the same without draft decode, to show what the draft step alone costs.

Speed: decode + transform, one thread, images per second over the same files (best of ``--rounds``).
Also counts the places in ``transferkit/`` that build an eval transform, before and after.
Usage: python bench/bench_preprocessing.py [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

from _common import BACKBONE, REPO, SHARED, WEIGHTS

ROOT = REPO

DATASETS = {"roads (../shared, up to 1280x960)": SHARED / "data" / "roads", "demo/roads (480x360)": ROOT / "demo" / "roads"}
BEFORE = "4be90e4"


def old_preprocessing_module():
    """transferkit/models/preprocessing.py as it was at BEFORE, importable on its own."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{BEFORE}:transferkit/models/preprocessing.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_preprocessing.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_preprocessing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def old_draft_decode(path, min_short_side):
    """The draft decode of BEFORE: no margin above the short side the resize reads."""
    from PIL import Image, ImageOps

    from transferkit.data.decode import to_rgb_array

    with Image.open(path) as img:
        if img.format == "JPEG":
            width, height = img.size
            scale = min_short_side / min(width, height)
            img.draft("RGB", (max(1, int(-(-width * scale // 1))), max(1, int(-(-height * scale // 1)))))
        img.load()
        return to_rgb_array(ImageOps.exif_transpose(img))


def pipelines(mode: str, old, preprocessing):
    from transferkit.data.decode import load_image

    old_config = {**preprocessing.data_config, "crop_mode": None}  # BEFORE never read crop_mode
    old_transform = old.build_eval_transform(old_config, mode)  # squash/letterbox ignored crop_pct there
    old_short = old.working_short_side(old_config, mode)
    ours = preprocessing.eval_transform()
    return {
        "before": lambda p: old_transform(image=old_draft_decode(p, old_short))["image"],
        "after": lambda p: ours(load_image(p, preprocessing.decode_short_side)),
        "after_full_decode": lambda p: ours(load_image(p)),
    }


def measure(rounds: int) -> dict:
    import torch
    from PIL import Image
    from timm.data import create_transform

    from transferkit.models.embedding import build_feature_model

    torch.set_num_threads(1)
    old = old_preprocessing_module()
    results = {}
    for label, root in DATASETS.items():
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        for mode in ("crop", "squash", "letterbox"):
            model, preprocessing = build_feature_model(BACKBONE, weights=WEIGHTS, resize_mode=mode)
            model.eval()
            reference_transform = create_transform(**preprocessing.data_config, is_training=False)
            row = {"images": len(paths), "data_config": preprocessing.data_config}
            speeds = {"timm_reference_full_decode": lambda p, t=reference_transform: t(Image.open(p).convert("RGB"))}
            with torch.inference_mode():
                reference = model(torch.stack([speeds["timm_reference_full_decode"](p) for p in paths]))
                for name, pipeline in pipelines(mode, old, preprocessing).items():
                    features = model(torch.stack([pipeline(p) for p in paths]))
                    cosine = torch.nn.functional.cosine_similarity(features, reference)
                    row[f"cosine_{name}"] = {"mean": round(cosine.mean().item(), 5), "min": round(cosine.min().item(), 5)}
                    speeds[name] = pipeline
            for name, pipeline in speeds.items():
                best = 0.0
                for _ in range(rounds):
                    started = time.perf_counter()
                    for p in paths:
                        pipeline(p)
                    best = max(best, len(paths) / (time.perf_counter() - started))
                row[f"img_s_{name}"] = round(best, 1)
            results[f"{label} / {mode}"] = row
            print(json.dumps({f"{label} / {mode}": row}), flush=True)
    return results


def transform_build_sites() -> dict:
    """Places in transferkit/ that build an eval transform (calls, not definitions), before and after."""
    before = subprocess.run(["git", "-C", str(ROOT), "grep", "-n", "-E", r"build_eval_transform\(|eval_resize\(",
                             BEFORE, "--", "transferkit"], capture_output=True, text=True).stdout.splitlines()
    before = [line for line in before if not re.search(r":def |preprocessing.py", line)]
    after = subprocess.run(["grep", "-rn", "-E", r"create_transform\(", str(ROOT / "transferkit")],
                           capture_output=True, text=True).stdout.splitlines()
    return {"before": len(before), "before_sites": [line.split(":", 3)[1] for line in before],
            "after": len(after), "after_sites": [line.split(":")[0].replace(str(ROOT) + "/", "") for line in after]}


def machine() -> dict:
    import os
    import platform

    import PIL
    import timm
    import torch

    return {"cpus": os.cpu_count(), "load_average": [round(v, 1) for v in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "pillow": PIL.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not WEIGHTS.is_file():
        raise SystemExit(f"needs {WEIGHTS}")
    report = {"machine": machine(), "transform_build_sites": transform_build_sites(), "results": measure(args.rounds)}
    print(json.dumps(report["transform_build_sites"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
