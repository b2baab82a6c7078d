"""Train a BN-free PyConv net on Fashion-MNIST with the Trainer; run alone or under torchrun.

Usage: ``ddp_fit.py RUNS_DIR OUT PYCONV_PLAN [--rank-preferences]``. Rank 0 saves the weights, the
history and its PyConv plans to OUT; every other rank saves its plans to ``OUT.rank<r>``.

BatchNorm statistics depend on the per-process batch (SyncBatchNorm needs CUDA), so the
equivalence check of one process and two processes uses a network without BN. It computes in
float64: convolution kernels are chosen per batch size, thread count and PyConv plan, and their
float32 rounding differences grow to ~1e-4 over this run's 16 steps at lr 0.5; in float64 they stay
far below the tolerance, while a distribution error (sharding, gradient averaging, lr scaling) does not.
``--rank-preferences`` replaces plan timing by a fixed preference per rank (rank 0: the merged plan
``01``, the others: ``0|1``): measured timings may or may not differ between processes, this makes
them differ, so a test can check that every replica still trains with rank 0's choice.
"""

import os
import sys

import torch
from torch import nn

from pyconv_core.data.classification import FashionMNIST
from pyconv_core.engine import distributed as dist
from pyconv_core.engine.trainer import TrainConfig, fit
from pyconv_core.layers import PyConv, plans
from pyconv_core.layers.pyconv import pyconv_plans
from pyconv_core.tasks.classification import ClassificationTask

runs_dir, out, pyconv_plan = sys.argv[1:4]
if "--rank-preferences" in sys.argv:
    preferred = "01" if os.environ.get("RANK", "0") == "0" else "0|1"  # the process group starts in fit()
    plans.time_plan = lambda x, convs, plan, training, repeats: 0.0 if plans.format_plan(plan) == preferred else 1.0


class Float64(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


torch.manual_seed(0)
model = nn.Sequential(
    Float64(), PyConv(3, 16, [3, 5], [1, 1]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)
).double()
cfg = TrainConfig(
    run_name="ddp",
    epochs=2,
    batch_size=32,
    lr=0.5,
    lr_reference_batch=32,
    schedule="constant",
    weight_decay=1e-4,
    runs_dir=runs_dir,
    progress=False,
    pyconv_plan=pyconv_plan,
)
result = fit(model, ClassificationTask(), FashionMNIST("train", 16, 256), FashionMNIST("test", 16, 100), cfg)
if dist.is_main():
    # the weights: the plans, chosen per input signature (a per-process batch), are saved and compared apart
    weights = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    torch.save({"state": weights, "history": result.history, "plans": pyconv_plans(model)}, out)
else:
    torch.save({"plans": pyconv_plans(model)}, f"{out}.rank{dist.rank()}")
dist.cleanup()
