"""Paper fidelity: params and GFLOPs of every model with paper figures, within the issue's bounds."""
import pytest

from pyconv_core.profile import FLOP_CONVENTION, format_table, profile_rows
from pyconv_core.registry import list_models, model_entry

PAPER_MODELS = [n for n in list_models("classification") if model_entry(n).paper.params]


@pytest.fixture(scope="module")
def rows():
    return profile_rows(PAPER_MODELS)


def test_every_pyconv_family_model_has_paper_figures():
    assert {n for n in list_models("classification") if n.startswith("pyconv")} <= set(PAPER_MODELS)


def test_params_within_half_a_percent(rows):
    for r in rows:
        assert abs(r["params_diff"]) <= 0.005, r


def test_gflops_within_two_percent(rows):
    checked = [r for r in rows if r["paper_gflops"] is not None]
    assert {(r["model"], r["input"]) for r in checked} >= {("pyconvresnet50", 224), ("pyconvresnet50", 320),
                                                          ("pyconvresnet101", 224), ("pyconvresnet101", 320)}
    for r in checked:
        assert abs(r["gflops_diff"]) <= 0.02, r


def test_table_prints_the_convention(rows):
    table = format_table(rows)
    assert "pyconvresnet50" in table and FLOP_CONVENTION in table
