"""What a KeyManager needs from the audit package, behind one object.

:class:`AuditGuard` holds the manager's :class:`~keymgr.audit.AuditLog` (or none)
and its anomaly limits, and gives the manager the one helper every operation
uses (:meth:`AuditGuard.operation`, a context manager recording outcome and error
class), the failed-login record, and the hook the envelope layer calls before
each data-key unwrap (:meth:`AuditGuard.on_unwrap`: names the key version the
decrypt used, and enforces the rate limits).
"""

from __future__ import annotations

import os
import pwd
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from keymgr import errors
from keymgr.audit._log import AuditLog
from keymgr.audit._operation import Operation, UnauditedOperation, current_operation, current_principal
from keymgr.audit.limits import RateLimit, RateLimiter
from keymgr.hsm.sessions import TokenSession
from keymgr.keyring.store import KeyRecord, Keyring, KeyVersion
from keymgr.recipients.kek import KekProtector

__all__ = ["AuditGuard"]

_KEKRI_TAG = 0xA2  # [2] IMPLICIT KEKRecipientInfo: the only kind a cached token-KEK data key comes from


def _os_principal() -> str:
    uid = os.geteuid()
    try:
        return f"user:{pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"uid:{uid}"


class AuditGuard:
    """A KeyManager's audit log and anomaly limits (module docstring)."""

    def __init__(self, log: AuditLog | None, rate_limits: Mapping[str, RateLimit] | RateLimit | None, *,
                 owns_log: bool, suspend: Callable[[str, int], object],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log
        self._owns_log = owns_log
        self._limiter = RateLimiter(rate_limits, clock=clock) if rate_limits else None
        self._suspend = suspend
        self._fallback = (log.principal if log is not None else None) or _os_principal()

    def operation(self, op: str, *, key: str | None = None, version: int | None = None,
                  detail: Mapping[str, Any] | None = None) -> Operation:
        """``with guard.operation("create", key=name) as op: ...``: one entry (or one count)
        when the block ends, ``ok`` / ``refused`` (PolicyError) / ``failed`` with the error's
        class. Without a log it only marks the operation, for :meth:`on_unwrap`'s limits;
        without limits either, nothing reads it."""
        if self.log is None and self._limiter is None:
            return UnauditedOperation(op, key, version, detail)
        return Operation(self.log, op, key, version, detail)

    @contextmanager
    def opening(self, label: str | None) -> Iterator[None]:
        """Around opening the token: a failed login (wrong PIN, locked PIN, no token) is recorded
        with ``mac`` null, since the token that would MAC it is the one that refused."""
        try:
            yield
        except errors.KeymgrError as exc:
            if self.log is not None:
                detail = {"token": label} if label and len(label) <= 32 else None
                self.log.record("login", outcome="failed", error=exc, detail=detail)
            raise

    def attach(self, ts: TokenSession) -> None:
        if self.log is not None:
            self.log.attach(ts)

    def adopt(self, log: AuditLog) -> None:
        """Use ``log`` (the token's default, known once the token is open); closed with the guard."""
        self.log, self._owns_log = log, True
        self._fallback = log.principal or self._fallback

    def on_unwrap(self, record: KeyRecord, version: KeyVersion) -> None:
        """Called before each data-key unwrap: attribute the decrypt, then apply the limits."""
        op = current_operation()
        if op is not None:
            op.key, op.version = record.name, version.version
        if self._limiter is None or (op is not None and op.op.startswith("rewrap")):
            return  # a rewrap moves a data key between KEKs and reads no payload: not a bulk read
        principal = current_principal() or self._fallback
        limit = self._limiter.hit(record.name, principal)
        if limit is None:
            return
        suspended = False
        if limit.suspend:
            try:
                self._suspend(record.name, version.version)
                suspended = True
            except errors.KeymgrError:
                pass  # audited by the suspend operation itself; the refusal stands either way
        if op is not None:
            op.detail = {"reason": "rate-limit", "limit": limit.max_ops, "per_seconds": int(limit.per),
                         "suspended": suspended}
        then = f"; version {version.version} is suspended until an operator resumes it" if suspended else ""
        raise errors.PolicyError(f"decryption with key {record.name!r} refused: more than {limit.max_ops} "
                                 f"decryptions by {principal!r} within {limit.per:g} s{then}")

    def on_cached_unwrap(self, der: bytes, protector: KekProtector) -> None:
        """A data key served from the decrypt cache: attributed and limited like an unwrap (the
        manager then checks the version's state, :meth:`KekProtector.check_der`)."""
        if self.log is None and self._limiter is None:
            return
        from keymgr.envelope.recipients import read_kek_recipient

        if not der or der[0] != _KEKRI_TAG:
            return
        try:
            record, version = protector.keyring.find_by_id(read_kek_recipient(der).kek_id)
        except errors.KeyNotFoundError:
            return
        self.on_unwrap(record, version)

    def attribute(self, op: Operation, blob: bytes, keyring: Keyring) -> None:
        """Name the key version of a decrypt that failed before any unwrap (wrong context, bad
        commitment), from the message's recipients. Only on the failure path: it parses the message."""
        if self.log is None or op.key is not None:
            return
        from keymgr.envelope.inspect import inspect_envelope

        try:
            for kek_id in inspect_envelope(bytes(blob)).kek_ids:
                try:
                    record, version = keyring.find_by_id(kek_id)
                except errors.KeyNotFoundError:
                    continue
                op.key, op.version = record.name, version.version
                return
        except (errors.KeymgrError, TypeError, ValueError):
            return  # not even a message: the entry says so with key null

    def close(self) -> None:
        """Flush the log (close it if the manager made it)."""
        if self.log is None:
            return
        if self._owns_log:
            self.log.close()
        else:
            self.log.flush()
