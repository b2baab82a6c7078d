"""The PyConv layer against independent convolutions, and its configuration errors."""

import random

import pytest
import torch
import torch.nn.functional as F

from pyconv_core.layers import PYCONV_PRESETS, PyConv

CONV_FN = {2: F.conv2d, 3: F.conv3d}


def reference_pyconv(x, weights, groups, stride, dilation, dim):
    """One functional convolution per level with the padding rule of docs/paper.md s.1, then concatenation."""
    outs = []
    for w, g in zip(weights, groups):
        padding = tuple(dilation * (k // 2) for k in w.shape[2:])
        outs.append(CONV_FN[dim](x, w, stride=stride, padding=padding, dilation=dilation, groups=g))
    return torch.cat(outs, dim=1)


def random_config(rng: random.Random, dim: int):
    n_levels = rng.randint(1, 4)
    groups = [rng.choice([1, 2, 4]) for _ in range(n_levels)]
    in_channels = 8 * rng.randint(1, 2)
    split = [4 * rng.randint(1, 3) for _ in range(n_levels)]
    kernels = []
    for _ in range(n_levels):
        k = rng.choice([1, 3, 5, 7])
        kernels.append(k if dim == 2 else (rng.choice([1, 3]), k, k))
    return dict(
        in_channels=in_channels,
        out_channels=sum(split),
        kernels=kernels,
        groups=groups,
        split=split,
        stride=rng.choice([1, 2]),
        dilation=rng.choice([1, 2]),
        dim=dim,
    )


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_pyconv_matches_independent_convolutions(dim, seed):
    rng = random.Random(seed)
    cfg = random_config(rng, dim)
    torch.manual_seed(seed)
    layer = PyConv(**cfg)
    size = (3, 13, 13) if dim == 3 else (15, 15)
    x = torch.randn(2, cfg["in_channels"], *size, requires_grad=True)
    weights = [level.weight.detach().clone().requires_grad_() for level in layer.levels]
    expected = reference_pyconv(x, weights, cfg["groups"], cfg["stride"], cfg["dilation"], dim)
    out = layer(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *[lv.weight for lv in layer.levels]], grad)
    want = torch.autograd.grad(expected, [x, *weights], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_levels_are_ordered_and_split_as_the_preset():
    layer = PyConv.from_levels(64, 128, PYCONV_PRESETS["pyconv3"])
    assert [c.kernel_size for c in layer.levels] == [(3, 3), (5, 5), (7, 7)]
    assert [c.groups for c in layer.levels] == [1, 4, 8]
    assert [c.out_channels for c in layer.levels] == [32, 32, 64]


def test_single_level_has_no_concatenation_overhead_and_keeps_shape():
    layer = PyConv(16, 16, [3], [1], stride=2)
    assert layer(torch.randn(1, 16, 10, 10)).shape == (1, 16, 5, 5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(in_channels=10, out_channels=16, kernels=[3, 5], groups=[1, 4]), "level 1"),
        (dict(in_channels=16, out_channels=16, kernels=[3, 5], groups=[1, 4], split=[4, 8]), "sums to 12"),
        (dict(in_channels=16, out_channels=16, kernels=[3, 4], groups=[1, 1]), r"level 1: kernel \(4, 4\)"),
        (dict(in_channels=16, out_channels=16, kernels=[3, 5], groups=[1]), "one kernel, group count"),
        (dict(in_channels=16, out_channels=16, kernels=[3], groups=[1], dim=4), "dim must be 2"),
    ],
)
def test_impossible_configs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PyConv(**kwargs)


def test_split_that_does_not_divide_names_the_numbers():
    with pytest.raises(ValueError, match="not divisible by 4"):
        PyConv.from_levels(64, 30, PYCONV_PRESETS["pyconv4"])
