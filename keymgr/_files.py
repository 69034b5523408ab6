"""Writing files so that a crash or a full disk never leaves half a file.

Every file keymgr writes goes to a temporary file in the same directory,
is flushed and fsync'ed, renamed over the target, and the directory is
fsync'ed so the rename itself is durable (the classic "rename dance").
On any failure the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from keymgr import errors

__all__ = ["atomic_write", "atomic_output", "temp_file_abandoned", "fsync_directory", "os_error_reason"]


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def os_error_reason(exc: OSError) -> str:
    """A short, secret-free reason for a failed write ("the disk is full", "Permission denied")."""
    return "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or type(exc).__name__)


def _storage_error(path: Path, exc: OSError) -> errors.StorageError:
    return errors.StorageError(f"cannot write {path}: {os_error_reason(exc)}; nothing was changed")


@contextlib.contextmanager
def atomic_output(path: Path | str, *, mode: int = 0o644, tag: str = "",
                  before_replace: Callable[[], None] | None = None) -> Iterator[BinaryIO]:
    """Yield a file to write; on clean exit it replaces ``path`` atomically.

    If the block raises, the temporary file is deleted and ``path`` is left as it was.
    ``tag`` goes into the temporary file's name (``.NAME.TAG.XXXXXXXX.tmp``) so its writer
    can recognise what a crash left behind; ``before_replace`` runs after the data is
    durable and before the rename (a write-ahead journal entry: keymgr.rewrap_journal).
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    prefix = f".{target.name}.{tag}." if tag else f".{target.name}."
    try:
        fd, temp_name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    except OSError as exc:
        raise _storage_error(target, exc) from None
    temp = Path(temp_name)
    try:
        if tag:
            # held until the file is closed (by exit, too: a SIGKILLed writer releases it), so a
            # cleaner can tell a dead writer's leftover from a live one's file (temp_file_abandoned)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(temp, target)
        fsync_directory(directory)
    except errors.KeymgrError:  # keymgr's own error from inside the block (a policy refusal, the audit
        temp.unlink(missing_ok=True)  # log's StorageError, which is an OSError too): passed through as it is
        raise
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise _storage_error(target, exc) from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def temp_file_abandoned(path: Path | str, *, wait: float = 2.0) -> bool:
    """Whether a tagged temporary file of :func:`atomic_output` was left by a writer that is gone.

    Its writer holds an exclusive ``flock`` on it until the file is closed, which the kernel
    does when the process dies (even before a parent reaps it), so the lock, unlike a pid
    (reused, or a zombie's), says whether anyone still writes it. A writer that is being
    killed right now releases it within ``wait`` seconds; a live one keeps it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.02)
    finally:
        os.close(fd)


def atomic_write(path: Path | str, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    with atomic_output(path, mode=mode) as handle:
        handle.write(data)
