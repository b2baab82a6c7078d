"""The Trainer's data loaders: each epoch's batches fixed by the run's seed and the epoch, sharded over DDP
processes, with the same augmentation in any worker and after a resume, and workers that a stop signal
does not kill."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Sized
from typing import Any, cast

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from pyconv_core.engine import distributed as dist
from pyconv_core.engine.stop import STOP_SIGNALS

__all__ = ["EpochLoader", "SeededBatches", "epoch_loader", "dataset_len", "batch_len"]


class EpochLoader(DataLoader):
    """A DataLoader whose workers never see SIGTERM/SIGINT: they start with both blocked (a worker inherits
    the signal mask of the thread that starts it) and keep them blocked. A scheduler or Ctrl-C signals the
    whole process group; the main process saves and stops, while a worker killed by the signal would fail
    the step before the save (and print its traceback).

    Such workers cannot be ended by ``terminate()`` either, which is how torch and multiprocessing's exit
    handler end workers whose iterator was never shut down (e.g. one kept alive by the traceback of an
    error raised mid-epoch): the process would hang at exit. So the loader is closed on every way out of
    the code that iterates it (``with contextlib.closing(loader)``): :meth:`close` shuts down the workers
    of every iterator it started."""

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            iterator = super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        self.__dict__.setdefault("_started", []).append(iterator)
        return iterator

    def close(self) -> None:
        """Shut down the worker processes of the iterators this loader started (waits for them to exit)."""
        for iterator in self.__dict__.pop("_started", []):
            iterator._shutdown_workers()


class SeededBatches(Dataset):
    """A training set whose random transforms draw, per batch, from torch's generator seeded by the run's
    seed, the epoch and the batch's first index; the process's own generator is restored afterwards. A
    batch's augmentation is then the same in any DataLoader worker or in the main process, and after a
    resume that skips the batches trained before the stop (worker w of a resumed epoch would otherwise
    continue another worker's random stream)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return dataset_len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + indices[0])
            return [self.dataset[i] for i in indices]


def dataset_len(sized: object) -> int:
    """``len`` of a data set or batch sampler (torch's types do not declare ``__len__`` on them)."""
    return len(cast(Sized, sized))


def epoch_loader(
    dataset: Dataset,
    batch_size: int,
    collate_fn: Callable[[list], Any] | None,
    epoch: int,
    train: bool,
    seed: int,
    num_workers: int,
    skip_batches: int = 0,
) -> EpochLoader:
    """Epoch-seeded sharded loader: in training, rank r of W takes every W-th index of one
    permutation, so W processes see exactly the global batches of one process and an epoch's order
    is reproducible; in evaluation every sample is seen exactly once (no padding duplicates)."""
    sampler: Iterable[int]
    if train:
        shuffled: DistributedSampler[int] = DistributedSampler(
            dataset, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True, seed=seed, drop_last=True
        )
        shuffled.set_epoch(epoch)
        sampler = shuffled
    else:
        sampler = range(dist.rank(), dataset_len(dataset), dist.world_size())
    per_rank = max(1, batch_size // dist.world_size())
    batches = list(BatchSampler(sampler, per_rank, drop_last=train))[skip_batches:]
    epoch_seed = seed * 1_000_003 + epoch
    return EpochLoader(
        SeededBatches(dataset, epoch_seed) if train else dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(epoch_seed),
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


def batch_len(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return len(first)
