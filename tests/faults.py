"""Fault injection at keymgr's one PKCS#11 choke point, on a real token.

Every PKCS#11 call keymgr makes runs inside :meth:`keymgr.hsm.sessions.TokenSession.run`
(``ts.run(operation, call)``: the module lock held, the session open and
logged in). :class:`FaultInjector` wraps that method so that chosen calls
fail *inside* the real call path, after keymgr opened its real session on the
real token, with the exceptions python-pkcs11 itself raises:

=====================  ==============================================================
``removed``            ``pkcs11.exceptions.DeviceRemoved`` (CKR_DEVICE_REMOVED)
``session-closed``     the real session is closed (C_CloseSession, which logs the
                       process out, STACK-FACTS.md 2) and the real call then runs on
                       the dead handle: SoftHSM itself answers CKR_SESSION_HANDLE_INVALID
``handle-invalid``     ``SessionHandleInvalid`` raised without closing anything
``device-error``       ``DeviceError`` (CKR_DEVICE_ERROR)
``host-memory``        ``HostMemory`` (CKR_HOST_MEMORY)
=====================  ==============================================================

A fault names the operations it hits by a substring of the operation name
keymgr gives each call ("generate kek-wrap key", "write data object",
"wrap data key" ...), skips the first ``skip`` matches and fails the next
``times``. ``after=True`` lets the real call finish first and then fails: the
token did the work but the answer was lost (the hardest case for callers that
retry). Nothing here mocks PKCS#11: the token, the session and the objects are real.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pkcs11.exceptions as p11x

from keymgr.hsm.sessions import TokenSession

__all__ = ["FAULTS", "Fault", "FaultInjector", "injected"]

T = TypeVar("T")

#: Fault kinds and the python-pkcs11 exception each raises (``session-closed`` raises none itself).
FAULTS: dict[str, type[p11x.PKCS11Error] | None] = {
    "removed": p11x.DeviceRemoved,
    "session-closed": None,
    "handle-invalid": p11x.SessionHandleInvalid,
    "device-error": p11x.DeviceError,
    "host-memory": p11x.HostMemory,
}


@dataclass
class Fault:
    kind: str
    match: str = ""
    skip: int = 0
    times: int = 1
    after: bool = False
    #: the operations this fault hit, in order
    hits: list[str] = field(default_factory=list)
    _seen: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAULTS:
            raise ValueError(f"unknown fault {self.kind!r} (one of {', '.join(FAULTS)})")

    def wants(self, operation: str) -> bool:
        if self.match not in operation or len(self.hits) >= self.times:
            return False
        self._seen += 1
        return self._seen > self.skip


class FaultInjector:
    """Installs itself over ``TokenSession.run`` for the duration of :func:`injected`."""

    def __init__(self) -> None:
        self.faults: list[Fault] = []
        #: every operation that went through the choke point while installed
        self.operations: list[str] = []

    def add(self, kind: str, match: str = "", *, skip: int = 0, times: int = 1, after: bool = False) -> Fault:
        fault = Fault(kind, match, skip, times, after)
        self.faults.append(fault)
        return fault

    def clear(self) -> None:
        self.faults.clear()

    def _pick(self, operation: str) -> Fault | None:
        for fault in self.faults:
            if fault.wants(operation):
                fault.hits.append(operation)
                return fault
        return None

    def wrap(self, operation: str, call: Callable[[Any], T]) -> Callable[[Any], T]:
        def faulty(session: Any) -> T:
            self.operations.append(operation)
            fault = self._pick(operation)
            if fault is None:
                return call(session)
            if fault.kind == "session-closed":
                session.close()
                return call(session)  # the real call on the dead handle: the token answers
            error = FAULTS[fault.kind]
            assert error is not None
            if fault.after:
                call(session)
            raise error()

        return faulty


@contextmanager
def injected() -> Iterator[FaultInjector]:
    """A :class:`FaultInjector` wrapped around every token call of this process, removed on exit."""
    injector = FaultInjector()
    original = TokenSession.run

    def run(self: TokenSession, operation: str, call: Callable[[Any], T]) -> T:
        return original(self, operation, injector.wrap(operation, call))

    TokenSession.run = run  # type: ignore[method-assign]
    try:
        yield injector
    finally:
        TokenSession.run = original  # type: ignore[method-assign]
