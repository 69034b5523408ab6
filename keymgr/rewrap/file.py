"""Rewrap one file in place, crash-safely, with its journal entries (keymgr.rewrap.bulk runs many).

The file is replaced only through :func:`keymgr.files.atomic_output`
(temporary file ``.NAME.keymgr-rewrap.PID.XXXXXXXX.tmp`` in the same
directory, fsync, rename, directory fsync), with the journal's write-ahead
``begin`` entry made durable between the fsync and the rename
(:mod:`keymgr.rewrap.journal` says why that order). The mode is kept, and the
owner when run as root. Messages are rewritten in memory (size-checked
first); streams are copied segment by segment after their new header and
hashed on the way, never opened. A file that changed between being read and
being replaced (inode, size or mtime) is left alone and reported.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

from keymgr import errors
from keymgr.envelope.inspect import DEFAULT_MAX_MESSAGE_BYTES, SNIFF_BYTES, inspect_envelope, message_length, sniff
from keymgr.envelope.stream import read_stream_header
from keymgr.files import atomic_output, os_error_reason
from keymgr.rewrap.journal import Entry, Journal, file_digest
from keymgr.rewrap.message import Rewrapper, RewrapResult

__all__ = ["TEMP_NAME", "TEMP_TAG", "FileOutcome", "FileRewrapper", "Status"]

Status = Literal["rewrapped", "current", "skipped", "failed"]
TEMP_TAG = "keymgr-rewrap"
#: a temporary file this module made: ``.NAME.keymgr-rewrap.PID.XXXXXXXX.tmp``
TEMP_NAME = re.compile(r"^\..+\." + TEMP_TAG + r"\.(\d+)\.[A-Za-z0-9_]+\.tmp$")
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileOutcome:
    """What happened to one file. ``moves`` reads like ``"orders v1->v3"``."""

    path: str
    status: Status
    kind: str | None = None
    reason: str = ""
    moves: tuple[str, ...] = ()
    #: finished by an earlier, interrupted run (the journal and the file's digest agree)
    resumed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "status": self.status, "kind": self.kind, "reason": self.reason,
                "moves": list(self.moves), "resumed": self.resumed}


def _moves(result: RewrapResult) -> tuple[str, ...]:
    return tuple(f"{m.key} v{m.source}->v{m.target}" + (" (duplicate dropped)" if m.dropped else "")
                 for m in result.moves)


class FileRewrapper:
    """Rewraps one file at a time (thread-safe: the token layer serialises its calls)."""

    def __init__(self, rewrapper: Rewrapper, journal: Journal | None, *, dry_run: bool,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self._rewrapper = rewrapper
        self._journal = journal
        self._dry_run = dry_run
        self._max_message = max_message_bytes

    def ready(self) -> None:
        """The first token call, made by a worker process before it takes files."""
        self._rewrapper.ready()

    def _record(self, entry: Entry, *, sync: bool = False) -> None:
        if self._journal is not None and not self._dry_run:
            self._journal.record(entry, sync=sync)

    def process(self, path: str) -> FileOutcome:
        try:
            return self._process(path)
        except errors.RecipientNotFoundError:  # another token's envelope: nothing of ours to move
            reason = "an envelope, but no recipient is a key of this token"
            self._record(Entry(path, "skipped", reason=reason))
            return FileOutcome(path, "skipped", reason=reason)
        except errors.KeymgrError as exc:
            reason = str(exc)
        except OSError as exc:
            reason = f"cannot read {path}: {os_error_reason(exc)}"
        self._record(Entry(path, "failed", reason=reason))
        return FileOutcome(path, "failed", reason=reason)

    def _process(self, path: str) -> FileOutcome:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return FileOutcome(path, "skipped", reason="not a regular file")
        previous = self._journal.previous.get(path) if self._journal is not None else None
        if previous is not None and previous.state in ("begin", "done") and file_digest(path) == previous.after:
            if previous.state == "begin":  # renamed before the run was killed: finish its record
                self._record(Entry(path, "done", previous.before, previous.after))
            return FileOutcome(path, "rewrapped", resumed=True)
        with open(path, "rb") as handle:
            head = handle.read(SNIFF_BYTES)
            kind = sniff(head)
            if kind is None:
                self._record(Entry(path, "skipped", reason="not a keymgr envelope"))
                return FileOutcome(path, "skipped", reason="not a keymgr envelope")
            if st.st_nlink > 1:
                raise errors.ConfigurationError(f"{path} has {st.st_nlink} hard links; replacing it would "
                                                "split them (rewrap each name's data once, by hand)")
            if kind == "message":
                return self._message(path, st, handle, head)
            return self._stream(path, st, handle)

    def _message(self, path: str, st: os.stat_result, handle: BinaryIO, head: bytes) -> FileOutcome:
        length = message_length(head)
        if length != st.st_size:
            raise errors.FormatError(f"{path}: the message announces {length} bytes but the file holds {st.st_size}")
        if length > self._max_message:
            raise errors.ConfigurationError(f"{path}: a {length}-byte message exceeds the {self._max_message}-byte "
                                            "limit for messages (they are rewritten in memory)")
        data = head + handle.read()
        result = self._rewrapper.message(data) if not self._dry_run else self._dry(data)
        if result.current or self._dry_run:
            return self._unchanged(path, "message", result)
        digests = (_sha256(data), _sha256(result.data))
        self._replace(path, st, lambda out: out.write(result.data), lambda: digests)
        return FileOutcome(path, "rewrapped", "message", moves=_moves(result))

    def _stream(self, path: str, st: os.stat_result, handle: BinaryIO) -> FileOutcome:
        handle.seek(0)
        header = read_stream_header(handle)
        result = self._rewrapper.stream_header(header) if not self._dry_run else self._dry(header.raw)
        if result.current or self._dry_run:
            return self._unchanged(path, "stream", result)
        old, new = hashlib.sha256(header.raw), hashlib.sha256(result.data)

        def write(out: BinaryIO) -> None:
            out.write(result.data)
            while chunk := handle.read(_COPY_CHUNK):
                old.update(chunk)
                new.update(chunk)
                out.write(chunk)

        self._replace(path, st, write, lambda: (old.hexdigest(), new.hexdigest()))
        return FileOutcome(path, "rewrapped", "stream", moves=_moves(result))

    def _dry(self, data: bytes) -> RewrapResult:
        """What a rewrap would do, without a token call: a stale recipient of ours is reported
        (and its version's state checked) but nothing is unwrapped."""
        info = inspect_envelope(data)
        plan = self._rewrapper.plan(info.kek_ids)
        return RewrapResult(info.kind, data, plan, ())

    def _unchanged(self, path: str, kind: str, result: RewrapResult) -> FileOutcome:
        if self._dry_run and not result.current:
            return FileOutcome(path, "rewrapped", kind, reason="dry run: would rewrap", moves=_moves(result))
        self._record(Entry(path, "current"))
        return FileOutcome(path, "current", kind)

    def _replace(self, path: str, st: os.stat_result, write: Callable[[BinaryIO], object],
                 digests: Callable[[], tuple[str, str]]) -> None:
        """Write the new file beside the old one; journal ``begin`` (``digests()``: before and
        after, known once ``write`` is done) when it is durable; rename; journal ``done``."""
        entry: list[Entry] = []

        def commit() -> None:
            now = os.lstat(path)
            if (now.st_ino, now.st_size, now.st_mtime_ns) != (st.st_ino, st.st_size, st.st_mtime_ns):
                raise errors.ConfigurationError(f"{path} changed while it was being rewrapped; run again")
            entry.append(Entry(path, "begin", *digests()))
            self._record(entry[0], sync=True)

        with atomic_output(path, mode=stat.S_IMODE(st.st_mode), tag=f"{TEMP_TAG}.{os.getpid()}",
                           before_replace=commit) as out:
            if os.geteuid() == 0:
                os.fchown(out.fileno(), st.st_uid, st.st_gid)
            write(out)
        self._record(Entry(path, "done", entry[0].before, entry[0].after))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
