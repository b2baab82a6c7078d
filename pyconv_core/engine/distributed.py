"""torchrun + DistributedDataParallel plumbing: process group set-up and metric reduction.

Launch with ``torchrun --nproc_per_node N -m pyconv_core.run ...``; torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK, and :func:`init` picks NCCL on CUDA and gloo on CPU.
"""
from __future__ import annotations

import os
from typing import TypeVar

import torch
import torch.distributed as dist

__all__ = ["init", "is_distributed", "rank", "launched_rank", "world_size", "is_main", "all_reduce_sum",
           "all_reduce_max", "broadcast_object", "barrier", "cleanup"]


def init() -> torch.device:
    """Join the process group when started by torchrun; return this process's device."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def launched_rank() -> int:
    """This process's rank, also before it joins the process group (torchrun's ``RANK``)."""
    return rank() if is_distributed() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Only rank 0 writes files and prints progress."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (identity in a single process); returns the tensor."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of a tensor over all processes (identity in a single process); returns the tensor."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


T = TypeVar("T")


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every process (``obj`` itself in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
