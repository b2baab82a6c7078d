"""Inception-ResNet-v2 and PyConvInception against S-Table 5 and the documented block design."""

import pytest
import torch
from torch import nn

from pyconv_core import build
from pyconv_core.layers import PyConv
from pyconv_core.models.inception import Inception
from pyconv_core.paper import PAPER as PAPER_FIGURES, Setup
from pyconv_core.profile import count_flops, count_params
from pyconv_core.registry import model_entry

PAPER = {"inception_resnet_v2": (55.84e6, 16.75), "pyconvinception": (43.48e6, 11.92)}


@pytest.fixture(scope="module")
def counts():
    out = {}
    for name in PAPER:
        with torch.device("meta"):  # shapes only: the same counts without computing
            model = build(name)
        out[name] = (count_params(model), count_flops(model, (3, 299, 299)))
    return out


def _stage_shapes(design: str, side: int, **kwargs) -> list[tuple[int, ...]]:
    """Shapes after Mixed-5b, each reduction and the head conv, computed on the meta device."""
    with torch.device("meta"):
        model = Inception(design, **kwargs).eval()
    x = model.mixed_5b(model.stem(torch.empty(1, 3, side, side, device="meta")))
    shapes = [tuple(x.shape[1:])]
    for stage in (
        nn.Sequential(model.blocks_a, model.reduction_a),
        nn.Sequential(model.blocks_b, model.reduction_b),
        nn.Sequential(model.blocks_c, model.head_conv),
    ):
        x = stage(x)
        shapes.append(tuple(x.shape[1:]))
    return shapes


def test_registered_at_299_with_the_paper_figures():
    for name, (params, gflops) in PAPER.items():
        entry, figures = model_entry(name), PAPER_FIGURES[name]
        assert entry.task == "classification" and entry.input_shape == figures.input_shape == (3, 299, 299)
        assert figures.params == params and figures.gflops == {Setup(299): gflops}


def test_inception_resnet_v2_has_the_released_parameter_count(counts):
    """55,843,464: the count of the released network (TF-slim / Cadene / timm)."""
    assert counts["inception_resnet_v2"][0] == 55_843_464


def test_params_and_flops_within_the_bounds(counts):
    """Params within 1% (IR-v2) / 2% (PyConvInception); MACs + element-wise work within 2% of S-Table 5."""
    for name, (paper_params, paper_gflops) in PAPER.items():
        params, flops = counts[name]
        assert abs(params / paper_params - 1) <= (0.01 if name == "inception_resnet_v2" else 0.02), (name, params)
        assert abs(flops["flops"] / 1e9 / paper_gflops - 1) <= 0.02, (name, flops)


def test_pyconvinception_is_cheaper_like_the_paper(counts):
    ratio = counts["pyconvinception"][1]["flops"] / counts["inception_resnet_v2"][1]["flops"]
    assert 0.69 <= ratio <= 0.74  # S-Table 5: 11.92 / 16.75 = 0.712


def test_aligned_and_valid_feature_maps():
    """Aligned (the paper's count): 38 -> 19 -> 10; released 'VALID' stem and reductions: 35 -> 17 -> 8."""
    aligned = _stage_shapes("inception_resnet_v2", 299)
    assert aligned == [(320, 38, 38), (1088, 19, 19), (2080, 10, 10), (1536, 10, 10)]
    valid = _stage_shapes("inception_resnet_v2", 299, align_feature_maps=False)
    assert valid == [(320, 35, 35), (1088, 17, 17), (2080, 8, 8), (1536, 8, 8)]
    assert _stage_shapes("pyconvinception", 299) == aligned


def test_released_valid_network_counts_13_gmacs():
    """The 'VALID' network is the one usually quoted at ~13.2 GFLOPs (same parameters): not S-Table 5's count."""
    valid = Inception("inception_resnet_v2", align_feature_maps=False)
    assert count_params(valid) == 55_843_464
    assert 13.0 <= count_flops(valid, (3, 299, 299))["macs"] / 1e9 <= 13.3


def test_pyconvinception_needs_aligned_feature_maps():
    with pytest.raises(ValueError, match="align_feature_maps=True"):
        Inception("pyconvinception", align_feature_maps=False)


def _pyconv_levels(module: nn.Module) -> list[tuple]:
    return [
        tuple((lv.kernel_size[0], lv.groups, lv.out_channels, lv.stride[0]) for lv in m.levels)
        for m in module.modules()
        if isinstance(m, PyConv)
    ]


def test_pyconvinception_blocks_follow_the_documented_table():
    with torch.device("meta"):
        model = Inception("pyconvinception")
    assert _pyconv_levels(model.mixed_5b) == [((3, 1, 48, 1), (5, 4, 48, 1))]
    assert _pyconv_levels(model.blocks_a[0]) == [((3, 1, 48, 1), (5, 4, 48, 1))]
    assert _pyconv_levels(model.reduction_a) == [((3, 1, 192, 2), (5, 4, 192, 2))]
    assert _pyconv_levels(model.blocks_b[0]) == [((3, 1, 48, 1), (5, 4, 48, 1), (7, 8, 96, 1))]
    assert _pyconv_levels(model.reduction_b) == [((3, 1, 160, 2), (5, 4, 160, 2))]
    assert _pyconv_levels(model.blocks_c[0]) == [((3, 1, 280, 1),)]
    assert (len(model.blocks_a), len(model.blocks_b), len(model.blocks_c)) == (10, 20, 10)
    spatial = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert all(m.kernel_size[0] == m.kernel_size[1] for m in spatial), "factorized 1xk / kx1 convs remain"


def test_residual_blocks_scale_and_last_block_is_linear():
    with torch.device("meta"):
        model = Inception("inception_resnet_v2")
    assert [model.blocks_a[0].scale, model.blocks_b[0].scale, model.blocks_c[0].scale] == [0.17, 0.10, 0.20]
    assert isinstance(model.blocks_c[-1].relu, nn.Identity)
    assert all(isinstance(b.relu, nn.ReLU) for b in [*model.blocks_a, *model.blocks_b, *model.blocks_c[:-1]])
    assert model.blocks_b[0].up.bias is not None


@pytest.mark.parametrize("name", list(PAPER))
def test_trains_on_a_small_input(name):
    torch.manual_seed(0)
    model = build(name, num_classes=5, dropout=0.2)
    x, y = torch.randn(2, 3, 75, 75), torch.tensor([1, 4])
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
