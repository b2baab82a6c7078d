"""PyConvSegNet in the authors' checkpoint layout (iduta/pyconvsegnet): keys, and the same output
as an independent forward pass written from docs/paper.md s.6 that reads every weight by the authors'
key name (dilation replacing stride, padding dilation*(k//2) per level, stride-1 MaxPool in the
shortcut of a dilated stage, align_corners=True upsampling)."""

import pytest
import torch
import torch.nn.functional as F

from pyconv_core import build, load_official_checkpoint, to_official_state_dict
from pyconv_core.models.official import CheckpointMismatchError
from tests.official_reference import randomize_bn


def _bn(state, prefix, x):
    return F.batch_norm(
        x,
        state[f"{prefix}.running_mean"],
        state[f"{prefix}.running_var"],
        state[f"{prefix}.weight"],
        state[f"{prefix}.bias"],
        training=False,
        eps=1e-5,
    )


def _pyconv(state, prefix, x, stride=1, dilation=1):
    levels = sorted((k for k in state if k.startswith(f"{prefix}.conv2_")), key=lambda k: int(k.split("_")[-1][0]))
    weights = [state[k] for k in levels] or [state[f"{prefix}.weight"]]
    return torch.cat(
        [
            F.conv2d(
                x,
                w,
                stride=stride,
                padding=dilation * (w.shape[-1] // 2),
                dilation=dilation,
                groups=x.shape[1] // w.shape[1],
            )
            for w in weights
        ],
        1,
    )


def _stage_settings(output_stride, pyconv):
    """(stride, dilation) of stages 1-4 in the authors' build_backbone_layers."""
    first = 2 if pyconv else 1
    if output_stride == 8:
        return [(first, 1), (2, 1), (1, 2), (1, 4)]
    return [(first, 1), (2, 1), (2, 1), (1, 2)]


def _backbone(state, x, output_stride, pyconv):
    x = F.relu(_bn(state, "layer0.1", F.conv2d(x, state["layer0.0.weight"], stride=2, padding=3)))
    if not pyconv:
        x = F.max_pool2d(x, 3, 2, 1)
    stage3 = None
    for stage, (stride, dilation) in enumerate(_stage_settings(output_stride, pyconv), start=1):
        block = 0
        while f"layer{stage}.{block}.bn1.weight" in state:
            p, s = f"layer{stage}.{block}", stride if block == 0 else 1
            out = F.relu(_bn(state, f"{p}.bn1", F.conv2d(x, state[f"{p}.conv1.weight"])))
            out = F.relu(_bn(state, f"{p}.bn2", _pyconv(state, f"{p}.conv2", out, s, dilation)))
            out = _bn(state, f"{p}.bn3", F.conv2d(out, state[f"{p}.conv3.weight"]))
            if pyconv and f"{p}.downsample.1.weight" in state:  # MaxPool(3, s, 1) even when s == 1
                identity = F.max_pool2d(x, 3, s, 1) if (s > 1 or dilation > 1) else x
                identity = _bn(state, f"{p}.downsample.2", F.conv2d(identity, state[f"{p}.downsample.1.weight"]))
            elif f"{p}.downsample.0.weight" in state:
                identity = _bn(state, f"{p}.downsample.1", F.conv2d(x, state[f"{p}.downsample.0.weight"], stride=s))
            else:
                identity = x
            x = F.relu(out + identity)
            block += 1
        if stage == 3:
            stage3 = x
    return stage3, x


def _cbr(state, prefix, x, padding=0):
    return F.relu(
        _bn(state, f"{prefix[:-1]}{int(prefix[-1]) + 1}", F.conv2d(x, state[f"{prefix}.weight"], padding=padding))
    )


def official_segnet_forward(state, x, output_stride, pyconv):
    """Logits (eval mode) of the authors' PyConvSegNet for an official-layout ``state``."""
    stage3, x = _backbone(state, x, output_stride, pyconv)
    local, glob = "pyconvhead.local_context.layers", "pyconvhead.global_context.features"
    a = _cbr(state, f"{local}.0", x)
    a = F.relu(_bn(state, f"{local}.4", _pyconv(state, f"{local}.3", a)))
    a = _cbr(state, f"{local}.6", a)
    g = _cbr(state, f"{glob}.1", F.adaptive_avg_pool2d(x, 9))
    g = F.relu(_bn(state, f"{glob}.5", _pyconv(state, f"{glob}.4", g)))
    g = _cbr(state, f"{glob}.7", g)
    g = F.interpolate(g, x.shape[-2:], mode="bilinear", align_corners=True)
    merged = _cbr(state, "pyconvhead.merge_context.features.0", torch.cat([a, g], 1), padding=1)
    logits = F.conv2d(merged, state["cls.1.weight"], state["cls.1.bias"])
    return logits, stage3


def test_official_key_layout():
    keys = set(to_official_state_dict(build("pyconvsegnet50", num_classes=150, backbone="pyconvresnet")))
    for key in [
        "layer0.0.weight",
        "layer0.1.running_var",
        "layer1.0.conv2.conv2_4.weight",
        "layer4.2.conv2.weight",
        "layer3.0.downsample.1.weight",
        "layer3.0.downsample.2.running_mean",
        "pyconvhead.local_context.layers.0.weight",
        "pyconvhead.local_context.layers.3.conv2_4.weight",
        "pyconvhead.global_context.features.4.conv2_1.weight",
        "pyconvhead.global_context.features.8.bias",
        "pyconvhead.merge_context.features.0.weight",
        "aux.0.weight",
        "aux.4.bias",
        "cls.1.weight",
    ]:
        assert key in keys, key
    assert not any(k.startswith(("backbone.", "head.", "classifier.")) or ".levels." in k for k in keys)
    assert not any(k.startswith("fc.") for k in keys)


@pytest.mark.parametrize(
    "name, keys",
    [
        (
            "pspnet50",
            ["ppm.features.0.1.weight", "ppm.features.3.2.running_var", "cls.0.weight", "cls.1.bias", "cls.4.bias"],
        ),
        ("fcn50", ["cls.0.weight", "cls.1.running_mean", "cls.4.weight"]),
    ],
)
def test_peers_use_the_semseg_layout_of_the_authors_repository(name, keys):
    official = set(to_official_state_dict(build(name, num_classes=150)))
    assert set(keys) <= official and "aux.4.weight" in official and "layer0.0.weight" in official
    assert not any(k.startswith(("head.", "classifier.")) for k in official)


@pytest.mark.parametrize("output_stride, backbone", [(8, "pyconvresnet"), (16, "pyconvresnet"), (8, "resnet")])
def test_loaded_model_computes_what_the_authors_code_computes(output_stride, backbone):
    torch.manual_seed(0)
    source = randomize_bn(build("pyconvsegnet50", num_classes=5, output_stride=output_stride, backbone=backbone))
    state = to_official_state_dict(source)
    model = load_official_checkpoint(
        build("pyconvsegnet50", num_classes=5, output_stride=output_stride, backbone=backbone), state
    ).eval()
    x = torch.randn(1, 3, 65, 65)
    logits, stage3 = official_segnet_forward(state, x, output_stride, backbone == "pyconvresnet")
    assert stage3.shape[-1] == (9 if output_stride == 8 else 5)
    expected = F.interpolate(logits, (65, 65), mode="bilinear", align_corners=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_dataparallel_checkpoint_file_loads(tmp_path):
    state = to_official_state_dict(build("pyconvsegnet50", num_classes=150, backbone="pyconvresnet"))
    path = tmp_path / "train_epoch_100.pth"
    torch.save({"epoch": 100, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    load_official_checkpoint(build("pyconvsegnet50", num_classes=150, backbone="pyconvresnet"), path)
    with pytest.raises(CheckpointMismatchError, match="mis-shaped"):  # a resnet backbone's layer1 differs
        load_official_checkpoint(build("pyconvsegnet50", num_classes=150, backbone="resnet"), path)
