"""The bulk-rewrap journal: what a run did to each file, so a killed run resumes where it stopped.

An append-only file of JSON lines. The first line names the format; every
other line is one :class:`Entry`::

    {"keymgr": "rewrap-journal", "version": 1}
    {"path": "/data/a.cms", "state": "begin", "before": "<sha256>", "after": "<sha256>"}
    {"path": "/data/a.cms", "state": "done", "before": "<sha256>", "after": "<sha256>"}
    {"path": "/data/b.kms", "state": "current", "before": null, "after": null}
    {"path": "/data/c.txt", "state": "skipped", "reason": "not a keymgr envelope", ...}

The protocol for a file that changes (keymgr.rewrap.bulk): the new envelope is
written to a temporary file and fsync'ed, then ``begin`` (digests of the old
and the new bytes) is appended and the journal fsync'ed, then the temporary
file is renamed over the old one and the directory fsync'ed, then ``done`` is
appended (made durable by the next fsync, or the one at close). So the
journal never claims less than happened on disk: a file whose last entry is
``begin`` holds either ``before`` (the rename did not happen: redo it) or
``after`` (it did: record ``done``), and on resume a file whose digest equals
its ``done`` entry's ``after`` is finished without a token call. Any other
digest (the file changed since) sends the file through the normal path, which
is safe because rewrap is idempotent. ``current``, ``skipped`` and ``failed``
files are simply looked at again: that costs a header read, not a token call.

Each line is written with one ``write(2)`` on an ``O_APPEND`` descriptor, so
lines from several worker processes never interleave. A line torn by a crash
(power loss: SIGKILL does not tear a single write) can only be the last one;
opening the journal cuts it off. Any other unreadable line is a
:class:`~keymgr.errors.FormatError`: the journal was edited, and resuming
from it would be guesswork. One run at a time: the journal is held under an
exclusive ``flock``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from keymgr import errors
from keymgr.files import fsync_directory, os_error_reason

__all__ = ["HEADER", "Entry", "Journal", "State", "check_journal", "digest_of", "file_digest", "read_entries"]

State = Literal["begin", "done", "current", "skipped", "failed"]
STATES: frozenset[str] = frozenset({"begin", "done", "current", "skipped", "failed"})
HEADER = {"keymgr": "rewrap-journal", "version": 1}
_HEADER_LINE = json.dumps(HEADER, sort_keys=True).encode() + b"\n"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Entry:
    """One journal line. Digests are SHA-256 hex of the whole file; None where not computed."""

    path: str
    state: State
    before: str | None = None
    after: str | None = None
    reason: str | None = None

    def line(self) -> bytes:
        data = {"path": self.path, "state": self.state, "before": self.before, "after": self.after}
        if self.reason is not None:
            data["reason"] = self.reason
        return json.dumps(data, sort_keys=True).encode() + b"\n"


def digest_of(handle: BinaryIO) -> str:
    """SHA-256 hex of what remains in an open binary file."""
    digest = hashlib.sha256()
    while chunk := handle.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex of a file's bytes."""
    with open(path, "rb") as handle:
        return digest_of(handle)


def _entry(raw: bytes, number: int, where: Path) -> Entry:
    try:
        data = json.loads(raw)
        entry = Entry(path=data["path"], state=data["state"], before=data.get("before"), after=data.get("after"),
                      reason=data.get("reason"))
    except (ValueError, KeyError, TypeError):
        raise errors.FormatError(f"rewrap journal {where}: line {number} is not a journal entry") from None
    if not isinstance(entry.path, str) or entry.state not in STATES:
        raise errors.FormatError(f"rewrap journal {where}: line {number} is not a journal entry")
    return entry


def _parse(data: bytes, where: Path) -> tuple[list[Entry], int]:
    """The entries and the length of the whole lines (a torn last line is not counted)."""
    if _HEADER_LINE.startswith(data):  # empty, or a header torn while the journal was made
        return [], 0
    if not data.startswith(_HEADER_LINE):
        raise errors.FormatError(f"{where} is not a keymgr rewrap journal")
    end = data.rfind(b"\n") + 1
    lines = data[len(_HEADER_LINE):end].split(b"\n")[:-1]
    return [_entry(line, n, where) for n, line in enumerate(lines, start=2)], end


def read_entries(path: str | os.PathLike[str]) -> list[Entry]:
    """Every whole entry of a journal (for inspection and tests; no lock taken)."""
    where = Path(path)
    return _parse(where.read_bytes(), where)[0]


class Journal:
    """An open journal: the last entry of each path from earlier runs, and appending new ones."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise errors.ConfigurationError(f"cannot open rewrap journal {self.path}: {os_error_reason(exc)}") from None
        try:
            self._lock_and_load()
        except BaseException:
            os.close(self._fd)
            raise

    def _lock_and_load(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise errors.ConfigurationError(f"rewrap journal {self.path} is in use by another run") from None
        with os.fdopen(os.dup(self._fd), "rb") as handle:
            data = handle.read()
        entries, whole = _parse(data, self.path)
        if whole < len(data):  # a torn last line: cut it off so every line stays whole
            os.ftruncate(self._fd, whole)
        if not data or whole == 0:
            os.ftruncate(self._fd, 0)
            self._write(_HEADER_LINE, sync=True)
            fsync_directory(self.path.parent if str(self.path.parent) else Path("."))
        self.previous: dict[str, Entry] = {}
        for entry in entries:
            self.previous[entry.path] = entry
        self.resumed = bool(entries)

    def _write(self, line: bytes, *, sync: bool) -> None:
        try:
            if os.write(self._fd, line) != len(line):
                raise OSError(28, "short write")
            if sync:
                os.fsync(self._fd)
        except OSError as exc:
            raise errors.StorageError(f"cannot write rewrap journal {self.path}: {os_error_reason(exc)}") from None

    def record(self, entry: Entry, *, sync: bool = False) -> None:
        """Append ``entry``; ``sync`` makes it (and every line before it) durable before returning."""
        self._write(entry.line(), sync=sync)

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _by_path(entries: list[Entry]) -> Iterator[tuple[str, list[Entry]]]:
    by_path: dict[str, list[Entry]] = {}
    for entry in entries:
        by_path.setdefault(entry.path, []).append(entry)
    yield from by_path.items()


def check_journal(path: str | os.PathLike[str], *, finished: bool = True) -> list[str]:
    """Problems found in a journal, read against the files it names (empty: consistent).

    Each ``done`` must repeat the ``begin`` just before it for that path; with
    ``finished`` (after a run that completed) no path may end at ``begin`` or
    ``failed``, and a file whose last entry is ``done`` must still hold ``after``.
    """
    problems: list[str] = []
    for name, entries in _by_path(read_entries(path)):
        pending: Entry | None = None
        for entry in entries:
            if entry.state == "begin":
                if not (entry.before and entry.after):
                    problems.append(f"{name}: begin without digests")
                pending = entry
            elif entry.state == "done":
                if pending is None or (pending.before, pending.after) != (entry.before, entry.after):
                    problems.append(f"{name}: done without its begin")
                pending = None
            else:
                pending = None
        last = entries[-1]
        if finished and last.state in ("begin", "failed"):
            problems.append(f"{name}: ends at {last.state}")
        if finished and last.state == "done" and (not os.path.exists(name) or file_digest(name) != last.after):
            problems.append(f"{name}: does not hold the bytes its done entry names")
    return problems

