"""A run folder's files: written atomically and durably, by one run at a time, a full disk said in one line.

Atomic: a file is written under a temp name of its own in the target's folder (``.<name>.<pid>.<random>.tmp``,
so two writers never share one), flushed to the disk (fsync), renamed over the target, and the folder
is fsynced so that the rename survives a power cut too. A write that fails removes its temp file and
leaves the previous file whole; a full disk (or a file-size limit) is reported as :class:`DiskFullError`,
one line naming the file, the folder's free space and what the file needs.

One writer: a run holds an ``fcntl.flock`` on ``runs/<name>/.lock`` for its life (:func:`hold_run_dir`), so
a second run in the same folder is refused at once, naming the holder (its pid and host, written into
the lock file). The kernel drops the lock when the holder ends, however it ends: a killed run leaves no
stale lock (the processes it forks close their copy of the lock at once), and the temp files it left are
removed by the next holder.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import platform
import re
import resource
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "AtomicFile",
    "write_atomic",
    "replace_durably",
    "DiskFullError",
    "RunInUseError",
    "hold_run_dir",
    "check_run_dir_free",
    "check_run_name",
    "LOCK_NAME",
]

LOCK_NAME = ".lock"
_TEMP_SUFFIX = ".tmp"
_HELD: dict[Path, int] = {}  # run folders this process holds -> their lock's fd (its own probe must not refuse it)


def _close_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close its copies of the parent's lock fds. A lock lives while any
    copy is open, and a worker notices its parent's death only seconds later: the copy of a killed run's worker
    would refuse the run's restart (torchrun ``--max-restarts``) as a folder in use."""
    for fd in _HELD.values():
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class DiskFullError(OSError):
    """A file could not be written: no space left (ENOSPC, EDQUOT) or over the file-size limit (EFBIG)."""

    def __init__(self, path: Path, err: OSError, need: int) -> None:
        folder = path.parent
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if err.errno == errno.EFBIG and limit != resource.RLIM_INFINITY:
            why = (
                f"it exceeds this process's file-size limit of {_size(limit)} (ulimit -f; it needs about "
                f"{_size(need)}): raise the limit"
            )
        elif err.errno == errno.EFBIG:
            why = f"it exceeds the largest file that {folder}'s file system takes (it needs about {_size(need)})"
        else:
            why = (
                f"the disk is full ({folder} has {_size(shutil.disk_usage(folder).free)} free; this file needs "
                f"about {_size(need)}): free space there or point runs_dir at a larger disk"
            )
        super().__init__(
            f"cannot write {path}: {why}, then rerun with resume=True (the previous {path.name}, if any, is kept)"
        )
        self.errno = err.errno


class RunInUseError(OSError):
    """Another process holds the run folder's lock."""


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KB", "MB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GB"


class AtomicFile:
    """A file-like writer (``write``, ``flush``) to a temp file that replaces ``path`` when the ``with``
    block ends without an error (fsync, rename, fsync of the folder); on an error the temp file is
    removed. ``sha256`` is the digest of what was written; ``sync()`` makes the bytes durable before
    the block ends (so that a record of them can be written first). ``need`` (bytes) is what an error
    on a full disk says the file needs.

    Writing through :meth:`write` rather than handing ``torch.save`` a path: torch reports a failed
    write as a RuntimeError without its cause, while here the OSError (its errno) is kept."""

    def __init__(self, path: str | os.PathLike, need: int) -> None:
        self.path, self.need = Path(path), need
        self.temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")
        self.digest = hashlib.sha256()
        self.error: OSError | None = None

    def __enter__(self) -> AtomicFile:
        self._file = open(self.temp, "wb")
        return self

    def write(self, data: Any) -> int:
        try:
            self._file.write(data)
        except OSError as err:
            self.error = err
            raise
        self.digest.update(data)
        return len(data)

    def flush(self) -> None:
        self._file.flush()

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    @property
    def sha256(self) -> str:
        return self.digest.hexdigest()

    def __exit__(self, kind, value, traceback) -> None:
        try:
            try:
                if kind is None:
                    self.sync()
            finally:
                self._file.close()
            if kind is None:
                os.replace(self.temp, self.path)
                _fsync_dir(self.path.parent)
                return
        except OSError as err:
            self.error = self.error or err
        if self.temp.exists():
            self.temp.unlink()
        error = self.error or (value if isinstance(value, OSError) else None)
        if error is not None and error.errno in _DISK_FULL:
            raise DiskFullError(self.path, error, self.need) from None
        if self.error is not None:  # torch.save's RuntimeError hides it: the OSError is the cause
            raise self.error


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically and durably (see :class:`AtomicFile`)."""
    with AtomicFile(path, need=len(data)) as out:
        out.write(data)


def replace_durably(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` over ``dst`` as :class:`AtomicFile` does (its bytes fsynced, the rename, the folder
    fsynced), for a file that another writer finished under a temp name (papermill's executed notebook)."""
    fd = os.open(src, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(src, dst)
    _fsync_dir(Path(dst).parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some file systems (network mounts) cannot fsync a folder: the rename still happened
        if err.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def check_run_name(name: str) -> None:
    """Refuse a run name that is not one folder inside the runs folder: empty, ``.`` or ``..``, absolute,
    or holding a path separator (``../x`` would write beside the runs folder, ``/x`` anywhere)."""
    if name in ("", ".", "..") or re.search(r"[/\\\0]", name) or os.path.isabs(name):
        parts = [part for part in re.split(r"[/\\\0]+", name) if part not in ("", ".", "..")]
        raise ValueError(
            f"run_name must be one folder name inside runs_dir (no '/' or '\\', not '.' or '..'), got "
            f"{name!r}: e.g. {'-'.join(parts) or 'my-run'!r} (runs_dir chooses where runs go)"
        )


def _holder(path: Path) -> str:
    text = path.read_text().strip() if path.is_file() else ""
    return text or "a process that has not yet written its pid"


def _in_use(folder: Path) -> RunInUseError:
    return RunInUseError(
        f"{folder} is in use by another run ({_holder(folder / LOCK_NAME)}): wait for it to end "
        f"or stop it, or pick another run_name (notebooks: run_prefix)"
    )


def check_run_dir_free(folder: str | os.PathLike) -> None:
    """Refuse a run folder whose lock another process holds (:func:`hold_run_dir`), without taking it."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    if folder.resolve() in _HELD or not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(folder) from None
    finally:
        os.close(fd)


@contextmanager
def hold_run_dir(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder``'s lock for the block (creating the folder): one writer per run. Refuses at once
    (:class:`RunInUseError`, naming the holder) if another process holds it; a prober's brief hold
    (:func:`check_run_dir_free`) is waited out. Temp files a killed writer left are removed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + 1.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _in_use(folder) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {platform.node()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        for stale in folder.glob(f".*{_TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
        _HELD[folder.resolve()] = fd
        try:
            yield
        finally:
            _HELD.pop(folder.resolve(), None)
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)
