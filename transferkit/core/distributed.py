"""torchrun support: a process group from the launcher's environment, and the few collectives we use.

transferkit never spawns processes itself: `torchrun --nproc-per-node N -m transferkit ...` sets
WORLD_SIZE/RANK/MASTER_ADDR, and :func:`process_group` joins the group (gloo on CPU, nccl on GPU).
Without a launcher every helper answers as a single process, so callers need no special case.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist


def launched() -> bool:
    """True when a launcher (torchrun) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 decides, writes and reports; outside the group the launcher's RANK still tells."""
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))) == 0


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join the launcher's process group for the duration of the block (no-op for one process)."""
    if not launched() or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def broadcast_from_main(value):
    """``value`` as rank 0 has it, on every rank (a small picklable object, between our own ranks only)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_rows(rows: np.ndarray | None, max_rows: int, dim: int, device: torch.device) -> list[np.ndarray]:
    """Every rank's ``[n, dim]`` float32 block (``None`` = no rows), in rank order, on every rank.

    Blocks are padded to ``max_rows`` so one fixed-size all_gather works on gloo and nccl alike.
    """
    if not dist.is_initialized():
        return [rows if rows is not None else np.zeros((0, dim), np.float32)]
    count = 0 if rows is None else len(rows)
    padded = torch.zeros((max_rows, dim + 1), dtype=torch.float32, device=device)
    padded[:, dim] = count
    if count:
        padded[:count, :dim] = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(device)
    gathered = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(gathered, padded)
    return [block[: int(block[0, dim]), :dim].cpu().numpy() for block in gathered]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (per-rank loss sums, correct counts, sample counts)."""
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shard_indices(n: int) -> list[int]:
    """This rank's share of ``range(n)`` for evaluation (strided, no padding, so nothing is counted twice)."""
    return list(range(rank(), n, world_size()))


def train_sampler(n: int, *, seed: int, shuffle: bool = True) -> torch.utils.data.DistributedSampler:
    """torch's DistributedSampler, also for one process: the same seeded permutation per epoch
    (``set_epoch``) whatever the world size, each rank taking every world_size-th index of it."""
    from torch.utils.data import DistributedSampler

    return DistributedSampler(range(n), num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed)
