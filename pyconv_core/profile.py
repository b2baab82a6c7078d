"""Parameter and FLOP counts of registered models against the paper's figures.

:func:`profile_rows` is the one profiler: it builds each model as its record in
:mod:`pyconv_core.paper` says (sample shape, classes, output stride, builder arguments) and counts it
beside the paper's figures. ``python -m pyconv_core.profile`` prints one row per model and setup.

Convention (docs/paper.md#counting): one fused multiply-add counts as one FLOP. ``gmacs`` counts
convolutions and linear layers only; ``gflops`` adds one operation per output element of the
element-wise work (batch norm, activations, residual adds, pooling, resampling), which is how
the paper's figures were counted (the convention of the ptflops counter). Counting happens at the
ATen level (a dispatch mode), so functional ops (``F.interpolate``, ``+``) are seen as well as modules,
and on the meta device by default: shapes only, no convolution computed, the same counts in a fraction
of the time.
"""

from __future__ import annotations

import argparse
import copy
import math
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pyconv_core.paper import PAPER, PaperFigures, Setup
from pyconv_core.registry import build, list_models, model_entry

__all__ = ["count_params", "count_flops", "profile_rows", "format_table", "FLOP_CONVENTION"]

FLOP_CONVENTION = (
    "1 FLOP = 1 multiply-accumulate; GMACs = conv + linear only; GFLOPs = GMACs + "
    "element-wise work: 2 per BN output (scale, shift), 1 per pooling input, 1 per output "
    "of activations, adds and resampling"
)

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
def count_flops(model: nn.Module, input_shape: Sequence[int], device: str | torch.device = "meta") -> dict[str, float]:
    """MACs and element-wise ops (absolute counts) of one forward pass of one sample, in evaluation mode.

    Counted on ``device``: on "meta" only shapes are propagated (no convolution is computed), so a
    50-layer network counts in under a second; a model elsewhere is counted as a meta copy and left
    as it was. ``device="cpu"`` (with a CPU model) computes the forward pass, giving the same counts.
    """
    device = torch.device(device)
    if any(t.device != device for t in (*model.parameters(), *model.buffers())):
        model = copy.deepcopy(model).to(device)
    was_training = model.training
    model.eval()
    counter = _FlopCounter()
    with counter:
        model(torch.zeros(1, *input_shape, device=device))
    model.train(was_training)
    return {"macs": counter.counts["mac"], "flops": counter.counts["mac"] + counter.counts["elementwise"]}


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def profile_rows(
    names: Iterable[str] | None = None,
    input_shape: Sequence[int] | None = None,
    device: str | torch.device = "meta",
    **model_args,
) -> list[dict]:
    """Params / GMACs / GFLOPs of registered models, one row per model and setup, beside the paper's.

    Each model with a record in :data:`pyconv_core.paper.PAPER` is counted in every setup of it (e.g.
    224 and 320; segmentation at output strides 8 and 16, with the auxiliary head; GFLOPs with the record's
    ``gflops_num_classes`` where it has one); one without, once at its registered input shape. With
    ``input_shape`` or builder arguments (an experiment's own network: a demo's image size, fewer blocks,
    its classes), each model is counted once in that setup instead, with no paper figures beside it.
    Default: every registered model, counted on the meta device.
    """
    custom = input_shape is not None or bool(model_args)
    rows = []
    for name in names or list_models():
        figures = None if custom else PAPER.get(name)
        for setup in figures.setups() if figures else [None]:
            args = _build_args(figures, setup, model_args)
            with torch.device(device):
                model = build(name, **args)
                counted = (
                    build(name, **{**args, "num_classes": figures.gflops_num_classes})
                    if (figures and setup and figures.gflops_num_classes)
                    else model
                )
            shape = tuple(input_shape or _sample_shape(name, figures, setup))
            params, counts = count_params(model), count_flops(counted, shape, device)
            gflops = counts["flops"] / 1e9
            paper_params = figures.params if figures else None
            paper_gflops = figures.gflops.get(setup) if figures and setup else None
            rows.append(
                {
                    "model": name,
                    "input": shape[1:],
                    "output_stride": setup.output_stride if setup else None,
                    "params": params,
                    "paper_params": paper_params,
                    "params_diff": _rel(params, paper_params),
                    "gmacs": counts["macs"] / 1e9,
                    "gflops": gflops,
                    "paper_gflops": paper_gflops,
                    "gflops_diff": _rel(gflops, paper_gflops),
                    "source": figures.source if figures else "",
                }
            )
    return rows


def _build_args(figures: PaperFigures | None, setup: Setup | None, model_args: dict) -> dict:
    """Builder arguments of the counted network: the record's (classes, output stride, ...) or the caller's."""
    if figures is None or setup is None:
        return model_args
    stride = {} if setup.output_stride is None else {"output_stride": setup.output_stride}
    return {"num_classes": figures.num_classes, **figures.model_args, **stride}


def _sample_shape(name: str, figures: PaperFigures | None, setup: Setup | None) -> tuple[int, ...]:
    """One sample as counted: the record's shape with the setup's side, or the registered shape."""
    if figures is None or setup is None:
        return model_entry(name).input_shape
    return (*figures.input_shape[:-2], setup.side, setup.side)


def _rel(measured: float, paper: float | None) -> float | None:
    return None if paper is None else (measured - paper) / paper


def format_table(rows: list[dict]) -> str:
    """The profile rows as a fixed-width text table."""

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    header = (
        f"{'model':<22}{'input':>15}{'params(M)':>11}{'paper':>9}{'diff':>8}"
        f"{'GMACs':>9}{'GFLOPs':>9}{'paper':>9}{'diff':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        inp = "x".join(map(str, r["input"])) + ("" if r["output_stride"] is None else f" os{r['output_stride']}")
        paper_params = None if r["paper_params"] is None else r["paper_params"] / 1e6
        lines.append(
            f"{r['model']:<22}{inp:>15}{r['params'] / 1e6:>11.3f}{fmt(paper_params, '.2f'):>9}"
            f"{fmt(r['params_diff'], '+.2%'):>8}{r['gmacs']:>9.3f}{r['gflops']:>9.3f}"
            f"{fmt(r['paper_gflops'], '.2f'):>9}{fmt(r['gflops_diff'], '+.2%'):>8}"
        )
    return "\n".join(lines + ["", f"Convention: {FLOP_CONVENTION}"])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="registered model names (default: all)")
    args = parser.parse_args(argv)
    print(format_table(profile_rows(args.models or None)))


if __name__ == "__main__":
    main()
