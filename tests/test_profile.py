"""Paper fidelity: params and GFLOPs of every model with paper figures, within the issue's bounds;
the paper's table itself; shape-only (meta device) counting equal to computed counting."""

import pytest

from pyconv_core import build
from pyconv_core.paper import PAPER, Setup
from pyconv_core.profile import FLOP_CONVENTION, count_flops, format_table, profile_rows
from pyconv_core.registry import list_models

PAPER_MODELS = [n for n in list_models("classification") if n in PAPER and PAPER[n].params]


@pytest.fixture(scope="module")
def rows():
    return profile_rows(PAPER_MODELS)


def test_every_pyconv_family_model_has_paper_figures():
    assert {n for n in list_models("classification") if n.startswith("pyconv")} <= set(PAPER_MODELS)


def test_the_paper_table_names_registered_models_and_their_setups():
    assert set(PAPER) <= set(list_models())
    for name, figures in PAPER.items():
        assert figures.source and len(figures.input_shape) in (3, 4) and figures.num_classes > 0, name
        assert set(figures.gflops) <= set(figures.setups()), name
    assert PAPER["pyconvsegnet50"].setups() == [Setup(473, 8), Setup(473, 16)]
    assert PAPER["pyconvresnet50"].setups() == [Setup(224), Setup(320)]


def test_params_within_half_a_percent(rows):
    for r in rows:
        assert abs(r["params_diff"]) <= 0.005, r


def test_gflops_within_two_percent(rows):
    checked = [r for r in rows if r["paper_gflops"] is not None]
    assert {(r["model"], r["input"][-1]) for r in checked} >= {
        ("pyconvresnet50", 224),
        ("pyconvresnet50", 320),
        ("pyconvresnet101", 224),
        ("pyconvresnet101", 320),
    }
    for r in checked:
        assert abs(r["gflops_diff"]) <= 0.02, r


def test_table_prints_the_convention(rows):
    table = format_table(rows)
    assert "pyconvresnet50" in table and FLOP_CONVENTION in table


def test_an_experiment_setup_is_counted_without_paper_figures():
    [row] = profile_rows(["pyconvresnet50"], input_shape=(3, 64, 64), num_classes=10)
    assert row["input"] == (64, 64) and row["paper_gflops"] is None and row["paper_params"] is None
    assert row["params"] == sum(p.numel() for p in build("pyconvresnet50", num_classes=10).parameters())


@pytest.mark.parametrize(
    "name, kwargs, shape",
    [
        ("pyconvresnet50", {}, (3, 64, 64)),
        ("pyconvresnet3d50", {"stage_blocks": (1, 1, 1, 1), "num_classes": 10}, (3, 4, 48, 48)),
        ("pyconvssd18", {"image_size": 128}, (3, 128, 128)),
        ("pyconvsegnet18", {"num_classes": 5, "output_stride": 8, "with_aux": True}, (3, 49, 49)),
    ],
)
def test_shape_only_counting_equals_computed_counting(name, kwargs, shape):
    """The meta device (the default) gives exactly the counts of a computed forward pass."""
    model = build(name, **kwargs)
    meta = count_flops(model, shape)
    assert all(p.device.type == "cpu" for p in model.parameters())  # counted on a copy
    assert count_flops(model, shape, device="cpu") == meta and meta["macs"] > 0
