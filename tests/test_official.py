"""Official checkpoint layout: loading, exact computation, round trip, mismatch errors."""

import pytest
import torch

from pyconv_core import CheckpointMismatchError, build, load_official_checkpoint, to_official_state_dict
from tests.official_reference import official_forward, randomize_bn


def _official_state(name, num_classes=10):
    torch.manual_seed(1)
    return to_official_state_dict(randomize_bn(build(name, num_classes=num_classes)))


def test_official_key_layout():
    keys = set(_official_state("pyconvresnet50"))
    for key in [
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv2.conv2_1.weight",
        "layer1.0.conv2.conv2_4.weight",
        "layer2.0.conv2.conv2_3.weight",
        "layer3.0.conv2.conv2_2.weight",
        "layer4.0.conv2.weight",
        "layer1.0.downsample.1.weight",
        "layer1.0.downsample.2.running_var",
        "fc.bias",
    ]:
        assert key in keys, key
    assert not any(".levels." in k for k in keys)
    assert "layer1.0.downsample.0.weight" not in keys


@pytest.mark.parametrize(
    "name, bottleneck",
    [("pyconvresnet50", True), ("pyconvhgresnet50", True), ("pyconvresnet18", False), ("pyconvresnet34", False)],
)
def test_loaded_model_computes_what_the_authors_code_computes(name, bottleneck):
    state = _official_state(name)
    model = load_official_checkpoint(build(name, num_classes=10), state).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_forward(state, x, bottleneck), rtol=1e-4, atol=1e-4)


def test_round_trip_through_a_dataparallel_file_is_lossless(tmp_path):
    state = _official_state("pyconvresnet50")
    path = tmp_path / "pyconvresnet50.pth"
    torch.save({"epoch": 90, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = load_official_checkpoint(build("pyconvresnet50", num_classes=10), path)
    back = to_official_state_dict(model)
    assert back.keys() == state.keys()
    for k in state:
        assert torch.equal(back[k], state[k]), k


def test_checkpoint_without_num_batches_tracked_loads():
    state = {k: v for k, v in _official_state("pyconvresnet18").items() if not k.endswith("num_batches_tracked")}
    load_official_checkpoint(build("pyconvresnet18", num_classes=10), state)


def test_mismatch_lists_missing_unexpected_and_misshaped_keys():
    state = _official_state("pyconvresnet50")
    del state["layer1.0.conv2.conv2_4.weight"]
    state["layer9.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as err:
        load_official_checkpoint(build("pyconvresnet50", num_classes=1000), state)
    text = str(err.value)
    assert "missing: layer1.0.conv2.conv2_4.weight" in text
    assert "unexpected: layer9.extra.weight" in text
    assert "fc.weight: checkpoint (10, 2048) vs model (1000, 2048)" in text


def test_wrong_depth_is_refused():
    with pytest.raises(CheckpointMismatchError, match="does not match model pyconvresnet101"):
        load_official_checkpoint(build("pyconvresnet101", num_classes=10), _official_state("pyconvresnet50"))


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_official_checkpoint(build("resnet18"), tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="bad.pth"):
        load_official_checkpoint(build("resnet18"), bad)
