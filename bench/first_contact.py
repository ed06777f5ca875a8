"""Issue 25: seconds to a usage error and to the first line of a real `finetune`, for the code on PYTHONPATH.

    python bench/first_contact.py [--repeat 3]   (run it from the checkout to measure; PYTHONPATH=OLD_TREE for before)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

CASES = {
    "no --data": ["finetune", "--backbone", "tf_efficientnet_lite0"],
    "misspelt backbone": ["finetune", "--backbone", "resnet5", "--data", "demo/roads", "--no-track"],
    "key=value typo": ["finetune", "--backbone", "tf_efficientnet_lite0", "--data", "demo/roads", "epoch=2"],
}
RUN = ["finetune", "--recipe", "quick-cpu", "--data", "demo/roads", "--no-track", "--out", "/tmp/first-contact-runs"]


def usage_error(args) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "transferkit", *args], capture_output=True)
    return time.perf_counter() - started


def first_line(args) -> tuple[float, str]:
    """Seconds until the command writes its first line on stderr; the command is then stopped."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "transferkit", *args], stderr=subprocess.PIPE, text=True,
                               stdout=subprocess.DEVNULL)
    line = process.stderr.readline()
    seconds = time.perf_counter() - started
    process.kill()
    process.wait()
    return seconds, line.strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    repeat = parser.parse_args().repeat
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name, args in CASES.items():
        print(f"usage error, {name:<18} median {statistics.median(usage_error(args) for _ in range(repeat)):.2f} s")
    times, line = zip(*(first_line(RUN) for _ in range(repeat)))
    print(f"first line of finetune      median {statistics.median(times):.2f} s: {line[0]!r}")


if __name__ == "__main__":
    main()
