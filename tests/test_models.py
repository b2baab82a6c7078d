"""Every registered classification model: output shapes, options, registry errors."""
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
    model = build("pyconvresnet50").eval()
    x = model.relu(model.bn1(model.conv1(torch.randn(1, 3, 224, 224))))
    sizes = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = stage(x)
        sizes.append(x.shape[1:])
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


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(ValueError, match="pyconvresnet50"):
        build("pyconvresnet5O")


def test_model_args_are_recorded():
    assert build("resnet18", num_classes=3).model_args == {"name": "resnet18", "num_classes": 3}
