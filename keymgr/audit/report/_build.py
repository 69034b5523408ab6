"""Building the weekly access review from audit logs: :func:`build_report`.

One pass over each log with the ordinary reader (:func:`keymgr.audit.read_entries`),
so a line that is not an entry is counted and skipped, never fatal: a review that
crashed on the one edited line would hide everything else. Reading is not verifying;
the report says so and names the logs that did not read cleanly.

Operations that change key state write an ``intent`` entry before they act and their
outcome after; the review lists each such operation once, by its outcome, and an intent
that no outcome follows as what it is: an operation interrupted (or still running when
the period ended).

An aggregated entry (``detail.aggregated``) stands for ``count`` successes between
``first`` and ``last`` (at most the writer's ``aggregate_interval`` apart, 60 s by
default): it counts ``count`` times, at the moment of ``first``, when the reads began.
"""

from __future__ import annotations

import os
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any

from keymgr import errors
from keymgr._time import format_utc, parse_audit_time, parse_time
from keymgr.audit._entry import Actor, Entry
from keymgr.audit._operation import STATE_CHANGING
from keymgr.audit.report._model import (
    NO_KEY,
    Anomaly,
    Event,
    LogStatus,
    Problem,
    Report,
    Request,
    Tally,
    Thresholds,
    Trip,
)
from keymgr.audit.verify import log_files, read_entries

__all__ = ["build_report", "parse_since", "principal_of", "DECRYPT_OPS", "ENCRYPT_OPS", "LIFECYCLE_OPS",
           "CEREMONY_OPS", "AUDIT_OPS"]

DECRYPT_OPS = frozenset({"decrypt", "decrypt-stream"})
ENCRYPT_OPS = frozenset({"encrypt", "encrypt-stream"})
LIFECYCLE_OPS = frozenset({"create", "rotate", "activate", "suspend", "resume", "compromise", "retire", "destroy",
                           "verify"})
#: Ceremonies: M-of-N steps. A quorum-policy change shows as the approvals of its ``set-policy``
#: request, and as a ``policy`` entry where the change itself is recorded.
CEREMONY_OPS = frozenset({"backup", "restore", "approve", "policy"})
#: Events of the log itself: auditing turned off somewhere, a log started again after a loss.
AUDIT_OPS = frozenset({"audit-off", "audit-repair"})
_UNFINISHED = ("no outcome entry follows in the period: the operation was interrupted (crash, kill, lost "
               "token) or was still running when the period ended")
_SHOWN = 5
_SINCE = re.compile(r"^\s*(\d{1,6})\s*([mhdw])\s*$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime) -> datetime | None:
    """``7d``, ``24h``, ``90m``, ``2w`` back from ``now``; an ISO 8601 time (naive means UTC);
    or ``all`` (None: from the first entry)."""
    if text.strip().lower() == "all":
        return None
    match = _SINCE.match(text)
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    return parse_time(text)


def principal_of(actor: Actor) -> str:
    """Who the review counts: the application principal, else the OS account as ``user@host``."""
    return actor.principal or f"{actor.user}@{actor.host}"


def _moment(text: object) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return parse_audit_time(text)
    except ValueError:
        return None


def _summary(detail: Mapping[str, Any]) -> str:
    """The detail's facts as ``name=value`` (lists joined by ``/``) for a table cell."""
    parts = []
    for name, value in sorted(detail.items()):
        shown = "/".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(f"{name}={shown}")
    return ", ".join(parts)


class _Builder:
    """The state of one review: counters filled entry by entry, then :meth:`report`."""

    def __init__(self, since: datetime | None, until: datetime, thresholds: Thresholds) -> None:
        self.since, self.until, self.thresholds = since, until, thresholds
        self.logs: list[LogStatus] = []
        self.principals: dict[str, Tally] = {}
        self.keys: dict[str, Tally] = {}
        self.reads: dict[tuple[str, str], Counter[str]] = {}
        self.night_reads: dict[tuple[str, str], Counter[str]] = {}
        self.problems: dict[tuple[str, ...], Problem] = {}
        self.trips: dict[tuple[str, str, int | None], Trip] = {}
        self.requests: dict[str, Request] = {}
        self.lifecycle: list[tuple[datetime, Event]] = []
        self.ceremonies: list[tuple[datetime, Event]] = []
        self.audit_events: list[tuple[datetime, Event]] = []
        self.intents: dict[tuple[str, str, int, str], list[tuple[datetime, Entry]]] = {}
        self.operations: dict[str, Counter[str]] = {}
        self.seen: set[tuple[str, int]] = set()
        self.first_day: date | None = None

    def read(self, path: str | os.PathLike[str]) -> None:
        status = LogStatus(path=str(path))
        self.logs.append(status)
        bad: list[int] = []
        chains: dict[str, None] = {}
        try:
            for _number, entry in read_entries(path, bad):
                status.entries += 1
                chains.setdefault(entry.chain)
                if (entry.chain, entry.seq) in self.seen:
                    status.duplicates += 1  # the same entry in two logs given (a copy): counted once
                    continue
                self.seen.add((entry.chain, entry.seq))
                if self.add(entry):
                    status.in_period += 1
        except errors.ConfigurationError as exc:
            status.error = str(exc)
        except OSError as exc:
            status.error = f"reading stopped: {exc.strerror or type(exc).__name__}"
        status.bad_lines, status.first_bad, status.chains = len(bad), bad[:_SHOWN], list(chains)

    def add(self, entry: Entry) -> bool:
        """Count one entry; False when it falls outside the period."""
        detail = entry.detail
        aggregated = detail.get("aggregated") is True and type(detail.get("count")) is int
        moment = (_moment(detail.get("first")) if aggregated else None) or _moment(entry.time)
        if moment is None or (self.since is not None and moment < self.since) or moment >= self.until:
            return False
        count = max(int(detail["count"]), 0) if aggregated else 1
        principal, key, day = principal_of(entry.actor), entry.key or NO_KEY, moment.strftime("%Y-%m-%d")
        self.first_day = min(self.first_day or moment.date(), moment.date())
        self.operations.setdefault(entry.op, Counter())[entry.outcome] += count
        who = self.principals.setdefault(principal, Tally())
        who.who.add(f"{entry.actor.user}@{entry.actor.host}")
        which = self.keys.setdefault(key, Tally())
        which.who.add(principal)
        if entry.outcome == "ok" and entry.op in DECRYPT_OPS:
            who.day(day).decrypts += count
            which.day(day).decrypts += count
            self.reads.setdefault((principal, day), Counter())[key] += count
            night = self._night_of(moment)
            if night is not None:
                who.night[night] = who.night.get(night, 0) + count
                which.night[night] = which.night.get(night, 0) + count
                self.night_reads.setdefault((principal, night), Counter())[key] += count
        elif entry.outcome == "ok" and entry.op in ENCRYPT_OPS:
            who.day(day).encrypts += count
            which.day(day).encrypts += count
        elif entry.outcome == "failed":
            who.day(day).failures += count
            which.day(day).failures += count
            self._problem(entry, principal, key, moment)
        elif entry.outcome == "refused":
            who.day(day).refused += count
            which.day(day).refused += count
            if detail.get("reason") == "rate-limit":
                self._trip(entry, principal, key, moment)
            else:
                self._problem(entry, principal, key, moment)
        if entry.outcome == "intent":
            self.intents.setdefault(_doing(entry), []).append((moment, entry))
        elif entry.op in LIFECYCLE_OPS or entry.op in CEREMONY_OPS or entry.op in AUDIT_OPS:
            if entry.op in STATE_CHANGING and self.intents.get(_doing(entry)):
                self.intents[_doing(entry)].pop(0)
            self._event(entry, principal, moment)
        return True

    def _night_of(self, moment: datetime) -> str | None:
        """The date the night window containing ``moment`` began, or None outside it."""
        start, end = self.thresholds.night
        hour = moment.hour
        if start < end:
            return moment.strftime("%Y-%m-%d") if start <= hour < end else None
        if hour >= start:
            return moment.strftime("%Y-%m-%d")
        return (moment - timedelta(days=1)).strftime("%Y-%m-%d") if hour < end else None

    def _problem(self, entry: Entry, principal: str, key: str, moment: datetime) -> None:
        reason = entry.detail.get("reason")
        group = (entry.outcome, principal, entry.op, key, entry.error or "", reason if isinstance(reason, str) else "")
        problem = self.problems.get(group)
        if problem is None:
            problem = self.problems[group] = Problem(*group, first=format_utc(moment))
        problem.count += 1
        problem.first, problem.last = min(problem.first, format_utc(moment)), max(problem.last, format_utc(moment))

    def _trip(self, entry: Entry, principal: str, key: str, moment: datetime) -> None:
        detail = entry.detail
        trip = self.trips.get((principal, key, entry.version))
        if trip is None:
            limit, per = detail.get("limit"), detail.get("per_seconds")
            trip = self.trips[(principal, key, entry.version)] = Trip(
                principal, key, entry.version, limit if type(limit) is int else None,
                per if type(per) is int else None, first=format_utc(moment))
        trip.count += 1
        trip.suspended = trip.suspended or detail.get("suspended") is True
        trip.first, trip.last = min(trip.first, format_utc(moment)), max(trip.last, format_utc(moment))

    def _event(self, entry: Entry, principal: str, moment: datetime) -> None:
        detail = entry.detail
        participants: tuple[str, ...] = ()
        kind = entry.op
        if entry.op == "approve":
            custodian, operation, request = detail.get("custodian"), detail.get("operation"), detail.get("request")
            participants = (custodian,) if isinstance(custodian, str) else ()
            kind = "policy-change approval" if operation == "set-policy" else "approval"
            if entry.outcome == "ok" and isinstance(request, str):
                self._approval(request, str(operation), entry.key or NO_KEY, participants, moment)
        elif entry.op == "destroy" and isinstance(detail.get("approvers"), list):
            participants = tuple(str(a) for a in detail["approvers"])
        elif entry.op == "policy":
            kind = "policy change"
        summary = _UNFINISHED if entry.outcome == "intent" else _summary(detail)
        event = Event(format_utc(moment), entry.op, principal, entry.key or NO_KEY, entry.version, entry.outcome,
                      entry.error or "", summary, participants, kind)
        where = self.ceremonies if entry.op in CEREMONY_OPS else self.lifecycle
        (self.audit_events if entry.op in AUDIT_OPS else where).append((moment, event))

    def _approval(self, digest: str, operation: str, key: str, who: tuple[str, ...], moment: datetime) -> None:
        request = self.requests.get(digest)
        if request is None:
            request = self.requests[digest] = Request(digest, operation, key, first=format_utc(moment))
        request.approvers.extend(a for a in who if a not in request.approvers)
        request.first, request.last = min(request.first, format_utc(moment)), max(request.last, format_utc(moment))

    def days(self) -> list[str]:
        first = self.since.date() if self.since is not None else (self.first_day or self.until.date())
        last = (self.until - timedelta(microseconds=1)).date()
        return [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]

    def anomalies(self, days: list[str]) -> list[Anomaly]:
        """The two rules of :class:`Thresholds`, each flag with the numbers it was judged by."""
        t = self.thresholds
        found: list[Anomaly] = []
        for principal, tally in self.principals.items():
            counts = [tally.days[d].decrypts if d in tally.days else 0 for d in days]
            for i, (day, n) in enumerate(zip(days, counts, strict=True)):
                others = counts[:i] + counts[i + 1:]
                median = float(statistics.median(others)) if others else 0.0
                if n > t.spike_floor and n > t.spike_factor * median:
                    times = f"{n / median:.1f}x its median of {median:g}" if median else "its median is 0"
                    reason = (f"{n} decrypts on {day}: {times} a day over the {len(others)} other days "
                              f"(flagged above {t.spike_factor:g}x the median and above {t.spike_floor})")
                    found.append(Anomaly("spike", principal, day, n, median, reason,
                                         _top(self.reads.get((principal, day)))))
            if principal in t.expected_at_night:
                continue
            for night, n in tally.night.items():
                if n > t.night_floor:
                    reason = (f"{n} decrypts between {t.night[0]:02d}:00 and {t.night[1]:02d}:00 UTC in the "
                              f"night of {night} (flagged above {t.night_floor} a night)")
                    found.append(Anomaly("night", principal, night, n, None, reason,
                                         _top(self.night_reads.get((principal, night)))))
        return sorted(found, key=lambda a: (a.day, a.principal, a.kind))

    def report(self) -> Report:
        days = self.days()
        unfinished, self.intents = self.intents, {}
        for pending in unfinished.values():
            for moment, entry in pending:
                self._event(entry, principal_of(entry.actor), moment)
        return Report(
            since=self.since, until=self.until, days=days, thresholds=self.thresholds, logs=self.logs,
            principals=self.principals, keys=self.keys, anomalies=self.anomalies(days),
            problems=sorted(self.problems.values(), key=lambda p: (p.outcome, -p.count, p.principal, p.op, p.key)),
            lifecycle=[e for _, e in sorted(self.lifecycle, key=lambda m: m[0])],
            ceremonies=[e for _, e in sorted(self.ceremonies, key=lambda m: m[0])],
            audit_events=[e for _, e in sorted(self.audit_events, key=lambda m: m[0])],
            requests=sorted(self.requests.values(), key=lambda r: r.first),
            rate_limits=sorted(self.trips.values(), key=lambda t: t.first),
            operations={op: dict(c) for op, c in self.operations.items()})


def _doing(entry: Entry) -> tuple[str, str, int, str]:
    """What pairs an intent with its outcome: the same op by the same process in the same log (not
    the key: a restore learns its key as it runs). First in, first out."""
    return entry.chain, entry.actor.host, entry.actor.pid, entry.op


def _top(reads: Counter[str] | None) -> tuple[tuple[str, int], ...]:
    return tuple(reads.most_common(_SHOWN)) if reads else ()


def build_report(paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str], *, since: datetime | None,
                 now: datetime | None = None, thresholds: Thresholds | None = None) -> Report:
    """The access review of ``[since, now)`` over the logs at ``paths`` (files, or directories of
    ``*.log*`` files as ``keymgr audit verify`` takes them; docs/audit.md, "The weekly review").
    ``since`` None: from the logs' first entry; ``now`` (default: the clock) ends the period, so a
    review can be rebuilt for a past week. A log that cannot be read, or has lines that are not
    entries, is reported in ``Report.logs``, not raised."""
    until = now if now is not None else datetime.now(UTC)
    if until.tzinfo is None or (since is not None and since.tzinfo is None):
        raise errors.ConfigurationError("the review's times must carry a timezone (UTC)")
    if since is not None and since >= until:
        raise errors.ConfigurationError(f"the review starts ({since:%Y-%m-%dT%H:%M:%SZ}) after it ends "
                                        f"({until:%Y-%m-%dT%H:%M:%SZ})")
    since = since.astimezone(UTC) if since is not None else None
    builder = _Builder(since, until.astimezone(UTC), thresholds or Thresholds())
    for path in log_files([paths] if isinstance(paths, (str, os.PathLike)) else paths):
        builder.read(path)
    return builder.report()
