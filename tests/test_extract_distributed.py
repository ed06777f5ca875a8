"""`extract` under torchrun: images sharded over 2 CPU processes (gloo), one merged file, same as 1 process."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE, free_port

from transferkit.features.extract import extract_features
from transferkit.features.feature_file import read_features

pytestmark = pytest.mark.slow  # torchrun: two fresh interpreters


def test_two_process_extract_equals_single_process(tiny_data3, tiny_weights, tmp_path):
    # 18 images in batches of 4: rank 0 computes batches 0, 2, 4 (the last one short), rank 1 batches 1, 3.
    # One thread here as in each torchrun worker (OMP_NUM_THREADS=1): the same kernels give bit-identical vectors.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = extract_features(TINY_BACKBONE, tiny_data3, tmp_path / "single.parquet", weights=tiny_weights,
                                  batch_size=4, workers=0, device="cpu")
    finally:
        torch.set_num_threads(threads)
    merged = tmp_path / "merged.parquet"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", "transferkit", "extract", "--backbone", TINY_BACKBONE, "--weights", str(tiny_weights),
               "--data", str(tiny_data3), "--out", str(merged), "--batch-size", "4", "--workers", "0",
               "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("18 images x 256 features") == 1, "only rank 0 reports"
    (a, meta_a), (b, meta_b) = read_features(single), read_features(merged)
    assert meta_a == meta_b
    for name in ("paths", "labels", "label_index", "splits"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(a.vectors, b.vectors)  # same batches, same kernels: bit-identical
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp files left by any rank"
