"""The trainers on CUDA (``pytest -m cuda``; skipped without a CUDA device): every task trains a few steps
with bf16 and with fp16 + GradScaler in channels_last and evaluates, a compiled run measures its auto
plans with CUDA timing, a resumed run reaches an uninterrupted one's weights, and the notebooks' device
path (a run's model loaded back) computes on the GPU. ``scripts/gpu_check.sh`` runs them on a device."""

import dataclasses
import math
import os
import signal

import pytest
import torch

from pyconv_core import build
from pyconv_core.engine.checkpoint import load_checkpoint
from pyconv_core.engine.logging import read_config, read_metrics
from pyconv_core.engine.trainer import FitResult, fit, seed_everything
from pyconv_core.run import load_run_model
from pyconv_core.tasks import classification, detection, segmentation, video

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TASKS = {
    "classification": (
        classification,
        dict(arch="pyconvresnet", depth=18, image_size=32, train_subset=256, val_subset=128, batch_size=32),
    ),
    "detection": (detection, dict(depth=18, image_size=64, batch_size=8, demo_train=32, demo_val=8, eval_every=1)),
    "video": (video, dict(batch_size=4, demo_train_per_class=2, demo_val_per_class=1)),
    "segmentation": (segmentation, dict(batch_size=4, train_subset=16, val_subset=4)),
}


def _params(task: str, tmp_path, **changes):
    module, flags = TASKS[task]
    demo = {"demo_dir": str(tmp_path / "demo")} if task in ("detection", "video", "segmentation") else {}
    return module, module.Params(
        **{
            **flags,
            **demo,
            "runs_dir": str(tmp_path / "runs"),
            "progress": False,
            "epochs": 1,
            "pyconv_plan": "auto",
            **changes,
        }
    )


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_trains_and_evaluates_on_cuda_with_amp_in_channels_last(task, amp, tmp_path):
    module, p = _params(task, tmp_path, amp=amp, channels_last=True, run_name=f"{task}-{amp}")
    result = module.run(p)
    config = read_config(result.run_dir)
    assert config["environment"]["device"]["type"] == "cuda", config["environment"]
    train, evals = read_metrics(result.run_dir, "train"), read_metrics(result.run_dir, "eval")
    assert math.isfinite(train[0]["train_loss"]) and evals, (train, evals)
    assert next(result.model.parameters()).device.type == "cuda"
    plans = config["pyconv_plans"]  # auto plans, measured with CUDA timing and recorded per input signature
    assert plans and all("cuda" in signature for layer in plans.values() for signature in layer), plans


def test_a_compiled_run_measures_its_plans_eagerly_on_cuda(tmp_path):
    module, p = _params("classification", tmp_path, amp="bf16", channels_last=True, compile=True, run_name="compiled")
    result = module.run(p)
    assert read_config(result.run_dir)["pyconv_plans"] and read_metrics(result.run_dir, "eval")


class _SignalledAt(classification.ClassificationTask):
    """Sends this process SIGTERM (a preemption) at the ``at``-th training step."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.steps, self.at = 0, at

    def train_step(self, model, batch, device):
        self.steps += 1
        if self.steps == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().train_step(model, batch, device)


def _fit(p, task) -> FitResult:
    train, val, classes = classification.datasets(p)
    seed_everything(p.seed)
    return fit(build(p.model_name, num_classes=len(classes)), task, train, val, classification.train_config(p))


def test_a_run_stopped_mid_epoch_resumes_on_cuda_to_the_uninterrupted_runs_weights(tmp_path):
    _, p = _params("classification", tmp_path, epochs=2, amp="bf16", channels_last=True, run_name="straight")
    straight = load_checkpoint(_fit(p, classification.ClassificationTask()).run_dir / "last.pt")["model"]
    stopped = _fit(dataclasses.replace(p, run_name="resumed"), _SignalledAt(12))  # epoch 2 of 8 steps each
    assert stopped.stopped_by == signal.SIGTERM
    resumed = _fit(dataclasses.replace(p, run_name="resumed", resume=True), classification.ClassificationTask())
    last = load_checkpoint(resumed.run_dir / "last.pt")["model"]
    # cuDNN may choose other kernels in the resumed process (cudnn.benchmark): equal up to their rounding
    for name, value in straight.items():
        torch.testing.assert_close(last[name], value, rtol=1e-3, atol=1e-4, msg=name)


def test_a_runs_model_loads_back_onto_the_gpu_as_the_notebooks_do(tmp_path):
    module, p = _params("segmentation", tmp_path, run_name="notebook")
    run_dir = module.run(p).run_dir
    model = load_run_model(run_dir).cuda().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 65, 65, device="cuda"))
    logits = out["out"] if isinstance(out, dict) else out
    assert logits.device.type == "cuda" and torch.isfinite(logits).all()
