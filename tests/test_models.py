"""Every registered classification model: output shapes, options, the backbone contract, registry errors."""

import copy

import pytest
import torch
import torchvision

from pyconv_core import build, list_models
from pyconv_core.models.resnet import ResNet
from pyconv_core.profile import count_params


@pytest.mark.parametrize("name", list_models("classification"))
def test_output_shape_at_224(name):
    model = build(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 7)


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_baseline_resnet_equals_torchvision(depth):
    ours = build(f"resnet{depth}")
    theirs = getattr(torchvision.models, f"resnet{depth}")()
    assert count_params(ours) == count_params(theirs)
    state = {k.replace(".levels.0.", "."): v for k, v in ours.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def test_resnet50_computes_what_torchvision_computes():
    theirs = torchvision.models.resnet50().eval()
    ours = build("resnet50").eval()
    from pyconv_core import load_official_checkpoint

    load_official_checkpoint(ours, theirs.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_stage_resolutions_of_pyconvresnet():
    """No stem max pool: stage 1 already downsamples to 56x56 (docs/paper.md s.2)."""
    model, x = build("pyconvresnet50").eval(), torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert model.stem(x).shape[1:] == (64, 112, 112)
        sizes = [maps.shape[1:] for maps in model.features(x).values()]
    assert sizes == [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]


def test_zero_init_residual_and_dropout():
    model = build("pyconvresnet50", zero_init_residual=True, dropout=0.3)
    assert all(float(block.bn3.weight.detach().abs().sum()) == 0 for block in model.layer1)
    assert isinstance(model.dropout, torch.nn.Dropout) and model.dropout.p == 0.3
    basic = build("pyconvresnet18", zero_init_residual=True)
    assert float(basic.layer2[0].bn2.weight.detach().abs().sum()) == 0


def test_3d_network_from_the_same_builder():
    model = ResNet("pyconvresnet", 50, num_classes=5, dim=3, stem_kernel=(5, 7, 7), stem_stride=(1, 2, 2)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 4, 64, 64)).shape == (1, 5)


# ---- the backbone contract: stem, named stages, feature_info, truncation ----------------------------

CONTRACT_NETS = {
    "resnet18": (lambda: build("resnet18"), (64, 64)),
    "pyconvhgresnet50": (lambda: build("pyconvhgresnet50", stage_blocks=(1, 1, 1, 1)), (64, 64)),
    "pyconvresnet18 at output stride 8": (lambda: build("pyconvresnet18", output_stride=8), (64, 64)),
    "resnet3d50": (lambda: build("resnet3d50", stage_blocks=(1, 1, 1, 1)), (8, 64, 64)),
    "pyconvresnet3d50": (lambda: build("pyconvresnet3d50", stage_blocks=(1, 1, 1, 1)), (8, 64, 64)),
}


@pytest.mark.parametrize("name", sorted(CONTRACT_NETS))
def test_each_stage_has_the_channels_and_reduction_that_feature_info_reports(name):
    make, size = CONTRACT_NETS[name]
    model = make().eval()
    with torch.no_grad():
        maps = model.features(torch.randn(1, 3, *size))
    assert list(maps) == [info["module"] for info in model.feature_info] == list(model.stage_names)
    for info in model.feature_info:
        expected = (info["num_chs"], *(side // r for side, r in zip(size, info["reduction"], strict=True)))
        assert tuple(maps[info["module"]].shape[1:]) == expected, info
    assert model.feature_info[-1]["num_chs"] == model.num_features


def test_features_stop_after_the_last_stage_asked_for_and_unknown_stages_are_named():
    model, ran = build("resnet18").eval(), []
    for name, stage in model.stages():
        stage.register_forward_hook(lambda module, args, out, name=name: ran.append(name))
    with torch.no_grad():
        maps = model.features(torch.randn(1, 3, 32, 32), ["layer1", "layer3"])
    assert list(maps) == ["layer1", "layer3"] and ran == ["layer1", "layer2", "layer3"]
    with pytest.raises(ValueError, match=r"among \('layer1', 'layer2', 'layer3', 'layer4'\), got \['layer5'\]"):
        model.features(torch.randn(1, 3, 32, 32), ["layer5"])


def test_a_truncated_backbone_lacks_the_later_stages_and_the_classifier_and_computes_the_same_stage_3_maps():
    torch.manual_seed(0)
    full = build("pyconvresnet18").eval()
    cut = copy.deepcopy(full).truncate(after="layer3")
    assert cut.stage_names == ("layer1", "layer2", "layer3") and [i["module"] for i in cut.feature_info] == list(
        cut.stage_names
    )
    assert not any(hasattr(cut, name) for name in ("layer4", "avgpool", "dropout", "fc"))
    assert cut.num_features == full.feature_info[2]["num_chs"] == 256
    assert set(cut.state_dict()) == {k for k in full.state_dict() if not k.startswith(("layer4.", "fc."))}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(cut(x), full.features(x, ["layer3"])["layer3"])
    with pytest.raises(ValueError, match="truncate.after=.... takes one of .*'layer3'.*got 'layer4'"):
        cut.truncate(after="layer4")


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(ValueError, match="pyconvresnet50"):
        build("pyconvresnet5O")


def test_model_args_are_recorded():
    assert build("resnet18", num_classes=3).model_args == {"name": "resnet18", "num_classes": 3}
