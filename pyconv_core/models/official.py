"""Load and save state_dicts in the layout of the authors' released checkpoints (docs/paper.md s.2).

The authors name the levels of a multi-level PyConv ``<conv>.conv2_{1..L}`` and keep a
single-level one as a plain ``<conv>`` convolution; our :class:`PyConv` always holds
``<conv>.levels.{i}``. Everything else (``conv1``, ``bn1``, ``layerN.B.*``, ``downsample.{1,2}``
after the shortcut's MaxPool, ``fc``) already has the authors' (and torchvision's) names.
Models with further renames (e.g. segmentation's ``layer0``) list them in an
``official_prefixes`` attribute: pairs ``(our_prefix, their_prefix)``. The authors' files hold weights
only: a PyConv's extra state (its execution plans) has no key there, and a file without it keeps the
model's plans.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping

import torch
from torch import nn

from pyconv_core.engine.checkpoint import (
    EXTRA_STATE_KEY,
    CheckpointMismatchError,
    diff_state_dicts,
    load_checkpoint,
    refused_as_code,
)
from pyconv_core.layers.pyconv import PyConv

__all__ = [
    "CheckpointMismatchError",
    "load_official_checkpoint",
    "load_backbone_weights",
    "load_model_weights",
    "to_official_state_dict",
    "official_key_map",
]


def official_key_map(model: nn.Module) -> dict[str, str]:
    """Map each of the model's state_dict keys to the authors' key (extra state, which they lack, is left out)."""
    prefixes: list[tuple[str, str]] = list(getattr(model, "official_prefixes", []))
    for name, module in model.named_modules():
        if isinstance(module, PyConv):
            single = len(module.levels) == 1
            for i in range(len(module.levels)):
                theirs = f"{name}." if single else f"{name}.conv2_{i + 1}."
                prefixes.append((f"{name}.levels.{i}.", theirs))
    prefixes.sort(key=lambda p: len(p[0]), reverse=True)
    mapping = {}
    for key in model.state_dict():
        if key.endswith(EXTRA_STATE_KEY):
            continue
        official = key
        for ours, theirs in prefixes:
            if official.startswith(ours):
                official = theirs + official[len(ours) :]
        mapping[key] = official
    return mapping


def to_official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict under the authors' key names (loadable by their code)."""
    mapping = official_key_map(model)
    return {mapping[k]: v for k, v in model.state_dict().items() if k in mapping}


def _read_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> tuple[dict, str]:
    if isinstance(source, Mapping):
        state, where = dict(source), "the given state_dict"
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"checkpoint {path!r} does not exist; pass the path of a .pth/.pt file "
                f"saved by the authors' code or by this workbook"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if not refused_as_code(err):
                reason = str(err).strip().splitlines()[0]
                raise CheckpointMismatchError(
                    f"cannot read checkpoint {path!r} ({reason}); re-download or re-save "
                    f"it with torch.save(model.state_dict(), path)"
                ) from err
            raise CheckpointMismatchError(
                f"checkpoint {path!r} holds Python objects other than tensors and plain values, which a "
                f"weights-only load refuses because loading them could run code ({str(err).strip().splitlines()[0]}); "
                f"use a plain state_dict (torch.save(model.state_dict(), path))"
            ) from None
        except Exception as err:
            raise CheckpointMismatchError(
                f"cannot read checkpoint {path!r} ({err}); re-download or re-save it "
                f"with torch.save(model.state_dict(), path)"
            ) from err
        where = path
    for wrapper in ("state_dict", "model"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = dict(state[wrapper])
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state, where


def load_official_checkpoint(
    model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], label: str | None = None
) -> nn.Module:
    """Load an authors'-layout state_dict (path or dict; ``module.`` prefix and a
    ``{"state_dict": ...}`` wrapper accepted) exactly into ``model``; this workbook's own layout
    (``.levels.`` keys, as ``torch.save(model.state_dict(), path)`` of one of its models writes, or a
    run's ``best.pt``) is accepted too, so the re-save that a refused file's message advises loads.

    Raises :class:`CheckpointMismatchError` listing missing, unexpected and mis-shaped keys.
    BN ``num_batches_tracked`` buffers absent from old checkpoints are not counted as missing.
    """
    state, where = _read_state_dict(source)
    return _load_either_layout(model, state, where, label)


def _load_either_layout(model: nn.Module, state: dict, where: str, label: str | None) -> nn.Module:
    """Load ``state`` (read from ``where``) exactly into ``model``, in this workbook's layout if its keys
    have ``.levels.``, else in the authors'."""
    if any(".levels." in k for k in state):
        return _load_own_layout(
            model,
            state,
            where,
            f"model {label or _name(model)}",
            "Use weights of the same model (architecture, depth, number of classes).",
        )
    return _load_official(model, state, where, label)


def _name(model: nn.Module) -> str:
    return getattr(model, "model_args", {}).get("name", type(model).__name__)


def _load_official(model: nn.Module, state: dict, where: str, label: str | None) -> nn.Module:
    """:func:`load_official_checkpoint` of a state_dict read from ``where``."""
    mapping = official_key_map(model)
    own = model.state_dict()
    by_official = {official: ours for ours, official in mapping.items()}
    diff = diff_state_dicts({official: own[ours] for official, ours in by_official.items()}, state)
    if diff:
        raise CheckpointMismatchError(
            diff.message(
                where,
                f"match model {label or _name(model)}",
                "Check the architecture name and depth (and "
                "num_classes for the classifier); a checkpoint of a different model cannot be loaded.",
            )
        )
    ours = {by_official[k]: v for k, v in state.items()}
    for key, value in own.items():
        ours.setdefault(key, value)
    model.load_state_dict(ours, strict=True)
    return model


def load_backbone_weights(
    backbone: nn.Module,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    drop: tuple[str, ...] = ("fc.",),
    rename: Mapping[str, str] | None = None,
    label: str | None = None,
) -> nn.Module:
    """Load a classifier's weights into a backbone (detection and segmentation start from one, as the
    paper's recipes start from ImageNet). ``source``: the authors' or torchvision's layout, or this
    workbook's own (``.levels.`` keys, e.g. a classification run's ``runs/<name>/best.pt``), as a path
    or a state_dict. Keys starting with ``drop`` (the classifier; stages the backbone does not have)
    are skipped and ``rename`` maps key prefixes; everything else must fit exactly."""
    state, where = _read_state_dict(source)
    label = label or _name(backbone)
    kept = {}
    for key, value in state.items():
        if key.startswith(drop) or key.endswith(EXTRA_STATE_KEY):  # weights only: the run sets its own plans
            continue
        for theirs, ours in (rename or {}).items():
            if key.startswith(theirs):
                key = ours + key[len(theirs) :]
                break
        kept[key] = value
    if not any(".levels." in k for k in kept):
        return load_official_checkpoint(backbone, kept, label=label)
    return _load_own_layout(
        backbone, kept, where, f"the backbone {label}", "Use a classifier checkpoint of the same family and depth."
    )


def _load_own_layout(model: nn.Module, state: Mapping[str, torch.Tensor], where: str, what: str, fix: str) -> nn.Module:
    """Load a state_dict in this workbook's layout exactly into ``model`` (BN counters and the layers' extra
    state may be absent: :func:`diff_state_dicts`)."""
    own = model.state_dict()
    diff = diff_state_dicts(own, state)
    if diff:
        raise CheckpointMismatchError(diff.message(where, f"fit {what}", fix))
    model.load_state_dict({**own, **state})
    return model


def load_model_weights(model: nn.Module, source: str | os.PathLike) -> nn.Module:
    """Load a whole model's weights (the ``weights`` parameter of every task) from ``source``, read
    weights-only (``engine.checkpoint.load_checkpoint``): a workbook run's ``best.pt`` / ``last.pt``
    (its ``model`` entry; the PyConv plans its run chose come along in the layers' state, so the model
    computes as it did there), a plain state_dict in this workbook's layout, or the authors' released file
    (classification networks, PyConvSegNet; ``module.`` prefix and ``state_dict`` wrapper accepted). Everything
    must fit exactly; a checkpoint of another model is refused naming both."""
    where = os.fspath(source)
    checkpoint = load_checkpoint(where)
    recorded = checkpoint.get("model_args")
    if isinstance(recorded, Mapping) and recorded.get("name") != _name(model):
        raise CheckpointMismatchError(
            f"checkpoint {where} holds a {recorded.get('name')} ({dict(recorded)}), but this run builds "
            f"{_name(model)}: pass weights of a {_name(model)}, or set the model parameters (arch, depth, head, "
            f"...) to those of the checkpoint's run"
        )
    state, _ = _read_state_dict(checkpoint)
    return _load_either_layout(model, state, where, None)
