"""Registers: small mutable values kept in the token (one private CKO_DATA object each).

The audit log keeps its checkpoint here (the last sequence number and entry hash of
each log), so that cutting entries off the end of a log file is detected by a value
the file's editor cannot reach without the token's PIN.

Why the value lives in CKA_LABEL: SoftHSM makes the CKA_VALUE of a data object
read-only once created (keymgr.keyring.store works around that with generations), but
CKA_LABEL stays modifiable, and one C_SetAttributeValue rewrites it atomically as
the token sees it. Measured on SoftHSM 2.6.1 (2 vCPU): updating a register costs
~2 ms, creating a token data object ~12 ms plus ~2 ms to destroy the old one; an
HMAC ~0.07 ms. The register's name is its CKA_APPLICATION, fixed at creation.
"""

from __future__ import annotations

from typing import Any

import pkcs11
import pkcs11.exceptions as p11x
from pkcs11 import Attribute, ObjectClass

from keymgr import errors
from keymgr.hsm.finding import find_objects
from keymgr.hsm.sessions import TokenSession

__all__ = ["read_register", "read_register_cached", "write_register", "list_registers"]

#: Longest value a register holds (a label is no place for bulk data).
MAX_VALUE = 1024


def _find(session: pkcs11.Session, name: str) -> list[Any]:
    return find_objects(session, {Attribute.CLASS: ObjectClass.DATA, Attribute.APPLICATION: name})


def read_register(ts: TokenSession, name: str) -> str | None:
    """The value of register ``name``, or None if the token has none."""

    def call(session: pkcs11.Session) -> str | None:
        found = _find(session, name)
        return str(found[0][Attribute.LABEL]) if found else None

    return ts.run(f"read register {name!r}", call)


def read_register_cached(ts: TokenSession, name: str) -> str | None:
    """:func:`read_register` through the handle this session found before: one attribute read
    (~0.2 ms on SoftHSM, which re-reads the object when another process changed it) instead of a
    find that scans every object of the token. For values polled often."""

    def call(session: pkcs11.Session) -> str | None:
        cached = ts.cache.get(("register", name))
        if cached is not None:
            try:
                return str(cached[Attribute.LABEL])  # type: ignore[index]
            except (p11x.ObjectHandleInvalid, p11x.KeyHandleInvalid):
                ts.cache.pop(("register", name), None)
        found = _find(session, name)
        if not found:
            return None
        ts.cache[("register", name)] = found[0]
        return str(found[0][Attribute.LABEL])

    return ts.run(f"read register {name!r}", call)


def write_register(ts: TokenSession, name: str, value: str) -> None:
    """Set register ``name`` to ``value`` (creating it as a private token object on first use)."""
    if len(value) > MAX_VALUE:
        raise errors.ConfigurationError(f"register {name!r}: value longer than {MAX_VALUE} characters")

    def call(session: pkcs11.Session) -> None:
        cached = ts.cache.get(("register", name))
        if cached is not None:
            try:
                cached[Attribute.LABEL] = value  # type: ignore[index]
                return
            except (p11x.ObjectHandleInvalid, p11x.KeyHandleInvalid):
                ts.cache.pop(("register", name), None)
        found = _find(session, name)
        if found:
            obj = found[0]
            obj[Attribute.LABEL] = value
        else:
            obj = session.create_object({Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: True,
                                         Attribute.PRIVATE: True, Attribute.MODIFIABLE: True,
                                         Attribute.APPLICATION: name, Attribute.LABEL: value,
                                         Attribute.VALUE: b"\x00"})  # tpm2-pkcs11 refuses an empty value
        ts.cache[("register", name)] = obj

    ts.run(f"write register {name!r}", call)


def list_registers(ts: TokenSession, prefix: str) -> dict[str, str]:
    """Every register whose name starts with ``prefix``: name -> value."""

    def call(session: pkcs11.Session) -> dict[str, str]:
        out: dict[str, str] = {}
        for obj in find_objects(session, {Attribute.CLASS: ObjectClass.DATA}):
            try:
                application = str(obj[Attribute.APPLICATION])
                if application.startswith(prefix):
                    out[application] = str(obj[Attribute.LABEL])
            except (p11x.AttributeTypeInvalid, KeyError, p11x.ObjectHandleInvalid):
                continue  # not a register, or destroyed by another host since the find
        return out

    return ts.run("list registers", call)

