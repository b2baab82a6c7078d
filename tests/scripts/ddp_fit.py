"""Train a BN-free PyConv net on Fashion-MNIST with the Trainer; run alone or under torchrun.

BatchNorm statistics depend on the per-process batch (SyncBatchNorm needs CUDA), so the
equivalence check of one process and two processes uses a network without BN.
"""
import sys

import torch
from torch import nn

from pyconv_core.data.classification import FashionMNIST
from pyconv_core.engine import distributed as dist
from pyconv_core.engine.trainer import TrainConfig, fit
from pyconv_core.layers import PyConv
from pyconv_core.tasks.classification import ClassificationTask

runs_dir, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = nn.Sequential(PyConv(3, 16, [3, 5], [1, 1]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
cfg = TrainConfig(run_name="ddp", epochs=2, batch_size=32, lr=0.5, lr_reference_batch=32, schedule="constant",
                  weight_decay=1e-4, runs_dir=runs_dir, progress=False)
result = fit(model, ClassificationTask(), FashionMNIST("train", 16, 256), FashionMNIST("test", 16, 100), cfg)
if dist.is_main():
    torch.save({"state": model.state_dict(), "history": result.history}, out)
dist.cleanup()
