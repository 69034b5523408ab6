"""Where every file a ``keymgr`` command writes goes: one safe path for all of them.

``-o``/``--output``/``--out``/``--transcript`` of any command (encrypt, decrypt, backup,
approve, request, quorum, token keygen, audit report, key ceremonies' transcripts) is
written through :func:`open_output` / :func:`write_output`, so the same promises hold everywhere:

* a **regular file** (new, or replaced when the command may replace it) is written
  atomically (:func:`keymgr.files.atomic_output`): nothing half-written on any failure;
* a **character or block device, FIFO or socket** is written through (opened for writing,
  never truncated, never replaced): ``-o /dev/stdout`` or a tape drive stays what it is, and
  plaintext never lands in a regular file that took a device's place;
* the names of this process's own descriptors (``/dev/stdout``, ``/dev/stderr``, ``/dev/fd/N``,
  ``/proc/self/fd/N``: symbolic links the kernel makes) are the descriptor itself, written as
  ``-`` is (so ``-o /dev/stdout > file`` appends where the shell's redirection points, and
  nothing is opened anew at offset 0 or truncated);
* any other **symbolic link** is refused unless the command has ``--follow-symlinks`` and it was given
  (then its target is written, and the link stays a link);
* ``new=True`` (backups, transcripts: records that must never be lost) refuses any existing
  file, before the command changes anything.

:func:`checked_output` says all that up front, before a token is asked anything: a missing
or unwritable directory is refused there too (exit 2), so a command never makes its change
and then finds it cannot write its result.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from keymgr import errors
from keymgr.files import atomic_output, os_error_reason, remove_abandoned_temp_files

__all__ = ["check_directory", "checked_output", "open_output", "write_output"]


class _DescriptorSink(io.RawIOBase):
    """One of this process's open descriptors (standard output, or one named by path:
    ``-o /dev/stderr``), unbuffered, with write errors as keymgr errors. Unbuffered so that
    nothing is left to flush (and fail again, on a second line) when the process exits; the
    descriptor stays open (the process owns it, keymgr only borrowed it)."""

    def __init__(self, fd: int | None, name: str) -> None:
        super().__init__()
        self._fd, self._name = fd, name

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self._write(memoryview(data).cast("B"))
        except BrokenPipeError:
            raise  # the reader went away: GuardedGroup exits quietly (141), as `cat` would
        except OSError as exc:
            raise errors.StorageError(f"cannot write {self._name}: {os_error_reason(exc)}") from None

    def _write(self, view: memoryview) -> int:
        assert self._fd is not None
        return _write_all(self._fd, view)


class _StdoutSink(_DescriptorSink):
    """Standard output: its descriptor, or (click's test runner) the in-memory stream in its place."""

    def __init__(self) -> None:
        self._stream = sys.stdout.buffer
        try:
            fd: int | None = self._stream.fileno()
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            fd = None  # click's test runner: an in-memory stream
        if fd is not None:
            self._stream.flush()
        super().__init__(fd, "to standard output")

    def _write(self, view: memoryview) -> int:
        if self._fd is not None:
            return _write_all(self._fd, view)
        self._stream.write(view)
        self._stream.flush()
        return len(view)


#: How a path names one of this process's own descriptors: /dev/stdout, /dev/fd/3, /proc/self/fd/3.
_DESCRIPTOR_NAMES = re.compile(r"^/dev/(?:std(?P<std>out|err)|fd/(?P<fd>\d{1,6}))$|^/proc/self/fd/(?P<proc>\d{1,6})$")


def _descriptor_named(path: str) -> int | None:
    """The descriptor ``path`` names, if it names one of this process's (only by those exact names:
    any other link, to a device or not, is a link, refused unless followed)."""
    match = _DESCRIPTOR_NAMES.match(path)
    if match is None:
        return None
    std = match.group("std")
    return {"out": 1, "err": 2}[std] if std else int(match.group("fd") or match.group("proc"))


def _write_all(fd: int, view: memoryview) -> int:
    written = 0
    while written < len(view):
        written += os.write(fd, view[written:])
    return written


class _ThroughSink(io.RawIOBase):
    """A device, FIFO or socket named by ``-o``, written through as standard output is: opened
    for writing without O_TRUNC (a device is not a file to empty) and never replaced, so it is
    still the same node afterwards. Like standard output it cannot be taken back."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._name = str(path)
        try:  # O_NOFOLLOW: a link put there since OUT was checked is not followed
            self._fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise errors.StorageError(f"cannot write {path}: {os_error_reason(exc)}") from None
        if stat.S_ISREG(os.fstat(self._fd).st_mode):  # became a file since it was checked: not written in place
            os.close(self._fd)
            raise errors.ConfigurationError(f"{path} changed while keymgr opened it; run again")

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return _write_all(self._fd, memoryview(data).cast("B"))
        except OSError as exc:  # a FIFO's reader gone (EPIPE) included: OUT was named, so it is an error
            raise errors.StorageError(f"cannot write {self._name}: {os_error_reason(exc)}") from None

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()




@dataclass(frozen=True)
class _Target:
    """Where OUT goes: standard output, a regular file (new, or replaced atomically) or a node
    written through (a device, FIFO or socket). ``path`` is a followed link's target."""

    kind: Literal["stdout", "file", "through", "descriptor"]
    path: Path
    fd: int = -1


def checked_output(path: str, follow_symlinks: bool | None = None, *, new: bool = False) -> _Target:
    """What OUT is, refused early (before the token is asked anything) if it cannot be written:
    a directory, a symbolic link without ``--follow-symlinks``, a file in a directory that is
    missing or not writable, or (``new``) an existing file. ``follow_symlinks`` None: the
    command has no ``--follow-symlinks`` (so a refusal does not suggest it)."""
    if path == "-":
        return _Target("stdout", Path("-"))
    fd = _descriptor_named(path)
    if fd is not None:
        try:
            kind = os.fstat(fd).st_mode
        except OSError:
            raise errors.ConfigurationError(f"cannot write {path}: descriptor {fd} is not open") from None
        if stat.S_ISDIR(kind):
            raise errors.ConfigurationError(f"cannot write {path}: it is a directory")
        return _Target("stdout", Path("-")) if fd == 1 else _Target("descriptor", Path(path), fd)
    target = Path(path)
    try:
        info = os.lstat(target)
        if stat.S_ISLNK(info.st_mode):
            if not follow_symlinks:
                raise errors.ConfigurationError(
                    f"{path} is a symbolic link: keymgr neither replaces nor follows it"
                    + (" unless given --follow-symlinks (then it writes to the link's target)"
                       if follow_symlinks is not None and not new else ""))
            target = Path(os.path.realpath(target))
            info = os.lstat(target)
            if stat.S_ISLNK(info.st_mode):  # realpath gives up on a loop
                raise errors.ConfigurationError(f"cannot write {path}: too many levels of symbolic links")
    except FileNotFoundError:  # a new file (through a dangling link: its target is created)
        check_directory(path, target)
        return _Target("file", target)
    except OSError as exc:
        raise errors.ConfigurationError(f"cannot write {path}: {os_error_reason(exc)}") from None
    if stat.S_ISDIR(info.st_mode):
        raise errors.ConfigurationError(f"cannot write {path}: it is a directory")
    if not stat.S_ISREG(info.st_mode):
        return _Target("through", target)
    if new:
        raise errors.ConfigurationError(f"{path} exists already; keymgr does not overwrite it: give another "
                                        "path (or move that file away)")
    check_directory(path, target)
    return _Target("file", target)


def check_directory(path: str, target: Path | None = None) -> None:
    """A regular file is written beside itself and renamed: its directory must exist and be writable."""
    target = Path(path) if target is None else target
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise errors.ConfigurationError(f"cannot write {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise errors.ConfigurationError(f"cannot write {path}: no permission to create files in {directory}")


@contextlib.contextmanager
def open_output(path: str, *, mode: int, follow_symlinks: bool | None = None, new: bool = False) -> Iterator[BinaryIO]:
    """Standard output, a node written through, or a file written atomically (nothing left
    behind on any failure; what killed writers left in its directory is removed first).
    ``new``: an existing file is refused, also one that appeared since it was checked."""
    target = checked_output(path, follow_symlinks, new=new)  # again: what OUT is now, not at the start
    if target.kind == "stdout":
        yield _StdoutSink()  # type: ignore[misc]
        return
    if target.kind == "descriptor":
        yield _DescriptorSink(target.fd, path)  # type: ignore[misc]
        return
    if target.kind == "through":
        with _ThroughSink(target.path) as sink:
            yield sink  # type: ignore[misc]
        return
    remove_abandoned_temp_files(target.path.parent)
    try:
        with atomic_output(target.path, mode=mode, exclusive=new) as handle:
            yield handle
    except FileExistsError:
        raise errors.ConfigurationError(f"{path} appeared while keymgr wrote it; it was left as it is: "
                                        "give another path") from None


def write_output(path: str | Path, data: bytes, *, mode: int = 0o644, follow_symlinks: bool | None = None,
                 new: bool = False) -> None:
    """Write ``data`` to ``path`` as :func:`open_output` does."""
    with open_output(str(path), mode=mode, follow_symlinks=follow_symlinks, new=new) as handle:
        handle.write(data)
