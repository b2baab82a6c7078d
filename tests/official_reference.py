"""An independent forward pass of the authors' PyConvResNet, read straight from their key layout.

Written from docs/paper.md s.2 (not from our model code): every weight is looked up by the authors'
key name, each level's groups follow from its weight shape, padding is k // 2, the stride sits
in the PyConv of each stage's first block, and the shortcut is MaxPool(3, 2, 1) -> 1x1 -> BN.
"""

import torch
import torch.nn.functional as F


def randomize_bn(model):
    """Non-trivial BN statistics so that a wrong mapping cannot hide behind identity BNs."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


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


def _pyconv(state, prefix, x, stride):
    level_keys = sorted(
        (k for k in state if k.startswith(f"{prefix}.conv2_")), key=lambda k: int(k.split("_")[-1].split(".")[0])
    )
    weights = [state[k] for k in level_keys] or [state[f"{prefix}.weight"]]
    outs = []
    for w in weights:
        outs.append(F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2, groups=x.shape[1] // w.shape[1]))
    return torch.cat(outs, 1)


def _shortcut(state, prefix, x, stride):
    if f"{prefix}.downsample.1.weight" in state:
        x = F.max_pool2d(x, 3, stride, 1) if stride > 1 else x
        return _bn(state, f"{prefix}.downsample.2", F.conv2d(x, state[f"{prefix}.downsample.1.weight"]))
    if f"{prefix}.downsample.0.weight" in state:
        return _bn(state, f"{prefix}.downsample.1", F.conv2d(x, state[f"{prefix}.downsample.0.weight"]))
    return F.max_pool2d(x, 3, stride, 1) if stride > 1 else x


def official_forward(state, x, bottleneck=True):
    """Logits of the authors' PyConvResNet / PyConvHGResNet for an official-layout ``state``."""
    x = F.relu(_bn(state, "bn1", F.conv2d(x, state["conv1.weight"], stride=2, padding=3)))
    for stage in range(1, 5):
        block = 0
        while f"layer{stage}.{block}.bn1.weight" in state:
            p, stride = f"layer{stage}.{block}", 2 if block == 0 else 1
            identity = _shortcut(state, p, x, stride)
            if bottleneck:
                out = F.relu(_bn(state, f"{p}.bn1", F.conv2d(x, state[f"{p}.conv1.weight"])))
                out = F.relu(_bn(state, f"{p}.bn2", _pyconv(state, f"{p}.conv2", out, stride)))
                out = _bn(state, f"{p}.bn3", F.conv2d(out, state[f"{p}.conv3.weight"]))
            else:
                out = F.relu(_bn(state, f"{p}.bn1", _pyconv(state, f"{p}.conv1", x, stride)))
                out = _bn(state, f"{p}.bn2", F.conv2d(out, state[f"{p}.conv2.weight"]))
            x = F.relu(out + identity)
            block += 1
    x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    return F.linear(x, state["fc.weight"], state["fc.bias"])
