"""Model registry: ``build("pyconvresnet50", num_classes=10)``, ``list_models(task)``.

A leaf, as timm's and torchvision's registries: it imports no model. The model modules register their
builders with :func:`register_model` when :mod:`pyconv_core.models` imports them, which importing
:mod:`pyconv_core` (the parent of this module) always does first.

The paper's figures per registered name are in :mod:`pyconv_core.paper`; with this registry they
make the paper-fidelity test matrix.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from torch import nn

__all__ = ["register_model", "build", "list_models", "model_entry"]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    task: str
    input_shape: tuple[int, ...]


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(task: str = "classification", input_shape: tuple[int, ...] = (3, 224, 224)) -> Callable:
    """Decorator registering a builder under its function name.

    ``input_shape`` is one sample's shape at the model's default size (for export, benchmarks and
    profiling a model the paper gives no figures for).
    """

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if fn.__name__ in _REGISTRY:
            raise ValueError(f"model {fn.__name__!r} is registered twice")
        _REGISTRY[fn.__name__] = ModelEntry(fn.__name__, fn, task, input_shape)
        return fn

    return wrap


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; a clear error with close matches if unknown."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build(name: str, **kwargs) -> nn.Module:
    """Build a registered model; the name and arguments are kept in ``model.model_args``."""
    model = model_entry(name).builder(**kwargs)
    cast(Any, model).model_args = {"name": name, **kwargs}  # an attribute torch's Module type does not declare
    return model


def list_models(task: str | None = None) -> list[str]:
    """Registered model names (of one task, if given), in registration order."""
    return [n for n, e in _REGISTRY.items() if task is None or e.task == task]
