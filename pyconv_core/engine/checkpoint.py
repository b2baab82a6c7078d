"""Training checkpoints: written atomically (``engine.files``), checksummed, read weights-only with clear errors.

A checkpoint holds tensors and plain Python values only (numbers, strings, lists, tuples, dicts),
so it is read with ``torch.load(weights_only=True)``: a file cannot run code when it is loaded,
whoever made it. Beside each, ``<name>.sha256.json`` records the file's sha256 when it was written;
a file that no longer matches (a partial copy, a disk error) is refused by name, never loaded. The
record is written before the rename and also lists the file it replaces, so a kill at any instant
leaves a file the record accepts. A file without a record (older runs, downloaded weights) loads
unchecked. What a layer must carry besides its weights (a PyConv's execution plans) is its extra state
in the model's state_dict, a tensor too (:func:`json_tensor`).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import torch

from pyconv_core.engine.files import AtomicFile, write_atomic

__all__ = [
    "save_atomic",
    "load_checkpoint",
    "remove_checkpoint",
    "checksum_path",
    "rng_state",
    "set_rng_state",
    "refused_as_code",
    "CheckpointMismatchError",
    "StateDictDiff",
    "diff_state_dicts",
    "json_tensor",
    "from_json_tensor",
    "EXTRA_STATE_KEY",
]

_SHOWN = 12  # keys listed per kind in a mismatch message
EXTRA_STATE_KEY = "_extra_state"  # a module's extra state in a state_dict (torch.nn.Module.get_extra_state)


def checksum_path(path: str | os.PathLike) -> Path:
    """Where the sha256 record of the checkpoint ``path`` lives: ``<name>.sha256.json`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.name}.sha256.json")


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, record its sha256, then rename: a kill
    never leaves half a file, and a full disk leaves the previous file (see ``engine.files``)."""
    path = Path(path)
    record = checksum_path(path)
    replaced = _accepted(path) if record.is_file() else [_sha256(path)] if path.is_file() else []
    with AtomicFile(path, need=_nbytes(obj)) as out:
        torch.save(obj, cast(IO[bytes], out))  # torch.save only calls write (and flush)
        out.sync()
        write_atomic(record, json.dumps({"sha256": [out.sha256, *replaced]}).encode())
    write_atomic(record, json.dumps({"sha256": [out.sha256]}).encode())


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete a checkpoint and its sha256 record (where they exist)."""
    Path(path).unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)


def _nbytes(obj: Any) -> int:
    """About what ``torch.save(obj)`` writes: the bytes of its tensors (shared storages once), plus 64 KB."""
    storages: dict[int, int] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(obj)
    return sum(storages.values()) + 2**16


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**24):
            digest.update(block)
    return digest.hexdigest()


def _accepted(path: Path) -> list[str]:
    """The digests that ``path``'s record accepts (the file written, and during a save the one it replaces)."""
    record = checksum_path(path)
    try:
        return list(json.loads(record.read_text())["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise OSError(
            f"checksum record {record} cannot be read ({err}); delete it to load {path.name} unchecked"
        ) from None


def _verify(path: Path) -> None:
    if not checksum_path(path).is_file():
        return
    if _sha256(path) not in _accepted(path):
        raise OSError(
            f"checkpoint {path} is damaged: its sha256 differs from the one {checksum_path(path).name} "
            f"recorded when it was written (a partial copy, a disk error or an edit); restore both files "
            f"from a copy, or delete them and start the run again"
        )


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save_atomic` weights-only; a missing, damaged (its sha256
    record differs), unreadable or code-carrying file is named with what to do."""
    path = Path(path)
    if not path.is_file():
        held = sorted(p.name for p in path.parent.glob("*.pt")) if path.parent.is_dir() else []
        raise FileNotFoundError(
            f"checkpoint {path} does not exist ({path.parent} holds "
            f"{', '.join(held) or 'no checkpoint'}): give the path of one that exists"
        )
    _verify(path)
    try:
        return _plans_into_the_model(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:
        if refused_as_code(err):
            raise OSError(
                f"checkpoint {path} holds Python objects other than tensors and plain values, which a "
                f"weights-only load refuses because loading them could run code ({_first_line(err)}). "
                f"Use a checkpoint written by this workbook or a plain state_dict "
                f"(torch.save(model.state_dict(), path))"
            ) from None
        raise OSError(
            f"checkpoint {path} cannot be read ({_first_line(err)}); delete it and start the run "
            f"again, or restore the file from a copy"
        ) from err


def _plans_into_the_model(checkpoint: Any) -> Any:
    """A run's checkpoint saved before PyConv layers carried their execution plans in their own state holds
    them in a ``pyconv_plans`` entry (layer name -> the choices of ``"auto"``) and the plan mode in its
    ``config``: they move into the model's state as those layers' extra state (``PyConv.get_extra_state``),
    the layout that resumes and every loader read, so such a run computes with the plans it had."""
    if not (
        isinstance(checkpoint, dict)
        and isinstance(checkpoint.get("pyconv_plans"), dict)
        and isinstance(checkpoint.get("model"), dict)
    ):
        return checkpoint
    plans = checkpoint.pop("pyconv_plans")
    mode = (checkpoint.get("config") or {}).get("pyconv_plan", "auto")
    for name, choices in plans.items():
        checkpoint["model"].setdefault(f"{name}.{EXTRA_STATE_KEY}", json_tensor({"plan": mode, "choices": choices}))
    return checkpoint


def json_tensor(value: Any) -> torch.Tensor:
    """Plain values (numbers, strings, lists, dicts) as the UTF-8 bytes of their JSON in a uint8 tensor: a
    module's extra state that keeps its state_dict all tensors, as weights-only loads and comparisons expect."""
    return torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8)


def from_json_tensor(tensor: torch.Tensor) -> Any:
    """The values :func:`json_tensor` encoded."""
    return json.loads(bytes(tensor.tolist()).decode())


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
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
    }
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


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the model."""


@dataclass(frozen=True)
class StateDictDiff:
    """How a checkpoint's state_dict fails to fit a model's: keys the model has and the checkpoint lacks
    (``missing``), keys only the checkpoint has (``unexpected``), and keys of both whose shapes differ
    (``mismatched``, each as ``"key: checkpoint (shape) vs model (shape)"``). False when it fits."""

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def message(self, where: str, problem: str, fix: str) -> str:
        """The error every checkpoint loader gives: ``checkpoint <where> does not <problem>:``, one line
        per kind of key (the first few of each), then ``fix``, what to do about it."""
        lines = [f"checkpoint {where} does not {problem}:"]
        for title, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mis-shaped", self.mismatched),
        ):
            if keys:
                more = f" ... and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
                lines.append(f"  {len(keys)} {title}: " + ", ".join(keys[:_SHOWN]) + more)
        lines.append(f"  {fix}")
        return "\n".join(lines)


def diff_state_dicts(
    model: Mapping[str, torch.Tensor],
    checkpoint: Mapping[str, Any],
    optional: tuple[str, ...] = ("num_batches_tracked", EXTRA_STATE_KEY),
) -> StateDictDiff:
    """Compare a model's state_dict with a checkpoint's, key by key and shape by shape (the one check
    behind every loader's error). Model keys ending with ``optional`` may be absent (BN's
    ``num_batches_tracked``, which old checkpoints lack; a layer's extra state, which it keeps when the
    file has none). Extra state is encoded data, not a weight: its shape is not compared."""
    missing = tuple(k for k in model if k not in checkpoint and not k.endswith(optional))
    unexpected = tuple(k for k in checkpoint if k not in model)
    mismatched = tuple(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model[k].shape)}"
        for k, v in checkpoint.items()
        if k in model and not k.endswith(EXTRA_STATE_KEY) and v.shape != model[k].shape
    )
    return StateDictDiff(missing, unexpected, mismatched)
