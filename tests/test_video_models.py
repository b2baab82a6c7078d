"""ResNet3D-50 / PyConvResNet3D-50: S-Table 2 layout, S-Table 3 counts, 2D inflation."""

import pytest
import torch

from pyconv_core import build
from pyconv_core.models.video import inflate_2d
from pyconv_core.paper import PAPER, Setup
from pyconv_core.profile import count_params, profile_rows
from pyconv_core.registry import list_models, model_entry

VIDEO_MODELS = ["resnet3d50", "pyconvresnet3d50"]


@pytest.fixture(scope="module")
def rows():
    """The profile at 16x224x224, measured on the meta device (shapes only, same counter, no compute)."""
    return {r["model"]: r for r in profile_rows(VIDEO_MODELS)}


def test_registered_as_video_models_with_s_table3_figures():
    assert set(VIDEO_MODELS) <= set(list_models("video"))
    for name in VIDEO_MODELS:
        assert model_entry(name).input_shape == PAPER[name].input_shape == (3, 16, 224, 224)
        assert Setup(224) in PAPER[name].gflops and PAPER[name].num_classes == 400


def test_gflops_within_three_percent_of_s_table3(rows):
    for name in VIDEO_MODELS:
        assert rows[name]["input"] == (16, 224, 224)
        assert abs(rows[name]["gflops_diff"]) <= 0.03, rows[name]


def test_resnet3d50_params_match_s_table3(rows):
    assert rows["resnet3d50"]["params"] == 46_999_760  # 47.00M
    assert abs(rows["resnet3d50"]["params_diff"]) <= 0.01


def test_pyconvresnet3d50_params_equal_the_paper_with_a_174_class_head(rows):
    """With Kinetics-400's 400 classes we count 45.37M (+1.03% over the paper's 44.91M); the paper's
    figure is this network with 174 outputs (Something-Something-v2's classes), to the last digit."""
    assert rows["pyconvresnet3d50"]["params"] == 45_373_072
    with torch.device("meta"):
        at_174 = count_params(build("pyconvresnet3d50", num_classes=174))
    assert at_174 == 44_909_998 and round(at_174 / 1e6, 2) == PAPER["pyconvresnet3d50"].params / 1e6


@pytest.mark.parametrize("name", VIDEO_MODELS)
def test_stage_outputs_of_s_table2(name):
    with torch.device("meta"):
        model = build(name).eval()
        x = model.relu(model.bn1(model.conv1(torch.zeros(1, 3, 16, 224, 224))))
        assert x.shape[1:] == (64, 16, 112, 112)
        sizes = [tuple(x.shape[1:]) for x in model.features(torch.zeros(1, 3, 16, 224, 224)).values()]
        assert model(torch.zeros(2, 3, 16, 224, 224)).shape == (2, 400)
    assert sizes == [(256, 16, 56, 56), (512, 16, 28, 28), (1024, 8, 14, 14), (2048, 4, 7, 7)]
    assert model.conv1.kernel_size == (5, 7, 7) and model.conv1.stride == (1, 2, 2)
    assert model.dropout.p == 0.5


def _levels(model, stage):
    conv = getattr(model, f"layer{stage}")[0].conv2
    return [(tuple(c.kernel_size), c.out_channels, c.groups) for c in conv.levels]


def test_pyconv_presets_of_s_table2():
    with torch.device("meta"):
        model = build("pyconvresnet3d50")
    assert _levels(model, 1) == [((3, 3, 3), 16, 1), ((3, 5, 5), 16, 4), ((5, 7, 7), 16, 8), ((7, 9, 9), 16, 16)]
    assert _levels(model, 2) == [((3, 3, 3), 32, 1), ((3, 5, 5), 32, 4), ((5, 7, 7), 64, 8)]
    assert _levels(model, 3) == [((3, 3, 3), 128, 1), ((3, 5, 5), 128, 4)]
    assert _levels(model, 4) == [((3, 3, 3), 512, 1)]
    # no stem max pool: stage 1 downsamples in its PyConv, the shortcut in a max pool (docs/paper.md s.2)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model.layer1[0].conv2.levels[0].stride == (1, 2, 2)
    assert isinstance(model.layer3[0].downsample[0], torch.nn.MaxPool3d)


def test_resnet3d50_is_plain_3x3x3_with_a_1x3x3_stem_pool():
    with torch.device("meta"):
        model = build("resnet3d50")
    assert all(_levels(model, s) == [((3, 3, 3), w, 1)] for s, w in zip((1, 2, 3, 4), (64, 128, 256, 512)))
    pool = model.maxpool
    assert (pool.kernel_size, pool.stride, pool.padding) == ((1, 3, 3), (1, 2, 2), (0, 1, 1))


@pytest.mark.parametrize("name", VIDEO_MODELS)
def test_shallow_variant_trains(name):
    model = build(name, num_classes=5, stage_blocks=(1, 1, 1, 1))
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3, 4)] == [1, 1, 1, 1]
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 4, 16, 16)), torch.tensor([0, 3]))
    loss.backward()
    assert torch.isfinite(model.conv1.weight.grad).all() and model.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", VIDEO_MODELS)
def test_inflated_network_repeats_the_2d_responses_on_a_still_clip(name):
    """I3D inflation: on a clip of one repeated frame, away from the temporal borders, the stem and
    stage 1 of the 3D network compute exactly what the 2D network computes on that frame."""
    torch.manual_seed(0)
    twin = build(name.replace("3d", ""), stage_blocks=(1, 1, 1, 1)).eval()
    model = build(name, num_classes=7, stage_blocks=(1, 1, 1, 1)).eval()
    assert inflate_2d(model, twin) == ["fc.weight", "fc.bias"]
    frame = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        flat = twin.features(frame, ["layer1"])["layer1"]
        clip = frame[:, :, None].expand(1, 3, 12, 64, 64)
        deep = model.features(clip, ["layer1"])["layer1"]
    for t in range(5, 7):  # the stem's and stage 1's temporal padding reach 2 + 3 frames in
        torch.testing.assert_close(deep[:, :, t], flat, rtol=1e-4, atol=1e-4)


def test_inflation_rejects_a_network_of_another_family():
    with pytest.raises(ValueError, match="no 2D counterpart.*layer1.0.conv2"):
        inflate_2d(build("resnet3d50", stage_blocks=(1, 1, 1, 1)), build("pyconvresnet50", stage_blocks=(1, 1, 1, 1)))
