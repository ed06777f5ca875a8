"""What every benchmark script shares: offline environment, the real data/weights paths, best-of timing."""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ROADS = SHARED / "data" / "roads"
BACKBONE = "tf_efficientnet_lite0"
WEIGHTS = SHARED / "weights" / f"{BACKBONE}.safetensors"


def best_time(fn, rounds: int) -> float:
    """Best of ``rounds`` wall times: the machine is shared, and the minimum is the least disturbed run."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
