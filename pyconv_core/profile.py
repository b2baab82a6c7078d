"""Parameter and FLOP counts of registered models against the paper's figures.

``python -m pyconv_core.profile`` prints one row per model and input size.

Convention (docs/paper.md#counting): one fused multiply-add counts as one FLOP. ``gmacs`` counts
convolutions and linear layers only; ``gflops`` adds one operation per output element of the
element-wise work (batch norm, activations, residual adds, pooling, resampling), which is how
the paper's figures were counted (the convention of the ptflops counter). Counting happens at the
ATen level (a dispatch mode), so functional ops (``F.interpolate``, ``+``) are seen as well as modules.
"""
from __future__ import annotations

import argparse
import math
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pyconv_core.registry import build, list_models, model_entry

__all__ = ["count_params", "count_flops", "profile_rows", "format_table", "FLOP_CONVENTION"]

FLOP_CONVENTION = ("1 FLOP = 1 multiply-accumulate; GMACs = conv + linear only; GFLOPs = GMACs + "
                   "element-wise work: 2 per BN output (scale, shift), 1 per pooling input, 1 per output "
                   "of activations, adds and resampling")

_POOLING = ("max_pool", "avg_pool", "mean")
_ELEMENTWISE = ("relu", "add", "upsample", "mul", "sigmoid", "hardtanh", "gelu", "silu")


class _FlopCounter(TorchDispatchMode):
    """Counts MACs of convolutions / matmuls and element-wise work of every ATen call."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name == "convolution":
            weight = args[1]
            self.counts["mac"] += out.numel() * weight.shape[1] * math.prod(weight.shape[2:])
        elif name in ("addmm", "mm", "bmm"):
            a, b = args[-2], args[-1]
            self.counts["mac"] += a.numel() * b.shape[-1]
        elif "batch_norm" in name:
            self.counts["elementwise"] += 2 * _first(out).numel()
        elif any(p in name for p in _POOLING):
            self.counts["elementwise"] += args[0].numel()
        elif any(p in name for p in _ELEMENTWISE):
            self.counts["elementwise"] += _first(out).numel()
        return out


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: Sequence[int]) -> dict[str, float]:
    """MACs and element-wise ops (absolute counts) of one forward pass of one sample."""
    was_training = model.training
    model.eval()
    counter = _FlopCounter()
    with counter:
        model(torch.zeros(1, *input_shape))
    model.train(was_training)
    return {"macs": counter.counts["mac"], "flops": counter.counts["mac"] + counter.counts["elementwise"]}


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _shape_at(input_shape: tuple[int, ...], size) -> tuple[int, ...]:
    """The input shape with its spatial side (and, for video, frames) set to ``size``."""
    if isinstance(size, tuple):
        frames, side = size
        return (input_shape[0], frames, side, side)
    return (*input_shape[:-2], size, size)


def profile_rows(names: Iterable[str] | None = None) -> list[dict]:
    """One row per (model, paper input size): measured params / GMACs / GFLOPs beside the paper's."""
    rows = []
    for name in names or list_models():
        entry = model_entry(name)
        model = build(name)
        if entry.count_setup:
            entry.count_setup(model)
        params = count_params(model)
        sizes = list(entry.paper.gflops) or [_default_size(entry.input_shape)]
        for size in sizes:
            counts = count_flops(model, _shape_at(entry.input_shape, size))
            paper_gflops = entry.paper.gflops.get(size)
            gflops = counts["flops"] / 1e9
            rows.append({
                "model": name, "input": size, "params": params, "paper_params": entry.paper.params,
                "params_diff": _rel(params, entry.paper.params), "gmacs": counts["macs"] / 1e9,
                "gflops": gflops, "paper_gflops": paper_gflops, "gflops_diff": _rel(gflops, paper_gflops),
            })
    return rows


def _default_size(input_shape: tuple[int, ...]):
    return (input_shape[1], input_shape[-1]) if len(input_shape) == 4 else input_shape[-1]


def _rel(measured: float, paper: float | None) -> float | None:
    return None if paper is None else (measured - paper) / paper


def format_table(rows: list[dict]) -> str:
    """The profile rows as a fixed-width text table."""
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)
    header = (f"{'model':<22}{'input':>9}{'params(M)':>11}{'paper':>9}{'diff':>8}"
              f"{'GMACs':>9}{'GFLOPs':>9}{'paper':>9}{'diff':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        inp = "x".join(map(str, r["input"])) if isinstance(r["input"], tuple) else str(r["input"])
        paper_params = None if r["paper_params"] is None else r["paper_params"] / 1e6
        lines.append(f"{r['model']:<22}{inp:>9}{r['params'] / 1e6:>11.3f}{fmt(paper_params, '.2f'):>9}"
                     f"{fmt(r['params_diff'], '+.2%'):>8}{r['gmacs']:>9.3f}{r['gflops']:>9.3f}"
                     f"{fmt(r['paper_gflops'], '.2f'):>9}{fmt(r['gflops_diff'], '+.2%'):>8}")
    return "\n".join(lines + ["", f"Convention: {FLOP_CONVENTION}"])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="registered model names (default: all)")
    args = parser.parse_args(argv)
    print(format_table(profile_rows(args.models or None)))


if __name__ == "__main__":
    main()
