"""torchrun + DistributedDataParallel plumbing: process group set-up and metric reduction.

Launch with ``torchrun --nproc_per_node N -m pyconv_core.run ...``; torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK, and :func:`init` picks NCCL on CUDA and gloo on CPU. Every collective (and
joining the group) waits at most ``timeout_s`` for the other processes (the launcher's ``ddp_timeout_s``):
a stalled rank then ends the job, gloo raising an error that :func:`collective_failure` says in one line,
NCCL's watchdog aborting the process with its own "collective operation timeout" line. Each attempt of a
job that torchrun restarts (``--max-restarts``) joins under keys of its own in torchrun's store.
"""

from __future__ import annotations

import datetime
import os
import re
from typing import TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "init",
    "launched",
    "restart_count",
    "collective_failure",
    "is_distributed",
    "rank",
    "launched_rank",
    "world_size",
    "is_main",
    "all_reduce_sum",
    "all_reduce_max",
    "broadcast_object",
    "barrier",
    "cleanup",
]

DEFAULT_TIMEOUT_S = 300.0  # seconds a collective waits for the other processes (why: tasks/base.py, ddp_timeout_s)
_timeout_s = DEFAULT_TIMEOUT_S  # the group's, once joined (for the message of collective_failure)


def init(timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the process group when started by torchrun, every collective waiting at most ``timeout_s`` for
    the other processes; return this process's device. Once joined, later calls return the device only."""
    global _timeout_s
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if launched() and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        timeout = datetime.timedelta(seconds=timeout_s)
        store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun's store outlives a restart (--max-restarts) and holds the failed attempt's keys: the ranks
        # of a restart would read the dead processes' addresses and fail to connect, so each attempt has its own
        store = dist.PrefixStore(f"attempt{restart_count()}", store)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=size, timeout=timeout)
        _timeout_s = timeout_s
    return torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def launched() -> bool:
    """Whether torchrun started this process (it sets WORLD_SIZE), also before it joins the process group."""
    return "WORLD_SIZE" in os.environ


def restart_count() -> int:
    """How often torchrun (``--max-restarts``) has restarted this job's processes: 0 in the first attempt."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def collective_failure(err: BaseException) -> str | None:
    """One line for an error that a collective raised because another process stalled (past the group's
    timeout) or ended, saying what to do; None for any other error. Gloo raises a plain RuntimeError
    ("Timed out waiting 300000ms for recv operation", "Connection closed by peer"), joining the group a
    ``torch.distributed.DistError``."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    text = next((line for line in lines if "gloo" in line.lower()), lines[0])  # the backend's own line
    if not (isinstance(err, dist.DistError) or "gloo" in text.lower()):
        return None
    if re.search(r"timed out|timeout", text, re.IGNORECASE):
        return (
            f"a collective waited more than ddp_timeout_s={_timeout_s:g} s for another process, which stalled "
            f"({text}): find the rank that stalled (its output stopped first), or raise "
            f"--ddp-timeout-s if its work between collectives (a checkpoint, an evaluation) takes that long"
        )
    if re.search(r"(closed|reset) by peer|broken pipe", text, re.IGNORECASE):
        return (
            f"a collective failed because another process ended ({text}): torchrun's summary names the rank "
            f"that failed first, whose own error is the cause"
        )
    return None


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
