"""Device choice, mixed precision and seeding, shared by training, extraction and inference."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from transferkit.errors import TransferkitError


def select_device(spec: str | None = "auto") -> torch.device:
    """``auto`` picks cuda > mps > cpu; ``cuda:1`` etc. are checked against what is present."""
    spec = (spec or "auto").lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise TransferkitError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TransferkitError(f"device {spec} requested but no CUDA GPU is available; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise TransferkitError(f"device {spec} requested but only {torch.cuda.device_count()} GPU(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TransferkitError("device mps requested but MPS is not available; use --device cpu or auto")
    return device


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16 (which needs a grad scaler); None on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def autocast(device: torch.device, enabled: bool = True):
    dtype = amp_dtype(device)
    if not enabled or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def prepare_model(model: torch.nn.Module, device: torch.device, *, benchmark: bool = False) -> torch.nn.Module:
    """Move to ``device``; channels_last on GPU, where convolutions run faster in NHWC.

    ``benchmark`` turns on cuDNN's autotuner: faster convolutions for fixed input shapes, but it picks kernels
    by timing them, so a seeded run no longer repeats exactly. Off by default, keeping seeded runs deterministic.
    """
    model = model.to(device)
    torch.backends.cudnn.benchmark = benchmark
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def to_device(batch: torch.Tensor, device: torch.device, normalize=None) -> torch.Tensor:
    """``batch`` on ``device`` (channels_last on a GPU, where convolutions run faster in NHWC); with ``normalize``
    (uint8 pixels → the model's input, :meth:`~transferkit.models.preprocessing.Preprocessing.normalize`) it moves
    as uint8 and is converted there."""
    batch = batch.to(device, non_blocking=device.type == "cuda")
    if device.type == "cuda" and batch.dim() == 4:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch if normalize is None else normalize(batch)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Same seed, same metrics on CPU: python, numpy and torch RNGs, and deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
