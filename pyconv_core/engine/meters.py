"""The training losses the Trainer logs: summed on the device step by step, averaged per step row and per
epoch, and reduced over DDP processes."""

from __future__ import annotations

import torch

from pyconv_core.engine import distributed as dist

__all__ = ["DeviceSums", "means", "reduce_means", "reduce_sum"]


class DeviceSums:
    """Per-key sums of a run's step losses, kept where the losses are (in float64): adding a step's losses
    does not wait for the device, as ``float(loss)`` every step would; :meth:`values` reads them (once per
    step row). The sums equal Python floats added step by step (float32 values, float64 additions in order)."""

    def __init__(self, start: dict[str, float] | None = None) -> None:
        self.sums = {key: torch.tensor(value, dtype=torch.float64) for key, value in (start or {}).items()}

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for key, value in losses.items():
            value = value.detach().to(torch.float64)
            self.sums[key] = self.sums[key] + value if key in self.sums else value

    def values(self) -> dict[str, float]:
        return {key: float(value) for key, value in self.sums.items()}


def means(sums: dict[str, float], count: float) -> dict[str, float]:
    """Per-step means as ``train_<key>``; ``num_*`` entries (e.g. skipped files) are totals."""
    return {
        k if k.startswith("num_") else f"train_{k}": float(v) if k.startswith("num_") else float(v) / count
        for k, v in sums.items()
    }


def reduce_means(sums: dict[str, float], count: int, device: torch.device) -> dict[str, float]:
    """:func:`means` over all processes."""
    keys = sorted(sums)
    packed = dist.all_reduce_sum(torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64, device=device))
    return means(dict(zip(keys, packed[:-1].tolist())), float(packed[-1]))


def reduce_sum(value: float, device: torch.device) -> float:
    return float(dist.all_reduce_sum(torch.tensor([value], dtype=torch.float64, device=device))[0])
