"""One audit entry: its fields, its canonical line, and the strict parser of lines read back.

A line is the canonical JSON (keys sorted, no whitespace, ASCII only) of::

    {"v": 1, "chain": <32 hex>, "seq": <1, 2, ...>, "time": "2026-11-05T12:00:00.123456Z",
     "actor": {"user": "alice", "uid": 1000, "pid": 4242, "host": "app1", "principal": "billing" | null},
     "op": "decrypt", "key": "orders" | null, "version": 3 | null,
     "outcome": "ok" | "refused" | "failed", "error": "IntegrityError" | null,
     "detail": {...small, secret-free...}, "prev": <64 hex>, "mac": <64 hex> | null}

* ``prev`` is SHA-256 of the previous line's bytes (64 zeros for the first entry of a
  chain): the hash chain, which anyone can check with no key (Schneier & Kelsey,
  "Secure audit logs to support computer forensics", 1999, minus their key evolution,
  since our key never leaves the token).
* ``mac`` is HMAC-SHA256 (RFC 2104), computed inside the token by the audit key, over
  ``"keymgr audit entry v1" 0x00 || canonical JSON of every other field``. It is null
  only where the token could not be used (a failed login, a removed token, a token
  without HMAC): the next entry's MAC covers such an entry through ``prev``.
* The line must be exactly canonical: a line re-serialised with other whitespace or key
  order hashes differently, so the verifier treats it as edited.

Nothing secret goes in: no plaintext, no key bytes, no PIN, no context values (only the
context's keys, or a token-keyed digest of it; docs/security.md, "Audit").
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from keymgr import errors
from keymgr._canonical import canonical_json
from keymgr._time import parse_audit_time

__all__ = ["Actor", "Entry", "parse_line", "check_detail", "GENESIS_PREV", "MAC_DOMAIN",
           "OUTCOMES", "MAX_LINE", "line_digest"]

VERSION = 1
GENESIS_PREV = "0" * 64
MAC_DOMAIN = b"keymgr audit entry v1\x00"
#: ``intent``: written before an operation that changes key state acts (fail closed: a log that
#: cannot be written stops it with nothing changed); the outcome entry follows.
OUTCOMES = ("ok", "refused", "failed", "intent")
#: Longest line the parser reads: entries are a few hundred bytes.
MAX_LINE = 16 * 1024

_FIELDS = frozenset({"v", "chain", "seq", "time", "actor", "op", "key", "version", "outcome", "error", "detail",
                     "prev", "mac"})
_ACTOR_FIELDS = frozenset({"user", "uid", "pid", "host", "principal"})
_OP = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ERROR = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_DETAIL_KEY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
_MAX_INT = 2**63 - 1


def line_digest(line: bytes) -> str:
    """The hash the next entry's ``prev`` must carry."""
    return hashlib.sha256(line).hexdigest()


def _bad(what: str) -> errors.FormatError:
    return errors.FormatError(f"not a keymgr audit entry: {what}")


def _text(value: Any, what: str, limit: int, *, pattern: re.Pattern[str] | None = None,
          optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > limit or (pattern is not None and not pattern.match(value)):
        raise _bad(f"bad {what}")
    return value


def _int(value: Any, what: str, low: int = 0, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if type(value) is not int or not low <= value <= _MAX_INT:
        raise _bad(f"bad {what}")
    return value


def _scalar(value: Any) -> bool:
    return value is None or type(value) in (bool, int) or (isinstance(value, str) and len(value) <= 256)


def check_detail(detail: Mapping[str, Any]) -> dict[str, Any]:
    """A detail mapping fit for an entry: at most 16 lower-case keys, each value a short
    string, integer, boolean, null, or a list of up to 32 of those. Raises FormatError."""
    if not isinstance(detail, Mapping) or len(detail) > 16:
        raise _bad("bad detail")
    out: dict[str, Any] = {}
    for name, value in detail.items():
        if not isinstance(name, str) or not _DETAIL_KEY.match(name):
            raise _bad("bad detail key")
        if isinstance(value, (list, tuple)):
            if len(value) > 32 or not all(_scalar(v) and not isinstance(v, list) for v in value):
                raise _bad(f"bad detail {name}")
            value = list(value)
        elif not _scalar(value):
            raise _bad(f"bad detail {name}")
        if type(value) is int and abs(value) > _MAX_INT:
            raise _bad(f"bad detail {name}")
        out[name] = value
    return out


@dataclass(frozen=True)
class Actor:
    """Who acted: the OS account and process, and the application's own principal, if any.

    The OS user comes from the effective uid (not ``$USER``, which the caller sets)."""

    user: str
    uid: int
    pid: int
    host: str
    principal: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"user": self.user, "uid": self.uid, "pid": self.pid, "host": self.host, "principal": self.principal}

    @classmethod
    def from_json(cls, data: Any) -> Actor:
        if not isinstance(data, dict) or set(data) != _ACTOR_FIELDS:
            raise _bad("bad actor")
        return cls(user=_text(data["user"], "actor user", 64) or "", uid=_int(data["uid"], "actor uid") or 0,
                   pid=_int(data["pid"], "actor pid") or 0, host=_text(data["host"], "actor host", 255) or "",
                   principal=_text(data["principal"], "actor principal", 128, optional=True))


@dataclass(frozen=True)
class Entry:
    """One audit entry (module docstring). ``line()`` is what the log file holds."""

    chain: str
    seq: int
    time: str
    actor: Actor
    op: str
    key: str | None
    version: int | None
    outcome: str
    error: str | None
    prev: str
    detail: Mapping[str, Any] = field(default_factory=dict)
    mac: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "detail", MappingProxyType(dict(self.detail)))

    def body(self) -> dict[str, Any]:
        """Every field but the MAC: what the MAC covers."""
        return {"v": VERSION, "chain": self.chain, "seq": self.seq, "time": self.time, "actor": self.actor.to_json(),
                "op": self.op, "key": self.key, "version": self.version, "outcome": self.outcome,
                "error": self.error, "detail": dict(self.detail), "prev": self.prev}

    def mac_input(self) -> bytes:
        return MAC_DOMAIN + canonical_json(self.body())

    def line(self) -> bytes:
        return canonical_json({**self.body(), "mac": self.mac})

    def digest(self) -> str:
        return line_digest(self.line())

    def to_json(self) -> dict[str, Any]:
        return {**self.body(), "mac": self.mac}


def parse_line(raw: bytes) -> Entry:
    """Parse one line of an audit log (without its newline). Untrusted input: anything that is
    not an entry raises :class:`~keymgr.errors.FormatError`, nothing else escapes."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) > MAX_LINE:
        raise _bad("line too long")
    try:
        data = json.loads(bytes(raw).decode("ascii"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad("not JSON") from None
    if not isinstance(data, dict) or set(data) != _FIELDS:
        raise _bad("wrong fields")
    if data["v"] != VERSION or type(data["v"]) is not int:
        raise _bad("unknown version")
    time = _text(data["time"], "time", 27, pattern=_TIME) or ""
    try:
        parse_audit_time(time)
    except ValueError:
        raise _bad("bad time") from None
    outcome = _text(data["outcome"], "outcome", 8) or ""
    if outcome not in OUTCOMES:
        raise _bad("bad outcome")
    return Entry(
        chain=_text(data["chain"], "chain", 32, pattern=_HEX32) or "",
        seq=_int(data["seq"], "seq", 1) or 0,
        time=time,
        actor=Actor.from_json(data["actor"]),
        op=_text(data["op"], "op", 32, pattern=_OP) or "",
        key=_text(data["key"], "key", 64, pattern=_KEY, optional=True),
        version=_int(data["version"], "version", 1, optional=True),
        outcome=outcome,
        error=_text(data["error"], "error", 64, pattern=_ERROR, optional=True),
        prev=_text(data["prev"], "prev", 64, pattern=_HEX64) or "",
        detail=check_detail(data["detail"]),
        mac=_text(data["mac"], "mac", 64, pattern=_HEX64, optional=True),
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def valid_operation(op: str) -> str:
    if not isinstance(op, str) or not _OP.match(op):
        raise errors.ConfigurationError(f"invalid audit operation name {op!r}: use 1-32 of a-z, 0-9, '-'")
    return op


def valid_key(key: Any) -> str | None:
    """A key name for an entry: keymgr's own names pass; anything else is dropped to None
    (an entry must still be written when a caller passed a bad name)."""
    return key if isinstance(key, str) and _KEY.match(key) else None


def valid_error(exc: BaseException | None) -> str | None:
    return type(exc).__name__ if exc is not None else None
