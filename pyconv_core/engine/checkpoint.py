"""Training checkpoints: written atomically (temp file + rename), read weights-only with clear errors.

A checkpoint holds tensors and plain Python values only (numbers, strings, lists, tuples, dicts),
so it is read with ``torch.load(weights_only=True)``: a file cannot run code when it is loaded,
whoever made it.
"""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

__all__ = ["save_atomic", "load_checkpoint", "rng_state", "set_rng_state", "refused_as_code"]


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, then rename: a kill never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save_atomic` weights-only; a missing, unreadable or
    code-carrying file is named with what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; start without resume, or point run_name "
                                f"at the run folder that holds last.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if refused_as_code(err):
            raise OSError(f"checkpoint {path} holds Python objects other than tensors and plain values, which a "
                          f"weights-only load refuses because loading them could run code ({_first_line(err)}). "
                          f"Use a checkpoint written by this workbook or a plain state_dict "
                          f"(torch.save(model.state_dict(), path))") from None
        raise OSError(f"checkpoint {path} cannot be read ({_first_line(err)}); delete it and start the run "
                      f"again, or restore the file from a copy") from err


def refused_as_code(err: BaseException) -> bool:
    """Whether torch's weights-only unpickler refused a Python object (a global or a call it does not
    allow) rather than meeting broken bytes."""
    text = str(err)
    return isinstance(err, pickle.UnpicklingError) and ("Unsupported global" in text or "reduce" in text)


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def rng_state() -> dict:
    """All random generators that training touches (python, numpy, torch CPU and CUDA), as tensors
    and plain values so that a weights-only load can restore them."""
    legacy_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())  # the legacy=True form
    kind, keys, pos, has_gauss, cached_gaussian = legacy_state
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
