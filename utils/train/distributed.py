"""Process-group set-up for torchrun: DistributedDataParallel with NCCL on GPUs and gloo on CPUs."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank among world_size processes, local_rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_node_main(self) -> bool:
        """The first process of its node (local rank 0): what each machine prepares for itself, it prepares."""
        return self.local_rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group that torchrun describes in the environment; a plain run stays single-process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(f"torchrun started local rank {local_rank} but this machine has {count} GPU(s) that "
                             f"PyTorch sees: start at most {count} processes per node (--nproc_per_node {count}), "
                             f"or train on the CPU with --device cpu")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(info: DistInfo, value):
    """Rank 0's ``value`` on every rank."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


T = TypeVar("T")


def read_on_main(info: DistInfo, read: Callable[[], T]) -> T:
    """``read()`` on rank 0 only (a file that only its node holds), its result sent to every rank. An error there
    is raised on rank 0, and on the other ranks as a RuntimeError that quotes it."""
    value, error = None, None
    if info.is_main:
        try:
            value = read()
        except Exception as caught:
            error = caught
    value, message = broadcast_object(info, (value, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 failed to read what every rank needs: {message}")
    return value


def gather_objects(info: DistInfo, value) -> list:
    """Every rank's ``value``, in rank order, on every rank."""
    if not info.enabled:
        return [value]
    out = [None] * info.world_size
    dist.all_gather_object(out, value)
    return out


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_buffers(info: DistInfo, module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, in place: every rank then holds the model
    rank 0 saves, and validation under torchrun scores that one model."""
    if info.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def mean_over_ranks(info: DistInfo, values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the ranks (every rank gets it); one all-reduce."""
    if not info.enabled:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / info.world_size
