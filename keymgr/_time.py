"""Time as keymgr writes and reads it: UTC, RFC 3339 with a ``Z``, in two precisions.

* **Stamps** (``2026-12-02T16:41:36Z``, whole seconds): keyring facts, custody
  documents (requests, approvals, the register, backups, transcripts), report
  summaries. :func:`utc_now` and :func:`format_utc` write them.
* **Audit times** (``2026-11-05T12:00:00.123456Z``, microseconds): audit entries,
  whose order within a second matters. :func:`audit_time` writes them and
  :func:`parse_audit_time` reads them.

Three readers, for three kinds of input, each with the error its callers expect:
:func:`parse_stamp` for a signed document's field (exactly the form keymgr writes,
else :class:`~keymgr.errors.FormatError`: a signature covers the text, so there is
one spelling), :func:`parse_utc` for a stamp kept by keymgr itself (any ISO 8601
time, ``ValueError`` otherwise), and :func:`parse_time` for a time a person typed
(a date or a time, :class:`~keymgr.errors.ConfigurationError` naming it).
A time without an offset means UTC everywhere.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from keymgr import errors

__all__ = ["STAMP_FORMAT", "AUDIT_TIME_FORMAT", "utc_now", "format_utc", "audit_time", "parse_stamp", "parse_utc",
           "parse_time", "parse_audit_time"]

STAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
AUDIT_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_STAMP_EXAMPLE = "2026-01-31T12:00:00Z"


def utc_now() -> str:
    """Now, as a stamp (whole seconds)."""
    return format_utc(datetime.now(UTC))


def format_utc(moment: datetime) -> str:
    """``moment`` as a stamp, converted to UTC (by Python's rule, a naive one is local time)."""
    return moment.astimezone(UTC).strftime(STAMP_FORMAT)


def audit_time(seconds: float | None = None) -> str:
    """Now, or ``seconds`` since the epoch, as an audit entry's time (microseconds)."""
    moment = datetime.now(UTC) if seconds is None else datetime.fromtimestamp(seconds, UTC)
    return moment.strftime(AUDIT_TIME_FORMAT)


def parse_stamp(value: Any, what: str) -> datetime:
    """A stamp exactly as keymgr writes it (``2026-11-22T10:00:00Z``); FormatError naming ``what`` otherwise."""
    if not isinstance(value, str) or not value.endswith("Z") or len(value) != len(_STAMP_EXAMPLE):
        raise errors.FormatError(f"{what}: expected a UTC time such as {_STAMP_EXAMPLE}")
    try:
        return datetime.strptime(value, STAMP_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise errors.FormatError(f"{what}: expected a UTC time such as {_STAMP_EXAMPLE}") from None


def parse_utc(text: str) -> datetime:
    """An ISO 8601 date or time (a stamp, a date, one with an offset) as an aware datetime; ValueError otherwise."""
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_time(text: str) -> datetime:
    """A date or time a person gave (``2026-12-02``, ``2026-12-02T17:00Z``); ConfigurationError otherwise."""
    try:
        return parse_utc(text)
    except ValueError:
        raise errors.ConfigurationError(f"not an ISO 8601 date or time: {text!r}") from None


def parse_audit_time(text: str) -> datetime:
    """An audit entry's time (:data:`AUDIT_TIME_FORMAT`); ValueError for anything else."""
    return datetime.strptime(text, AUDIT_TIME_FORMAT).replace(tzinfo=UTC)
