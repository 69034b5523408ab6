"""Audited operations and who performs them: the context of an audit entry.

:class:`Operation` is the context manager a KeyManager wraps each operation in
(``with log.operation("rotate", key=name) as op:``): it records the outcome when
the block ends, and is visible to code deeper down (:func:`current_operation`)
so that the envelope layer can name the key version a decrypt used.
:func:`acting_as` attributes a block's operations to an application principal.
Both live in :mod:`contextvars`, so they follow threads and asyncio tasks.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Protocol

from keymgr import errors, interrupts

__all__ = ["Operation", "UnauditedOperation", "acting_as", "current_operation", "current_principal"]


#: Operations that change key state or run a ceremony: an ``intent`` entry is written before
#: they act, so that a log that cannot be written stops them with nothing changed.
STATE_CHANGING = frozenset({"create", "rotate", "activate", "suspend", "resume", "compromise", "retire",
                            "destroy", "backup", "restore", "policy", "custodian-add", "custodian-remove"})


class _Recorder(Protocol):
    def ready(self) -> None: ...

    def record(self, op: str, *, key: str | None = ..., version: int | None = ..., outcome: str = ...,
               error: BaseException | None = ..., detail: Mapping[str, Any] | None = ...,
               principal: str | None = ...) -> None: ...


_principal: contextvars.ContextVar[str | None] = contextvars.ContextVar("keymgr_audit_principal", default=None)
_operation: contextvars.ContextVar[Operation | None] = contextvars.ContextVar("keymgr_audit_operation",
                                                                               default=None)


@contextmanager
def acting_as(principal: str | None) -> Iterator[None]:
    """Attribute the operations in this block (this thread / task) to an application principal::

        with keymgr.audit.acting_as("billing-service"):
            km.decrypt(blob)
    """
    if principal is not None and (not isinstance(principal, str) or not 0 < len(principal) <= 128):
        raise errors.ConfigurationError("an audit principal is a string of 1-128 characters")
    token = _principal.set(principal)
    try:
        yield
    finally:
        _principal.reset(token)


def current_principal() -> str | None:
    return _principal.get()


def current_operation() -> Operation | None:
    """The audited operation running in this context (to fill in the key version it found);
    None also under a manager that keeps no audit log and no rate limits."""
    return _operation.get()


class Operation:
    """One audited operation (a context manager from :meth:`AuditLog.operation`). The block may
    set ``key``, ``version`` and ``detail`` once it knows them; the outcome is ``ok``, ``refused``
    (a :class:`~keymgr.errors.PolicyError`) or ``failed`` (anything else), with the error's class."""

    __slots__ = ("_log", "op", "key", "version", "detail", "_reset")

    def __init__(self, log: _Recorder | None, op: str, key: str | None, version: int | None,
                 detail: Mapping[str, Any] | None) -> None:
        self._log = log
        self.op = op
        self.key = key
        self.version = version
        self.detail = detail
        self._reset: contextvars.Token[Operation | None] | None = None

    def __enter__(self) -> Operation:
        if self._log is not None:
            self._log.ready()  # refuses while the log cannot be written (fail closed)
            if self.op in STATE_CHANGING:
                try:
                    with interrupts.deferred_signals():  # an entry is written whole
                        self._log.record(self.op, key=self.key, version=self.version, outcome="intent",
                                         detail=self.detail)
                except KeyboardInterrupt as exc:  # held while it was written: nothing was done
                    self._record_outcome(exc)
                    raise
        self._reset = _operation.set(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._reset is not None:
            _operation.reset(self._reset)
        if self._log is not None:
            self._record_outcome(exc)

    def _record_outcome(self, exc: BaseException | None) -> None:
        if self._log is not None:
            outcome = "ok" if exc is None else "refused" if isinstance(exc, errors.PolicyError) else "failed"
            detail = self.detail
            if outcome == "refused":  # why, for the reviewer: keymgr's messages never hold a secret
                detail = {**(detail or {}), "why": _clip(str(exc))}
            try:
                # a state change's entry is written whole (not on the per-message path: no syscalls there)
                with interrupts.deferred_signals() if self.op in STATE_CHANGING else contextlib.nullcontext():
                    self._log.record(self.op, key=self.key, version=self.version, outcome=outcome, error=exc,
                                     detail=detail)
            except errors.KeymgrError as failure:
                if exc is not None or self.op not in STATE_CHANGING:
                    raise
                what = f"{self.op} of key {self.key!r}" if self.key else self.op
                raise errors.StorageError(
                    f"{what} was done, but its outcome could not be recorded in the audit log ({failure}); "
                    "do not repeat it: check the key (keymgr key show) and the log") from failure


class UnauditedOperation(Operation):
    """An :class:`Operation` of a manager with neither an audit log nor rate limits: nothing
    reads it, so it is not made visible to :func:`current_operation` (the context variable's
    set and reset were a tenth of a cached decrypt) and records nothing when it ends."""

    __slots__ = ()

    def __init__(self, op: str, key: str | None, version: int | None, detail: Mapping[str, Any] | None) -> None:
        self._log = None
        self.op = op
        self.key = key
        self.version = version
        self.detail = detail
        self._reset = None

    def __enter__(self) -> Operation:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None


def _clip(text: str, limit: int = 250) -> str:
    """A refusal's reason as an entry's detail takes it (a detail string is at most 256 characters:
    a longer one would void the whole detail)."""
    return text if len(text) <= limit else text[:limit - 3] + "..."
