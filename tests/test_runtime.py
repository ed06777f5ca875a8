"""Device choice and mixed-precision decisions, exercised on CPU by faking what a GPU machine reports."""

from __future__ import annotations

import contextlib

import pytest
import torch

from transferkit.core import runtime
from transferkit.errors import TransferkitError


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert runtime.select_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert runtime.select_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")  # torchrun: rank 3 of a 2-GPU node wraps onto cuda:1
    assert runtime.select_device(None) == torch.device("cuda", 1)


def test_unavailable_or_unknown_devices_are_one_line_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TransferkitError, match="no CUDA GPU"):
        runtime.select_device("cuda:0")
    with pytest.raises(TransferkitError, match="unknown device"):
        runtime.select_device("tpu-ish")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(TransferkitError, match="only 1 GPU"):
        runtime.select_device("cuda:1")


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_prefers_bf16_and_falls_back_to_fp16(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    assert runtime.amp_dtype(torch.device("cuda")) is expected
    assert runtime.amp_dtype(torch.device("cpu")) is None


def test_autocast_is_off_on_cpu_and_when_disabled():
    cpu = torch.device("cpu")
    assert isinstance(runtime.autocast(cpu), contextlib.nullcontext)
    with runtime.autocast(cpu):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    assert isinstance(runtime.autocast(torch.device("cuda"), enabled=False), contextlib.nullcontext)


def test_cpu_path_keeps_contiguous_memory_and_moves_nothing():
    model = torch.nn.Conv2d(3, 4, 3)
    prepared = runtime.prepare_model(model, torch.device("cpu"))
    assert prepared.weight.is_contiguous()
    batch = torch.zeros(2, 3, 8, 8)
    assert runtime.to_device(batch, torch.device("cpu")).is_contiguous()


def test_seeding_repeats_torch_numpy_and_python_streams():
    import random

    import numpy as np

    runtime.seed_everything(123)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    runtime.seed_everything(123)
    assert first == (random.random(), np.random.rand(), torch.rand(1).item())


@pytest.mark.parametrize("benchmark", [False, True])
def test_cudnn_autotuning_is_a_setting_off_by_default(monkeypatch, benchmark):
    """cuDNN's autotuner picks kernels by timing them, which breaks seeded repeatability: only on request."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not benchmark)
    runtime.prepare_model(torch.nn.Linear(2, 2), torch.device("cpu"), benchmark=benchmark)
    assert torch.backends.cudnn.benchmark is benchmark
    runtime.prepare_model(torch.nn.Linear(2, 2), torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
