"""PyConv execution plans: every plan computes what the naive plan computes (outputs and gradients,
2D and 3D, random level sets), "auto" records its choices, and runs record and restore them."""

import dataclasses
import json
import random

import pytest
import torch

from pyconv_core import build
from pyconv_core.engine.checkpoint import load_checkpoint, save_atomic
from pyconv_core.engine.logging import read_metrics
from pyconv_core.layers import plans
from pyconv_core.layers.plans import candidate_plans, format_plan, mac_ratio, max_mac_ratio_for, parse_plan
from pyconv_core.layers.pyconv import PYCONV_PRESETS, PyConv, pyconv_plans, set_pyconv_plan
from pyconv_core.run import load_run_model
from pyconv_core.tasks.classification import Params, run


def _random_pyconv(rng: random.Random, dim: int, bias: bool) -> PyConv:
    """A PyConv with 2-4 levels of random odd kernels (3D: independent temporal sizes), groups and splits."""
    levels = rng.randint(2, 4)
    group_choices = [1, 2, 4, 8]
    groups = [rng.choice(group_choices) for _ in range(levels)]
    in_channels = 8 * rng.randint(1, 3)
    split = [max(groups[i], 8) * rng.randint(1, 2) for i in range(levels)]
    kernels = []
    for _ in range(levels):
        k = rng.choice([1, 3, 5, 7])
        kernels.append((rng.choice([1, 3, 5]), k, k) if dim == 3 else k)
    layer = PyConv(
        in_channels,
        sum(split),
        kernels,
        groups,
        split=split,
        stride=rng.choice([1, 2]),
        dilation=rng.choice([1, 2]),
        dim=dim,
    )
    if bias:  # the plans merge biases too (the factory's convolutions have none by default)
        for conv in layer.levels:
            conv.bias = torch.nn.Parameter(torch.randn(conv.out_channels))
    return layer


def _output_and_grads(layer: PyConv, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    y = layer(x)
    grad_out = torch.linspace(-1, 1, y.numel()).view_as(y)
    params = [p for p in layer.parameters()]
    return [y, *torch.autograd.grad(y, [x, *params], grad_out)]


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_every_plan_matches_the_naive_output_and_gradients(dim, seed):
    rng = random.Random(seed * 10 + dim)
    torch.manual_seed(seed)
    layer = _random_pyconv(rng, dim, bias=seed % 2 == 1)
    cin = layer.levels[0].in_channels
    x = torch.randn(2, cin, *([6] if dim == 3 else []), 13, 11)
    expected = _output_and_grads(layer, x)
    all_plans = plans.all_plans(layer.levels)
    assert any(p.temporal_taps for p in all_plans) == (dim == 3)
    for plan in all_plans:
        layer.plan = plans.format_plan(plan)
        got = _output_and_grads(layer, x)
        for name, a, b in zip(["output", "input grad", *[n for n, _ in layer.named_parameters()]], got, expected):
            assert a.shape == b.shape, (plan, name)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"plan {layer.plan}, {name}, {layer}")


def test_channels_last_input_gives_channels_last_output():
    layer = PyConv(16, 48, [3, 5, 7], [1, 4, 8])
    x = torch.randn(2, 16, 12, 12).to(memory_format=torch.channels_last)
    layer.plan = "0|12"
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    layer.plan = "naive"
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)


def test_temporal_taps_keep_the_memory_format_and_only_apply_to_3d():
    layer = PyConv(16, 32, [(5, 7, 7), (3, 3, 3)], [8, 1], dim=3)
    clip = torch.randn(2, 16, 5, 9, 9)
    expected = layer(clip)
    layer.plan = "taps:0|1"
    for fmt in (torch.contiguous_format, torch.channels_last_3d):
        y = layer(clip.contiguous(memory_format=fmt))
        assert y.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    image_layer = PyConv(16, 32, [3, 5], [1, 4])
    image_layer.plan = "taps:01"
    assert image_layer.current_plan(torch.randn(1, 16, 8, 8)) == plans.naive_plan(2)


def test_partitions_are_all_set_partitions():
    assert [len(plans.partitions(n)) for n in range(1, 5)] == [1, 2, 5, 15]  # Bell numbers
    for parts in plans.partitions(4):
        assert sorted(sum(parts, ())) == [0, 1, 2, 3]
    assert plans.parse_plan("0|123") == plans.Plan(((0,), (1, 2, 3)))
    assert plans.format_plan(plans.Plan(((0, 2), (1,)))) == "02|1"
    assert plans.parse_plan("taps:0|123") == plans.Plan(((0,), (1, 2, 3)), temporal_taps=True)
    assert str(plans.parse_plan("taps:02|1")) == "taps:02|1"
    with pytest.raises(ValueError):
        plans.parse_plan("taps:0|1x")


def test_mac_ratio_counts_the_zero_padded_kernels():
    layer = PyConv(64, 64, [3, 5, 7, 9], [1, 4, 8, 16])
    assert plans.mac_ratio(layer.levels, plans.naive_plan(4)) == 1.0
    # levels 1-3 as one 9x9 convolution with 4 groups: 48 outputs x 16 inputs x 81 taps
    naive = 16 * (64 * 9 + 16 * 25 + 8 * 49 + 4 * 81)
    assert plans.mac_ratio(layer.levels, plans.Plan(((0,), (1, 2, 3)))) == pytest.approx(
        (16 * 64 * 9 + 48 * 16 * 81) / naive
    )
    assert plans.Plan(((0, 1, 2, 3),)) not in plans.candidate_plans(layer.levels)  # one dense 9x9: 12x the MACs


def test_auto_plan_records_its_choice_and_keeps_the_parameters():
    model = build("pyconvresnet18", num_classes=10)
    keys = list(model.state_dict())
    assert set_pyconv_plan(model, "auto") == 16  # two PyConvs in each of the 8 basic blocks
    # 4 images of 64 px: with 2 of 32 px the last stage's train-mode BN normalizes 2 values per channel,
    # which turns rounding differences of any two correct plans into percent-level output differences
    x = torch.randn(4, 3, 64, 64)
    model.train()
    expected = model(x)  # train mode: the first call tunes
    chosen = pyconv_plans(model)
    assert chosen and all(key.endswith(" cpu contiguous train") for table in chosen.values() for key in table)
    assert list(model.state_dict()) == keys
    set_pyconv_plan(model, "naive")
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    fresh = build("pyconvresnet18", num_classes=10)
    set_pyconv_plan(fresh, "auto")
    fresh.load_state_dict(model.state_dict())
    assert pyconv_plans(fresh) == chosen


def test_unknown_plan_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown PyConv plan 'fast'"):
        set_pyconv_plan(build("pyconvresnet18"), "fast")


def test_a_run_records_its_plans_and_the_reloaded_model_uses_them(tmp_path, monkeypatch):
    params = Params(
        arch="pyconvresnet",
        depth=18,
        image_size=16,
        train_subset=64,
        val_subset=32,
        batch_size=32,
        epochs=1,
        runs_dir=str(tmp_path),
        run_name="plans",
        pyconv_plan="auto",
    )
    result = run(params)
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["train"]["pyconv_plan"] == "auto"
    assert config["pyconv_plans"] and config["pyconv_plans"] == pyconv_plans(result.model)
    assert any(key.endswith("train") for table in config["pyconv_plans"].values() for key in table)
    reloaded = load_run_model(result.run_dir, "last")
    assert pyconv_plans(reloaded) == config["pyconv_plans"]
    # (a one-level layer computes its one convolution whatever the mode, and carries none)
    assert {m.plan for m in reloaded.modules() if isinstance(m, PyConv) and len(m.levels) > 1} == {"auto"}

    # resuming restores the recorded choices instead of measuring again (which could pick other plans)
    def no_tuning(*args, **kwargs):
        raise AssertionError("a resumed run measured PyConv plans again instead of restoring them")

    monkeypatch.setattr("pyconv_core.layers.pyconv.tune", no_tuning)
    resumed = run(dataclasses.replace(params, epochs=2, resume=True))
    assert len(read_metrics(resumed.run_dir, "train")) == 2
    assert pyconv_plans(resumed.model) == config["pyconv_plans"]


def test_a_checkpoint_saved_before_the_layers_carried_their_plans_loads_and_resumes_with_them(tmp_path, monkeypatch):
    """Runs saved before plans moved into the layers' state kept them in a ``pyconv_plans`` entry (and the mode
    in ``config``), with no ``_extra_state`` keys: loading and resuming such a run restores its plans."""
    params = Params(
        arch="pyconvresnet",
        depth=18,
        image_size=16,
        train_subset=64,
        val_subset=32,
        batch_size=32,
        epochs=1,
        runs_dir=str(tmp_path),
        run_name="old",
        pyconv_plan="auto",
    )
    result = run(params)
    recorded = pyconv_plans(result.model)
    for name in ("last.pt", "best.pt"):  # rewritten in the old layout
        state = load_checkpoint(result.run_dir / name)
        state["model"] = {k: v for k, v in state["model"].items() if not k.endswith("_extra_state")}
        save_atomic({**state, "pyconv_plans": recorded}, result.run_dir / name)
    reloaded = load_run_model(result.run_dir, "last")
    assert pyconv_plans(reloaded) == recorded
    assert {m.plan for m in reloaded.modules() if isinstance(m, PyConv) and m.choices} == {"auto"}

    def no_tuning(*args, **kwargs):
        raise AssertionError("a resumed run measured PyConv plans again instead of restoring them")

    monkeypatch.setattr("pyconv_core.layers.pyconv.tune", no_tuning)
    resumed = run(dataclasses.replace(params, epochs=2, resume=True))
    assert len(read_metrics(resumed.run_dir, "train")) == 2
    assert pyconv_plans(resumed.model) == recorded


def _prefer(monkeypatch, naive: bool) -> None:
    """Make plan timing report a fixed winner: the naive plan, or the plan with fewest parts."""

    def fake_time(x, convs, plan, training, repeats):
        return len(plan.parts) if not naive else -len(plan.parts)

    monkeypatch.setattr(plans, "time_plan", fake_time)


def _fresh_process_state(monkeypatch) -> None:
    """What a new process starts with: no plan measured or read yet."""
    monkeypatch.setattr(plans, "PLAN_CACHE", {})
    monkeypatch.setattr(plans, "_STORED", {})


def test_a_second_run_reuses_the_measured_plans_whatever_its_timing_says(tmp_path, monkeypatch):
    monkeypatch.setenv("PYCONV_PLAN_CACHE", str(tmp_path / "plans.json"))
    params = Params(
        arch="pyconvresnet",
        depth=18,
        image_size=16,
        train_subset=64,
        val_subset=32,
        batch_size=32,
        epochs=1,
        runs_dir=str(tmp_path),
        pyconv_plan="auto",
    )
    _fresh_process_state(monkeypatch)
    _prefer(monkeypatch, naive=True)
    first = run(dataclasses.replace(params, run_name="first"))
    _fresh_process_state(monkeypatch)
    _prefer(monkeypatch, naive=False)  # a loaded machine: timing now names another winner
    second = run(dataclasses.replace(params, run_name="second"))
    assert pyconv_plans(second.model) == pyconv_plans(first.model)
    assert {plan for table in pyconv_plans(first.model).values() for plan in table.values()} == {
        "0|1|2|3",
        "0|1|2",
        "0|1",
    }

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")} for r in rows]

    assert strip(read_metrics(second.run_dir)) == strip(read_metrics(first.run_dir))

    monkeypatch.setenv("PYCONV_PLAN_CACHE", "off")  # without the cache the timing decides (the test can fail)
    _fresh_process_state(monkeypatch)
    third = run(dataclasses.replace(params, run_name="third"))
    assert pyconv_plans(third.model) != pyconv_plans(first.model)


def test_plan_cache_file_is_per_machine_and_a_corrupt_one_is_rewritten(tmp_path, monkeypatch):
    monkeypatch.delenv("PYCONV_PLAN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert plans.plan_cache_path() == tmp_path / "pyconv_core" / f"plans-{plans.machine_key()}.json"
    path = tmp_path / "plans.json"
    path.write_text("{not json")
    monkeypatch.setenv("PYCONV_PLAN_CACHE", str(path))
    _fresh_process_state(monkeypatch)
    layer = PyConv(8, 8, [3, 5], [1, 2])
    with pytest.warns(UserWarning, match="plans.json is unreadable"):
        plans.tune(torch.randn(2, 8, 8, 8), layer.levels, training=False)
    assert len(json.loads(path.read_text())) == 1


def test_a_gpu_times_dense_merges_that_a_cpu_does_not():
    # a GPU's tensor cores may run the dense merge of a PyConv4 (12x its MACs) faster than grouped kernels
    convs = list(PyConv.from_levels(64, 64, PYCONV_PRESETS["pyconv4"]).levels)
    on_cpu = {format_plan(p) for p in candidate_plans(convs, max_mac_ratio_for(torch.device("cpu")))}
    on_gpu = {format_plan(p) for p in candidate_plans(convs, max_mac_ratio_for(torch.device("cuda")))}
    assert "0123" in on_gpu and "0123" not in on_cpu and on_cpu < on_gpu
    assert all(mac_ratio(convs, parse_plan(p)) <= 4 for p in on_cpu)
