"""The audit log writer: :class:`AuditLog`.

::

    log = AuditLog("/var/log/keymgr/audit.log", token=ts)   # file sink, MACs by ts's audit key
    with log.operation("create", key="orders") as op:       # outcome from how the block ends
        ...
    log.record("login", outcome="failed", error=exc)        # one entry, directly

Every entry is chained to the one before (``prev``), MACed inside the token by
the audit key (:mod:`keymgr.audit._token`), and appended to the sinks: a file
(:mod:`keymgr.audit._file`), a stdlib ``logging`` logger, syslog. The file
sink also keeps the token's checkpoint (the last seq and hash) every
``checkpoint_every`` entries, so a cut-off tail is detected.

Failures are not hidden: an entry whose MAC cannot be made (no token yet, a
failed login, a removed token) is written with ``mac`` null, and a file that
cannot be appended to raises :class:`~keymgr.errors.StorageError` out of the
operation being audited (fail closed: an operation is not done unrecorded).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing.util
import os
import pwd
import secrets
import socket
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from keymgr import errors
from keymgr._time import audit_time
from keymgr.audit._aggregate import Aggregator, Group
from keymgr.audit._entry import (
    GENESIS_PREV,
    OUTCOMES,
    Actor,
    Entry,
    check_detail,
    line_digest,
    valid_error,
    valid_key,
    valid_operation,
)
from keymgr.audit._file import FileSink, Tail
from keymgr.audit._operation import Operation, current_principal
from keymgr.audit._token import AuditKey
from keymgr.hsm.sessions import TokenSession
from keymgr.oplog import audit as oplog

__all__ = ["AuditLog", "DEFAULT_AGGREGATE"]

#: Seconds between two checks of the log's tail against the token when no entry is written.
CHECK_INTERVAL = 1.0
#: Operations aggregated by default: the per-message ones (their successes only).
DEFAULT_AGGREGATE = ("encrypt", "decrypt", "rewrap", "index")

_live: weakref.WeakSet[AuditLog] = weakref.WeakSet()
#: Logs holding aggregated counts not yet written, kept alive until they are (a KeyManager
#: dropped without close() must not take its counts with it).
_pending_logs: set[AuditLog] = set()


def _os_user() -> tuple[str, int]:
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name[:64], uid
    except KeyError:
        return f"uid-{uid}", uid


class AuditLog:
    """A tamper-evident audit log (module docstring; format in :mod:`keymgr.audit._entry`).

    ``path``: the log file (None: no file sink; then ``logger`` or ``syslog`` must be given,
    and there is no checkpoint). ``token``: the token whose audit key MACs the entries and
    which keeps the checkpoint (:meth:`attach` sets it later). ``fsync``: ``"entry"``
    (default), ``"interval"`` or ``"none"`` (:data:`keymgr.audit._file.FSYNC_POLICIES`).
    ``checkpoint_every``: entries between checkpoint updates (1: each entry, ~2 ms on
    SoftHSM; *n*: a cut-off tail of fewer than *n* entries can go unnoticed, docs/audit.md).
    ``aggregate``: operations whose successes are counted per ``aggregate_interval`` seconds
    instead of written one by one (``()`` writes every one). ``principal``: the application
    principal of entries made outside :func:`acting_as`.
    """

    def __init__(self, path: str | os.PathLike[str] | None, *, token: TokenSession | None = None,
                 logger: logging.Logger | str | None = None, syslog: bool = False, fsync: str = "entry",
                 fsync_interval: float = 1.0, checkpoint_every: int = 1,
                 aggregate: Iterable[str] = DEFAULT_AGGREGATE, aggregate_interval: float = 60.0,
                 principal: str | None = None) -> None:
        if path is None and logger is None and not syslog:
            raise errors.ConfigurationError("an audit log needs a sink: a path, a logger or syslog=True")
        if type(checkpoint_every) is not int or checkpoint_every < 1:
            raise errors.ConfigurationError("checkpoint_every must be a positive integer")
        if aggregate_interval <= 0:
            raise errors.ConfigurationError("aggregate_interval must be positive")
        self._file = FileSink(path, fsync=fsync, fsync_interval=fsync_interval) if path is not None else None
        self._logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self._syslog = bool(syslog)
        self._key = AuditKey(token) if token is not None else None
        self._checkpoint_every = checkpoint_every
        self._aggregator = Aggregator((valid_operation(op) for op in aggregate), aggregate_interval)
        self._principal = principal
        user, uid = _os_user()
        self._user, self._uid, self._host = user, uid, (socket.gethostname() or "unknown")[:255]
        self._lock = threading.Lock()
        self._memory = Tail(None, 0, GENESIS_PREV)  # the chain when there is no file
        self._unsaved: tuple[str, int, str] | None = None  # newest entry of ours not yet checkpointed
        self._flusher: threading.Thread | None = None
        self._closed = threading.Event()
        #: (chain, seq, hash) of the newest entry this process wrote and checkpointed
        self._written: tuple[str, int, str] | None = None
        #: why the last write failed, until one succeeds (fail closed: ready())
        self._broken: errors.KeymgrError | None = None
        self._checked_at = -CHECK_INTERVAL  # when ready() last checked the tail against the token
        self._unmaced: list[int] = []  # entries after the checkpoint found without a MAC (next write names them)
        self._real_path = os.path.realpath(path) if path is not None else ""
        if self._syslog:
            import syslog as _sys

            _sys.openlog("keymgr-audit", _sys.LOG_PID, _sys.LOG_AUTHPRIV)
        _live.add(self)

    def __repr__(self) -> str:
        where = str(self._file.path) if self._file else "no file"
        return f"AuditLog({where!r}, token={self._key.token.label if self._key else None!r})"

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> os.PathLike[str] | None:
        return self._file.path if self._file else None

    @property
    def token(self) -> TokenSession | None:
        return self._key.token if self._key else None

    @property
    def principal(self) -> str | None:
        """The application principal of entries made outside :func:`acting_as`."""
        return self._principal

    def attach(self, ts: TokenSession) -> None:
        """Use ``ts``'s audit key from now on (a KeyManager attaches its token once logged in)."""
        if self._key is None:
            self._key = AuditKey(ts)

    # -- recording ----------------------------------------------------------------

    def operation(self, op: str, *, key: str | None = None, version: int | None = None,
                  detail: Mapping[str, Any] | None = None) -> Operation:
        return Operation(self, op, key, version, detail)

    def record(self, op: str, *, key: str | None = None, version: int | None = None, outcome: str = "ok",
               error: BaseException | None = None, detail: Mapping[str, Any] | None = None,
               principal: str | None = None) -> None:
        """Record one operation: aggregated (a configured op that succeeded) or written now."""
        who = principal or current_principal() or self._principal
        if outcome == "ok" and op in self._aggregator.ops and not detail:
            self._aggregator.add(op, valid_key(key), version, who)
            if self not in _pending_logs:
                _pending_logs.add(self)
            if self._flusher is None:
                self._start_flusher()
            elif self._aggregator.due():
                self.flush(sync=False)
            return
        if outcome not in OUTCOMES:
            raise errors.ConfigurationError(f"unknown audit outcome {outcome!r}")
        try:
            checked = check_detail(detail or {})
        except errors.FormatError:
            checked = {"invalid_detail": True}  # an entry is written whatever the caller passed
        if version is not None and (type(version) is not int or version < 1):
            version = None
        self._write([(valid_operation(op), valid_key(key), version, outcome, valid_error(error), checked, who)])

    def _write(self, rows: list[tuple[str, str | None, int | None, str, str | None, dict[str, Any],
                                      str | None]]) -> None:
        if self._file is None:
            with self._lock:
                for row in rows:
                    self._append(self._memory, *row)
            return
        try:
            with self._file.locked() as tail:
                self._agree_with_token(tail)
                if self._unmaced:
                    # entries after the checkpoint without a MAC: say so in a MACed entry, so that chaining
                    # onto them does not make them look authentic (someone may have appended them by hand)
                    seqs = self._unmaced
                    self._unmaced = []
                    self._append(tail, "audit-unauthenticated", None, None, "ok", None,
                                 {"first": seqs[0], "last": seqs[-1], "count": len(seqs)}, None)
                if tail.repaired:
                    self._append(tail, "audit-repair", None, None, "ok", None, {"dropped_bytes": tail.repaired},
                                 None)
                for row in rows:
                    self._append(tail, *row)
        except errors.KeymgrError as exc:
            self._fail_closed(exc)
            raise
        if self._broken is not None:
            oplog.warning("audit log %s: written again; operations resume", self.path or "(no file)")
        self._broken = None

    def _fail_closed(self, exc: errors.KeymgrError) -> None:
        """Remember why a write failed (every operation refuses until one succeeds: :meth:`ready`),
        and tell the operator once, when the log goes from working to refusing."""
        if self._broken is None:
            oplog.warning("audit log %s cannot be written, operations refuse until it can (fail closed): %s",
                          self.path or "(no file)", exc)
        self._broken = exc

    def _agree_with_token(self, tail: Tail) -> None:
        """Append only where the token agrees (docs/audit.md, "What verify proves"): a tail behind
        the token's checkpoint of its chain, or another entry at the checkpoint's seq, means entries
        were cut off or the log was rolled back; an empty log whose path the token knows was
        deleted; a chain the token never recorded belongs to another token. Each refuses with an
        IntegrityError naming what happened, and nothing is appended (``keymgr audit repair``
        is the deliberate, recorded way on)."""
        key, path = self._key, str(self.path)
        if key is None or not key.token.logged_in or self._file is None:
            return
        ours = self._written
        if ours is not None and (tail.chain, tail.seq, tail.digest) == ours:
            return  # the file ends where this process left it, at an entry it checkpointed
        fix = f"restore the log, or acknowledge the loss with `keymgr audit repair {path}`"
        try:
            if tail.chain is None:
                chain = key.registered_chain(self._host, self._real_path)
                point = key.checkpoint(chain) if chain is not None else None
                if point is not None:
                    raise errors.IntegrityError(
                        f"audit log {path} is empty or missing, but token {key.token.label!r} has checkpointed "
                        f"its entries up to {point[0]} (chain {chain}): the log was deleted, emptied or replaced. "
                        f"Nothing was done; {fix}")
                return
            point = key.checkpoint(tail.chain)
            if point is None:
                if tail.chain not in {reg.chain for reg in key.logs()}:
                    if self._adopt_unmaced_start(key, tail):
                        return
                    raise errors.IntegrityError(
                        f"audit log {path} holds chain {tail.chain}, which token {key.token.label!r} never "
                        "recorded: the log belongs to another token. Nothing was done; give each token its own "
                        "log (KEYMGR_AUDIT_LOG, or audit=PATH per KeyManager)")
                return
            seq, digest = point
            if tail.seq < seq:
                raise errors.IntegrityError(
                    f"audit log {path} ends at entry {tail.seq}, but token {key.token.label!r} has checkpointed "
                    f"entry {seq}: entries {tail.seq + 1}..{seq} were cut off, or the log was rolled back to an "
                    f"older copy. Nothing was done; {fix}")
            found = tail.digest if tail.seq == seq else self._file.digest_at(seq, tail)
            if found != digest:
                raise errors.IntegrityError(
                    f"audit log {path}: entry {seq} is not the entry token {key.token.label!r} checkpointed: the "
                    f"log was edited, replaced or rolled back. Nothing was done; {fix}")
            registered = key.registered_chain(self._host, self._real_path)
            if registered is None:
                key.register_log(self._host, self._real_path, tail.chain)  # a log from before registration
            elif registered != tail.chain:
                raise errors.IntegrityError(
                    f"audit log {path} holds chain {tail.chain}, but token {key.token.label!r} recorded chain "
                    f"{registered} for this path: it was replaced by another log (a copy, or a link to one). "
                    f"Nothing was done; {fix}")
            if tail.seq > seq:
                self._unmaced = [n for n, maced in self._file.entries_after(seq, tail) if not maced]
        except errors.IntegrityError:
            raise
        except errors.KeymgrError:
            return  # the token does not answer: the entry is written unMACed, as ever, and verify says so

    def _adopt_unmaced_start(self, key: AuditKey, tail: Tail) -> bool:
        """A log whose every entry lacks a MAC was started while no token was logged in (a first
        command whose login failed: no PIN given yet), so the token cannot have recorded its chain.
        It is registered now, for this path only, and its entries are declared unauthenticated in
        the next MACed entry, as any unMACed tail is; a log holding a single MAC stays refused."""
        if self._file is None or tail.chain is None or tail.seq > 64 \
                or key.registered_chain(self._host, self._real_path) is not None:
            return False
        entries = self._file.entries_after(0, tail)
        if len(entries) != tail.seq or any(maced for _, maced in entries):
            return False
        key.register_log(self._host, self._real_path, tail.chain)
        self._unmaced = [n for n, _ in entries]
        return True

    def ready(self) -> None:
        """Called as each operation starts. Fail closed: after a write of this log failed, every
        operation refuses (StorageError, or the IntegrityError that stopped the write) until a
        write succeeds again; it tries the pending aggregated counts first, so a log that
        recovered lets operations through. And at most every :data:`CHECK_INTERVAL` seconds the
        log's tail is checked against the token (:meth:`_agree_with_token`), so that a cut log
        stops operations whose entries are only counted for now (encrypt, decrypt)."""
        if self._broken is None:
            if self._file is None or time.monotonic() - self._checked_at < CHECK_INTERVAL:
                return
            self._checked_at = time.monotonic()
            try:
                with self._file.locked() as tail:
                    self._agree_with_token(tail)
            except errors.KeymgrError as exc:
                self._fail_closed(exc)
                raise
            return
        try:
            self.flush(sync=False)
            if self._broken is not None:
                self._write([("audit-resumed", None, None, "ok", None, {}, None)])
        except errors.KeymgrError as exc:
            raise _refusal(self, exc) from None

    def _append(self, tail: Tail, op: str, key: str | None, version: int | None, outcome: str, error: str | None,
                detail: dict[str, Any], principal: str | None) -> None:
        actor = Actor(self._user, self._uid, os.getpid(), self._host, principal)
        chain = tail.chain or secrets.token_hex(16)
        if tail.chain is None and self._key is not None and self._key.token.logged_in and self._file is not None:
            self._key.register_log(self._host, self._real_path, chain)  # before its first checkpoint
        entry = Entry(chain=chain, seq=tail.seq + 1, time=audit_time(), actor=actor, op=op, key=key, version=version,
                      outcome=outcome, error=error, prev=tail.digest, detail=detail)
        mac = self._mac(entry)
        line = dataclasses.replace(entry, mac=mac).line()
        digest = line_digest(line)
        if self._file is not None:
            self._file.write(tail, line, digest, entry.seq, chain)
        else:
            tail.chain, tail.seq, tail.digest = chain, entry.seq, digest
        text = line.decode("ascii")
        if self._logger is not None:
            self._logger.info("%s", text)
        if self._syslog:
            import syslog as _sys

            _sys.syslog(_sys.LOG_INFO, text)
        if self._key is not None and self._key.token.logged_in and self._file is not None:
            self._unsaved = (chain, entry.seq, digest)
            if entry.seq % self._checkpoint_every == 0:
                self._save_checkpoint()
        self._written = (chain, entry.seq, digest) if self._unsaved is None else None

    def _mac(self, entry: Entry) -> str | None:
        key = self._key
        if key is None or not key.token.logged_in:
            return None
        try:
            return key.mac(entry.mac_input())
        except errors.KeymgrError:
            return None  # the token is gone or refused: written unMACed, covered by the next MAC

    def _save_checkpoint(self, *, late: bool = False) -> None:
        """Checkpoint our newest entry (inside the file lock); if the token fails, the next entry
        tries again. ``late``: saved after other processes may have appended and checkpointed
        further (a flush): the token's checkpoint is read first, and never moved backwards."""
        if self._unsaved is None or self._key is None:
            return
        chain, seq, digest = self._unsaved
        try:
            if late:
                point = self._key.checkpoint(chain)
                if point is not None and point[0] >= seq:
                    self._unsaved = None
                    return
            self._key.set_checkpoint(chain, seq, digest)
        except errors.KeymgrError:
            return
        self._unsaved = None

    # -- flushing -----------------------------------------------------------------

    def _start_flusher(self) -> None:
        with self._lock:
            if self._flusher is not None:
                return
            ref = weakref.ref(self)
            self._flusher = threading.Thread(target=_flush_loop, args=(ref, self._closed), name="keymgr-audit",
                                             daemon=True)
            self._flusher.start()

    def flush(self, *, sync: bool = True) -> None:
        """Write the aggregated counts now, checkpoint our newest entry, and fsync the file."""
        groups = self._aggregator.drain()
        if groups:
            try:
                self._write([_group_row(g) for g in groups])
            except BaseException:
                self._aggregator.restore(groups)
                raise
        if not self._aggregator.pending:
            _pending_logs.discard(self)
        if self._unsaved is not None and self._file is not None:
            with self._file.locked():
                self._save_checkpoint(late=True)
        if sync and self._file is not None:
            self._file.sync()

    @property
    def pending(self) -> int:
        """Aggregated operations not written yet."""
        return self._aggregator.pending

    def close(self) -> None:
        """Flush (counts, checkpoint, fsync) and release the file. Idempotent."""
        if self._closed.is_set():
            return
        self.flush()
        self._closed.set()
        if self._file is not None:
            self._file.close()
        _live.discard(self)

    def _after_fork(self) -> None:
        """In the child: fresh locks (a parent thread may have held one at the fork), no flusher
        thread, and none of the parent's pending counts (the parent reports them)."""
        self._aggregator.discard(new_lock=True)
        _pending_logs.discard(self)
        self._flusher, self._unsaved = None, None
        self._lock = threading.Lock()
        if self._file is not None:
            self._file.after_fork()


def _refusal(log: AuditLog, exc: errors.KeymgrError) -> errors.KeymgrError:
    if isinstance(exc, errors.IntegrityError):
        return exc
    return errors.StorageError(f"the audit log {log.path} cannot be written ({exc}); keymgr refuses operations "
                               "until it can (fail closed: docs/audit.md)")


def _group_row(g: Group) -> tuple[str, str | None, int | None, str, str | None, dict[str, Any], str | None]:
    detail = {"aggregated": True, "count": g.count, "first": audit_time(g.first), "last": audit_time(g.last)}
    return g.op, g.key, g.version, "ok", None, detail, g.principal


def _flush_loop(ref: weakref.ref[AuditLog], closed: threading.Event) -> None:
    """Write counts once per interval even when no operation comes to trigger it."""
    while True:
        log = ref()
        if log is None:
            return
        interval = log._aggregator.interval
        del log
        if closed.wait(interval):
            return
        log = ref()
        if log is None:
            return
        try:
            if log._aggregator.due():
                log.flush(sync=False)
        except errors.KeymgrError as exc:  # counts stay pending; operations refuse until a write succeeds
            log._fail_closed(exc)
            print(f"keymgr: audit: cannot write aggregated entries ({exc}); operations on this log refuse "
                  "until it can be written", file=sys.stderr)
        del log


def _flush_all_at_exit() -> None:
    for log in list(_live):
        try:
            log.close()
        except errors.KeymgrError as exc:
            print(f"keymgr: audit: {log._aggregator.pending} operations not written at exit: {exc}",
                  file=sys.stderr)


def _forget_in_child() -> None:
    for log in list(_live):
        log._after_fork()


class _ChildExit:
    """multiprocessing's children end with ``os._exit``, which runs no ``atexit`` handler: their
    aggregated counts (up to ``aggregate_interval`` of operations) were lost. Such a child clears
    its finalizer registry after the fork, then runs the callbacks registered here: one adds
    :func:`_flush_all_at_exit` as a finalizer, which the child runs as it ends (normally, or by
    an exception; not when it is killed)."""

    @staticmethod
    def register(_: object) -> None:
        multiprocessing.util.Finalize(None, _flush_all_at_exit, exitpriority=10)


_CHILD_EXIT = _ChildExit()  # kept: multiprocessing holds it weakly
atexit.register(_flush_all_at_exit)
os.register_at_fork(after_in_child=_forget_in_child)
multiprocessing.util.register_after_fork(_CHILD_EXIT, _ChildExit.register)
