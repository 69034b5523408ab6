"""Writing files so that a crash, a kill or a full disk never leaves half a file, or a stray one.

Every file keymgr writes is first written to a temporary file in the same
directory, flushed and fsync'ed, renamed over the target, and the directory
is fsync'ed so the rename itself is durable (the classic "rename dance").
On any failure the temporary file is removed and the target is untouched.

What a kill (SIGKILL, a crash, power loss) can leave behind, and who removes it:

- Where the filesystem has ``O_TMPFILE`` (Linux: ext4, xfs, btrfs, tmpfs ...)
  the data goes to an *unnamed* file, which the kernel frees when its writer
  dies. It gets a name (``linkat`` through ``/proc/self/fd``) only once it is
  complete and durable, and is renamed over the target right after: a file
  with no name cannot replace one atomically, so a temporary name exists for
  the microseconds between the two calls.
- Elsewhere (NFS, some FUSE filesystems) the temporary file is named from the
  start.

Either way the name is tagged, ``.NAME.TAG.XXXXXXXX.tmp`` (:data:`TEMP_NAME`),
and its writer holds an exclusive ``flock`` on it from creation to rename, so
a later run can tell a dead writer's leftover from a live writer's file
(:func:`temp_file_abandoned`) and remove it (:func:`remove_abandoned_temp_files`):
``keymgr encrypt/decrypt -o`` does so in OUT's directory, ``keymgr rewrap`` in
every directory it walks. Decrypted plaintext therefore outlives a killed
writer only on a filesystem without ``O_TMPFILE``, and only until the next run.

The environment variable ``KEYMGR_NO_O_TMPFILE=1`` forces named temporary
files (tests use it to check that path on filesystems that have ``O_TMPFILE``).

Public because a program that writes what keymgr gives it (decrypted plaintext, a
report, a custodian's request: the ``keymgr`` command, which uses only the public API,
is one) needs the same guarantees and the same tagged temporary names, so that one
run's sweep also removes what a killed writer of the other left behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from keymgr import errors

__all__ = ["DEFAULT_TAG", "TEMP_NAME", "atomic_write", "atomic_output", "fsync_directory", "os_error_reason",
           "remove_abandoned_temp_files", "temp_file_abandoned", "write_new"]

#: the tag of a temporary file whose writer gave none: ``.NAME.keymgr.XXXXXXXX.tmp``
DEFAULT_TAG = "keymgr"
#: every temporary file :func:`atomic_output` names: its tag starts with ``keymgr`` (``keymgr``,
#: ``keymgr-rewrap.PID`` ...), then 8 random characters
TEMP_NAME = re.compile(r"^\..+\.keymgr(?:[-.][A-Za-z0-9.-]+)?\.[A-Za-z0-9_]{8}\.tmp$")
#: longest part of the target's name kept in a temporary name (NAME_MAX is 255)
_NAME_PART = 200
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
_LINK_TRIES = 100


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


def _unnamed_file(directory: Path) -> int | None:
    """An ``O_TMPFILE`` file in ``directory``, or None where the filesystem (or kernel) has none."""
    if not _O_TMPFILE or os.environ.get("KEYMGR_NO_O_TMPFILE") == "1" or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(directory, os.O_RDWR | _O_TMPFILE | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        # EOPNOTSUPP: the filesystem has none; EISDIR/EINVAL: the kernel predates O_TMPFILE
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None
        raise


def _name_unnamed(fd: int, directory: Path, prefix: str) -> Path:
    """Give the unnamed file ``fd`` a fresh temporary name (``linkat`` through /proc/self/fd)."""
    # a directory fd makes os.link call linkat(AT_SYMLINK_FOLLOW); plain link() would try to
    # link the /proc symlink itself (EXDEV)
    dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    try:
        for _ in range(_LINK_TRIES):
            name = f"{prefix}{secrets.token_hex(4)}.tmp"
            try:
                os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
                return directory / name
            except FileExistsError:
                continue
    finally:
        os.close(dir_fd)
    raise FileExistsError(errno.EEXIST, "no free temporary name")


@contextlib.contextmanager
def atomic_output(path: Path | str, *, mode: int = 0o644, tag: str = DEFAULT_TAG,
                  before_replace: Callable[[], None] | None = None, exclusive: bool = False) -> Iterator[BinaryIO]:
    """Yield a file to write; on clean exit it replaces ``path`` atomically.

    If the block raises, the temporary file is deleted and ``path`` is left as it was;
    keymgr's own errors from the block (a policy refusal, the audit log's StorageError)
    pass through as they are, any other OSError becomes one StorageError naming ``path``.
    ``tag`` goes into the temporary file's name (``.NAME.TAG.XXXXXXXX.tmp``; it must start
    with ``keymgr`` to match :data:`TEMP_NAME`) so a later run can recognise what a crash
    left behind; ``before_replace`` runs after the data is durable and before the rename
    (a write-ahead journal entry: keymgr.rewrap.journal). Write only to ``path`` itself:
    a symbolic link at ``path`` is replaced by the file (callers resolve links first).
    ``exclusive``: never replace anything at ``path``: the file is hard-linked there (atomic and
    refused when the name exists, whatever it is) and :class:`FileExistsError` passes through.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    prefix = f".{target.name[:_NAME_PART]}.{tag}."
    temp: Path | None = None
    try:
        fd = _unnamed_file(directory)
        if fd is None:
            fd, temp_name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
            temp = Path(temp_name)
    except OSError as exc:
        raise _storage_error(target, exc) from None
    try:
        # held until the file is closed, after the rename (by exit, too: a SIGKILLed writer releases
        # it), so a cleaner can tell a dead writer's leftover from a live one's (temp_file_abandoned)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=False) as handle:
            yield handle
            handle.flush()
            os.fsync(fd)
        if before_replace is not None:
            before_replace()
        if temp is None:
            temp = _name_unnamed(fd, directory, prefix)
        if exclusive:
            os.link(temp, target)
            _discard(temp)
        else:
            os.replace(temp, target)
        temp = None
        fsync_directory(directory)
    except errors.KeymgrError:  # keymgr's own error from inside the block (a policy refusal, the audit
        _discard(temp)           # log's StorageError, which is an OSError too): passed through as it is
        raise
    except OSError as exc:
        _discard(temp)
        if exclusive and isinstance(exc, FileExistsError):
            raise
        raise _storage_error(target, exc) from None
    except BaseException:
        _discard(temp)
        raise
    finally:
        os.close(fd)


def _discard(temp: Path | None) -> None:
    if temp is not None:
        with contextlib.suppress(OSError):
            temp.unlink()


def temp_file_abandoned(path: Path | str, *, wait: float = 2.0) -> bool:
    """Whether a tagged temporary file of :func:`atomic_output` was left by a writer that is gone.

    Its writer holds an exclusive ``flock`` on it until the file is closed, which the kernel
    does when the process dies (even before a parent reaps it), so the lock, unlike a pid
    (reused, or a zombie's), says whether anyone still writes it. A writer that is being
    killed right now releases it within ``wait`` seconds; a live one keeps it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK)
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


def remove_abandoned_temp_files(directory: Path | str, *, wait: float = 0.0) -> int:
    """Delete the temporary files of :func:`atomic_output` in ``directory`` whose writer is gone
    (:func:`temp_file_abandoned`); returns how many. Files that cannot be opened (another
    user's), and every file a live writer holds, are left alone."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        if (TEMP_NAME.match(entry.name) and entry.is_file(follow_symlinks=False)
                and temp_file_abandoned(entry.path, wait=wait)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    return removed


def atomic_write(path: Path | str, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    with atomic_output(path, mode=mode) as handle:
        handle.write(data)


def write_new(path: Path | str, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to a *new* file at ``path``, atomically and durably; :class:`FileExistsError`
    (and nothing written) when the name is taken. For records that must never be overwritten:
    a ceremony's signed transcript."""
    with atomic_output(path, mode=mode, exclusive=True) as handle:
        handle.write(data)
