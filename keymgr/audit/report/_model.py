"""What the weekly access review found, as plain values that the renderers only print.

Everything a renderer shows is computed here or in :mod:`._build`, so the text, JSON
and HTML forms cannot disagree: they are three views of one :class:`Report`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from keymgr import errors
from keymgr._time import format_utc

__all__ = ["Thresholds", "DayCounts", "Tally", "LogStatus", "Anomaly", "Problem", "Event", "Trip", "Request",
           "Report", "FORMAT", "NO_KEY", "printable"]

FORMAT = "keymgr-access-review/1"
#: The label of entries that name no key (a decrypt of a message that is not one, a failed login).
NO_KEY = "(none)"


def printable(text: str) -> str:
    """``text`` with control, format and other unprintable characters as ``\\uXXXX``. Principal
    names and custodian names come from the log, where a newline or a right-to-left override
    could forge a line of the review or reverse a name on screen."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


@dataclass(frozen=True)
class Thresholds:
    """When the review flags a principal's day. Every default is documented in docs/audit.md,
    "The weekly review"; each flag's reason repeats the numbers it was judged by.

    ``spike_factor`` / ``spike_floor``: a day's decrypts more than ``spike_factor`` times the
    median of the principal's other days in the period (days without decrypts count as 0) *and*
    more than ``spike_floor``. The median, not the mean, so that the spike does not raise its
    own bar; the floor, so that 12 reads after a week of 2 is not an alarm.

    ``night`` / ``night_floor``: more than ``night_floor`` decrypts in the ``night`` window
    (UTC hours ``[start, end)``; ``(22, 5)`` wraps midnight and counts towards the night that
    began on the first date). People read records in the day; a bulk read at 03:00 is a
    script, often a stolen credential's. ``expected_at_night``: principals whose night work
    is known (a nightly export), not flagged by the night rule (the spike rule still applies).
    """

    spike_factor: float = 5.0
    spike_floor: int = 1000
    night: tuple[int, int] = (0, 5)
    night_floor: int = 100
    expected_at_night: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        start, end = self.night
        if not (isinstance(self.spike_factor, (int, float)) and self.spike_factor >= 1):
            raise errors.ConfigurationError("spike_factor must be a number >= 1")
        for name in ("spike_floor", "night_floor"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise errors.ConfigurationError(f"{name} must be an integer >= 0")
        if not (type(start) is int and type(end) is int and 0 <= start <= 23 and 0 <= end <= 24 and start != end):
            raise errors.ConfigurationError("night is (start hour, end hour) in UTC, 0-23 and 1-24, not equal")
        object.__setattr__(self, "expected_at_night", frozenset(self.expected_at_night))

    @staticmethod
    def parse_night(text: str) -> tuple[int, int]:
        """``"0-5"`` or ``"22-5"`` (UTC hours, end exclusive) as a ``night`` window."""
        try:
            start, end = (int(part) for part in text.split("-"))
        except ValueError:
            raise errors.ConfigurationError(f"a night window is START-END in UTC hours, e.g. 0-5 or 22-5: "
                                            f"{text!r}") from None
        return start, end

    def night_label(self) -> str:
        start, end = self.night
        return f"{start:02d}:00-{end:02d}:00 UTC"

    def to_json(self) -> dict[str, Any]:
        return {"spike_factor": self.spike_factor, "spike_floor": self.spike_floor, "night": list(self.night),
                "night_floor": self.night_floor, "expected_at_night": sorted(self.expected_at_night)}


@dataclass
class DayCounts:
    """One day of one principal or key. Successes of aggregated entries count their ``count``."""

    decrypts: int = 0
    encrypts: int = 0
    failures: int = 0
    refused: int = 0

    def to_json(self) -> dict[str, int]:
        return {"decrypts": self.decrypts, "encrypts": self.encrypts, "failures": self.failures,
                "refused": self.refused}


@dataclass
class Tally:
    """Counts by UTC day (``YYYY-MM-DD``) of one principal or key; ``night`` holds the decrypts
    in the night window by the date the night began. ``who``: for a principal, the OS accounts
    (``user@host``) that acted as it; for a key, the principals that used it."""

    days: dict[str, DayCounts] = field(default_factory=dict)
    night: dict[str, int] = field(default_factory=dict)
    who: set[str] = field(default_factory=set)

    def day(self, day: str) -> DayCounts:
        return self.days.setdefault(day, DayCounts())

    def total(self) -> DayCounts:
        out = DayCounts()
        for counts in self.days.values():
            out.decrypts += counts.decrypts
            out.encrypts += counts.encrypts
            out.failures += counts.failures
            out.refused += counts.refused
        return out

    def to_json(self) -> dict[str, Any]:
        return {"days": {d: c.to_json() for d, c in sorted(self.days.items())}, "total": self.total().to_json(),
                "night_decrypts": dict(sorted(self.night.items())), "who": sorted(self.who)}


@dataclass
class LogStatus:
    """How reading one log went. The review reads, it does not verify: ``keymgr audit verify``."""

    path: str
    entries: int = 0
    in_period: int = 0
    bad_lines: int = 0
    first_bad: list[int] = field(default_factory=list)
    duplicates: int = 0
    chains: list[str] = field(default_factory=list)
    error: str | None = None

    def problem(self) -> str | None:
        """One sentence for the reader when this log was not read cleanly, else None."""
        if self.error is not None:
            return f"{self.path}: {self.error}"
        if self.bad_lines:
            return (f"{self.path}: {self.bad_lines} lines are not audit entries (first: line "
                    f"{', '.join(map(str, self.first_bad))}): edited, corrupted or torn; run `keymgr audit verify`")
        return None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "entries": self.entries, "in_period": self.in_period,
                "bad_lines": self.bad_lines, "first_bad": self.first_bad, "duplicates": self.duplicates,
                "chains": self.chains, "error": self.error}


@dataclass(frozen=True)
class Anomaly:
    """A principal's day flagged by a rule (``spike`` or ``night``), with the numbers and why."""

    kind: str
    principal: str
    day: str
    decrypts: int
    baseline: float | None
    reason: str
    keys: tuple[tuple[str, int], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "principal": self.principal, "day": self.day, "decrypts": self.decrypts,
                "baseline": self.baseline, "reason": self.reason, "keys": dict(self.keys)}


@dataclass
class Problem:
    """Refusals or failures of one kind by one principal, grouped: ``count`` entries from ``first`` to ``last``."""

    outcome: str
    principal: str
    op: str
    key: str
    error: str
    reason: str
    count: int = 0
    first: str = ""
    last: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "principal": self.principal, "op": self.op, "key": self.key,
                "error": self.error, "reason": self.reason, "count": self.count, "first": self.first,
                "last": self.last}


@dataclass(frozen=True)
class Event:
    """One lifecycle event or ceremony step, as it happened (never grouped: each one matters)."""

    time: str
    op: str
    principal: str
    key: str
    version: int | None
    outcome: str
    error: str
    summary: str
    participants: tuple[str, ...] = ()
    kind: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "op": self.op, "kind": self.kind or self.op, "principal": self.principal,
                "key": self.key, "version": self.version, "outcome": self.outcome, "error": self.error or None,
                "summary": self.summary, "participants": list(self.participants)}


@dataclass
class Trip:
    """Rate-limit refusals of one principal on one key version (:mod:`keymgr.audit.limits`)."""

    principal: str
    key: str
    version: int | None
    limit: int | None
    per_seconds: int | None
    count: int = 0
    suspended: bool = False
    first: str = ""
    last: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"principal": self.principal, "key": self.key, "version": self.version, "limit": self.limit,
                "per_seconds": self.per_seconds, "refusals": self.count, "suspended": self.suspended,
                "first": self.first, "last": self.last}


@dataclass
class Request:
    """The custodians who approved one quorum request (``keymgr approve`` entries with its digest)."""

    request: str
    operation: str
    key: str
    approvers: list[str] = field(default_factory=list)
    first: str = ""
    last: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"request": self.request, "operation": self.operation, "key": self.key,
                "approvers": self.approvers, "first": self.first, "last": self.last}


@dataclass
class Report:
    """The access review of ``[since, until)`` over one or more logs (docs/audit.md, "The weekly review")."""

    since: datetime | None
    until: datetime
    days: list[str]
    thresholds: Thresholds
    logs: list[LogStatus]
    principals: dict[str, Tally]
    keys: dict[str, Tally]
    anomalies: list[Anomaly]
    problems: list[Problem]
    lifecycle: list[Event]
    ceremonies: list[Event]
    audit_events: list[Event]
    requests: list[Request]
    rate_limits: list[Trip]
    operations: dict[str, dict[str, int]]

    def period(self) -> tuple[str, str]:
        """``since`` and ``until`` as the renderers print them (``since`` None: the logs' first entry)."""
        return _iso(self.since) or "the first entry", _iso(self.until) or ""

    def flagged(self, principal: str, day: str) -> list[Anomaly]:
        return [a for a in self.anomalies if a.principal == principal and a.day == day]

    def log_problems(self) -> list[str]:
        return [p for p in (log.problem() for log in self.logs) if p is not None]

    def to_json(self) -> dict[str, Any]:
        """The whole review as JSON data (``keymgr audit report --format json``)."""
        return {
            "format": FORMAT,
            "since": _iso(self.since), "until": _iso(self.until), "days": self.days,
            "thresholds": self.thresholds.to_json(),
            "logs": [log.to_json() for log in self.logs],
            "anomalies": [a.to_json() for a in self.anomalies],
            "rate_limits": [t.to_json() for t in self.rate_limits],
            "principals": {p: t.to_json() for p, t in sorted(self.principals.items())},
            "keys": {k: t.to_json() for k, t in sorted(self.keys.items())},
            "problems": [p.to_json() for p in self.problems],
            "lifecycle": [e.to_json() for e in self.lifecycle],
            "ceremonies": [e.to_json() for e in self.ceremonies],
            "audit_events": [e.to_json() for e in self.audit_events],
            "requests": [r.to_json() for r in self.requests],
            "operations": {op: dict(sorted(c.items())) for op, c in sorted(self.operations.items())},
        }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else format_utc(moment)
