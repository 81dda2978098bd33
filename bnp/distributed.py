"""torch.distributed for the runner: ``torchrun --nproc_per_node=N -m bnp.train ...``.

Every process trains on its shard of each global batch (``train.batch_size`` is the global batch);
gradients are averaged by DistributedDataParallel and BNP pools its statistics over ranks, so all
replicas stay identical. Rank 0 alone writes metrics, checkpoints, the summary and W&B.
"""

from __future__ import annotations

import os

import torch
from torch import distributed as dist


def setup() -> tuple[int, int]:
    """Join the process group that torchrun describes (if any); returns (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device(device: torch.device) -> torch.device:
    """One GPU per process: cuda:LOCAL_RANK."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def summed(*values: torch.Tensor) -> list[torch.Tensor]:
    """Sums over ranks (copies; the inputs are left alone); the values themselves with one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    flat = torch.stack([v.double() for v in values])
    dist.all_reduce(flat)
    return list(flat.unbind())


def from_rank0(value):
    """Rank 0's ``value`` on every rank (a decision only rank 0 can make, e.g. from the files it
    alone writes); the value itself with one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class NullLog:
    """The metric sink of ranks other than 0: accepts everything, writes nothing."""

    def offset(self) -> int:
        return 0

    def truncate(self, offset: int) -> None:
        pass

    def replay(self) -> int:
        return 0

    def initial_val_loss(self) -> None:
        return None

    def log(self, row: dict) -> None:
        pass

    def close(self, summary) -> None:
        pass
