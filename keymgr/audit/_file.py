"""The audit log's file sink: append-only, locked, durable.

Many processes (and threads) may append to one log at once. Each append:

1. takes the process's thread lock, then an exclusive ``flock`` on the file
   (reopening it first after ``fork()``, since a child shares its parent's
   open file description and flock would not separate them, or when the path
   now names another file, e.g. after an operator moved the log aside);
2. re-reads the tail (the last line, every time: an edit that keeps the size must
   not go unseen) to continue the chain where whoever wrote last left it;
3. writes the new line with one ``write`` on an ``O_APPEND`` descriptor, and
   ``fdatasync``s it per the fsync policy, before the lock is released.

A crash in the middle of a ``write`` can leave a torn last line (no newline).
It was never a complete entry, so the next writer cuts it off and says so in
an ``audit-repair`` entry (:class:`keymgr.audit.AuditLog`). A last line that
is complete but not an entry is never "repaired": the writer refuses
(:class:`~keymgr.errors.IntegrityError`) until an operator has run ``keymgr
audit verify`` and moved the log aside, because continuing a chain over a
line it cannot read would bless whatever edit put it there.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from keymgr import errors
from keymgr.audit._entry import GENESIS_PREV, MAX_LINE, Entry, line_digest, parse_line
from keymgr.files import fsync_directory, os_error_reason

__all__ = ["FileSink", "Tail", "FSYNC_POLICIES"]

#: ``entry``: fdatasync before each append returns (no entry lost on a crash, ~1 ms here);
#: ``interval``: at most once per ``fsync_interval`` seconds, and on flush / close;
#: ``none``: leave it to the OS (a crash may lose the last seconds of entries).
FSYNC_POLICIES = ("entry", "interval", "none")


@dataclass
class Tail:
    """Where the chain stands: the last entry's chain id, seq and hash (None / 0 / genesis
    for an empty file), and how many torn bytes the writer cut off before appending."""

    chain: str | None
    seq: int
    digest: str
    repaired: int = 0
    #: the file's size when the tail was read (a write checks it is still that: nobody cut the file meanwhile)
    size: int = 0


class FileSink:
    """One log file, appended to under an exclusive lock (module docstring)."""

    def __init__(self, path: str | os.PathLike[str], *, fsync: str = "entry", fsync_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if fsync not in FSYNC_POLICIES:
            raise errors.ConfigurationError(f"unknown audit fsync policy {fsync!r} (choose from "
                                            f"{', '.join(FSYNC_POLICIES)})")
        self.path = Path(path)
        self._fsync = fsync
        self._interval = fsync_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pid = -1
        self._known: tuple[int, Tail] | None = None  # (file size, tail) after our last write
        self._last_sync = clock()
        self._dirty = False

    def __repr__(self) -> str:
        return f"FileSink({str(self.path)!r}, fsync={self._fsync!r})"

    # -- opening ------------------------------------------------------------------

    def _error(self, exc: OSError) -> errors.StorageError:
        return errors.StorageError(f"cannot append to audit log {self.path}: {os_error_reason(exc)}")

    def _descriptor(self) -> int:
        fd = self._fd
        if fd is not None and self._pid == os.getpid():
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
        self._reset()
        existed = self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        if not existed:
            fsync_directory(self.path.parent)
        self._fd, self._pid = fd, os.getpid()
        return fd

    def _reset(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self._known = None, None

    # -- appending ----------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[Tail]:
        """Hold the log for appending: yields the current :class:`Tail`; call :meth:`write`
        (any number of times) inside the block. The lock is released on exit."""
        with self._lock:
            try:
                fd = self._descriptor()
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                raise self._error(exc) from None
            try:
                yield self._tail(fd)
            finally:
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def entries_after(self, seq: int, tail: Tail) -> list[tuple[int, bool]]:
        """(seq, MACed?) of the entries after ``seq`` (only inside :meth:`locked`)."""
        assert self._fd is not None
        return entries_after(self.path, self._fd, seq, tail)

    def digest_at(self, seq: int, tail: Tail) -> str | None:
        """The hash of entry ``seq`` (only inside :meth:`locked`); None if it is not there."""
        assert self._fd is not None
        return digest_at(self.path, self._fd, seq, tail)

    def write(self, tail: Tail, line: bytes, digest: str, seq: int, chain: str) -> None:
        """Append ``line`` (one entry, no newline) and advance ``tail``; only inside :meth:`locked`.

        The file must still have the size it had when the tail was read: the lock keeps other
        keymgr writers out, not someone cutting the file by hand, and an entry chained to a tail
        that is gone would hide the cut. A write that fails half way (a full disk) is cut back,
        so no partial entry, and no complete entry without its line end, is left behind."""
        fd = self._fd
        assert fd is not None
        data = line + b"\n"
        try:
            if os.fstat(fd).st_size != tail.size:
                self._known = None
                raise errors.IntegrityError(
                    f"audit log {self.path} changed size while keymgr was appending to it (edited or cut by "
                    "something that does not take its lock); nothing was appended: run `keymgr audit verify`")
            written = 0
            try:
                while written < len(data):
                    written += os.write(fd, data[written:])
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, tail.size)
                raise
            self._dirty = True
            if self._fsync == "entry" or (self._fsync == "interval"
                                          and self._clock() - self._last_sync >= self._interval):
                self._sync(fd)
            size = os.fstat(fd).st_size
        except OSError as exc:
            self._known = None
            raise self._error(exc) from None
        tail.chain, tail.seq, tail.digest, tail.repaired, tail.size = chain, seq, digest, 0, size
        self._known = (size, Tail(chain, seq, digest, 0, size))

    def _sync(self, fd: int) -> None:
        getattr(os, "fdatasync", os.fsync)(fd)
        self._last_sync = self._clock()
        self._dirty = False

    def sync(self) -> None:
        """Make every appended line durable now (flush, close, the ``interval`` policy)."""
        with self._lock:
            if self._fd is not None and self._dirty and self._pid == os.getpid():
                try:
                    self._sync(self._fd)
                except OSError as exc:
                    raise self._error(exc) from None

    def after_fork(self) -> None:
        """In a child after ``fork()``: a lock of its own; the descriptor is reopened on next use."""
        self._lock = threading.Lock()
        self._known = None

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self._reset()

    def close(self) -> None:
        if self._fsync != "none":
            self.sync()
        with self._lock:
            self._reset()

    # -- the tail -----------------------------------------------------------------

    def _tail(self, fd: int) -> Tail:
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return Tail(None, 0, GENESIS_PREV)
            span = min(size, 2 * MAX_LINE + 2)
            chunk = os.pread(fd, span, size - span)
            repaired = 0
            if not chunk.endswith(b"\n"):
                cut = chunk.rfind(b"\n")
                if cut < 0 and span < size:
                    raise errors.IntegrityError(f"audit log {self.path} ends in a torn line longer than an "
                                                "entry; run `keymgr audit verify` and move the log aside")
                if _is_entry(chunk[cut + 1:]):
                    # a complete entry that lost only its line end: an edit (a writer's one write
                    # puts both down). It may be checkpointed, so no "repair" may cut it off
                    raise errors.IntegrityError(
                        f"the last entry of audit log {self.path} lost its line end: the file was edited. "
                        f"Nothing was done; restore the log, or acknowledge it with `keymgr audit repair {self.path}`")
                repaired = len(chunk) - (cut + 1)
                os.ftruncate(fd, size - repaired)
                self._sync(fd)
                chunk, size = chunk[:cut + 1], size - repaired
                if size == 0:
                    return Tail(None, 0, GENESIS_PREV, repaired, 0)
        except OSError as exc:
            raise self._error(exc) from None
        last = chunk[:-1].rsplit(b"\n", 1)[-1]
        try:
            entry = parse_line(last)
        except errors.FormatError:
            raise errors.IntegrityError(
                f"the last line of audit log {self.path} is not an audit entry; nothing more is appended "
                "to it: run `keymgr audit verify` and move the log aside") from None
        return Tail(entry.chain, entry.seq, line_digest(last), repaired, size)


def _is_entry(raw: bytes) -> bool:
    try:
        parse_line(raw)
    except errors.FormatError:
        return False
    return True


def _last_entries(path: Path, fd: int, count: int) -> list[tuple[bytes, Entry | None]]:
    """The last ``count`` + 1 lines of the log, oldest first, each with its entry (None if the
    line is not one): what entries_after and digest_at read back near the tail."""
    try:
        size = os.fstat(fd).st_size
        span = min(size, (count + 2) * (MAX_LINE + 1))
        chunk = os.pread(fd, span, size - span)
    except OSError as exc:
        raise errors.StorageError(f"cannot read audit log {path}: {os_error_reason(exc)}") from None
    lines: list[tuple[bytes, Entry | None]] = []
    raws = chunk.split(b"\n")
    for raw in raws[1:] if span < size else raws:  # the first line is cut, unless the chunk is the whole file
        if not raw:
            continue
        try:
            lines.append((raw, parse_line(raw)))
        except errors.FormatError:
            lines.append((raw, None))
    return lines


def entries_after(path: Path, fd: int, seq: int, tail: Tail) -> list[tuple[int, bool]]:
    """(seq, has a MAC) of the entries after ``seq`` near the end of the log (up to 64 of them)."""
    back = min(tail.seq - seq, 64)
    if back <= 0:
        return []
    return [(entry.seq, entry.mac is not None) for _, entry in _last_entries(path, fd, back)
            if entry is not None and entry.seq > seq]


def digest_at(path: Path, fd: int, seq: int, tail: Tail) -> str | None:
    """The hash of the entry numbered ``seq`` near the end of the log (the token's checkpoint
    is at most a few entries behind the tail), or None if it is not among the last lines."""
    back = tail.seq - seq
    if back < 0:
        return None
    for raw, entry in reversed(_last_entries(path, fd, back)):
        if entry is None:
            return None
        if entry.seq == seq:
            return line_digest(raw)
        if entry.seq < seq:
            return None
    return None
