"""A synthetic week of audit logs for tests/audit/test_audit_report.py, written as genuine logs.

:class:`~keymgr.audit.Entry` lines with explicit times, chained exactly as
:class:`~keymgr.audit.AuditLog` chains them (AuditLog stamps the wall clock and has no hook
to set it), so the files pass ``verify_log`` and are read by the same reader as a real log.
The generator tallies what it writes (:class:`Week`): the expected counts do not come from
the code under test.

The week: ``billing``, ``reports`` (resting at the weekend) and ``alice@ws1`` read in the
day; ``etl`` reads in the day too, and on day 6 (``BULK_DAY``) reads ~7,500 records between
01:00 and 03:30; alice reads 900 on day 4 (under the spike floor), billing 10 every night
(under the night floor); plus refusals, failures, a rate-limit trip and its suspension,
lifecycle events (one interrupted), a backup ceremony, a policy-change approval, an
``audit-off``; and a principal and a custodian named with markup and a newline.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from keymgr.audit._entry import GENESIS_PREV, Actor, Entry, line_digest

START = datetime(2026, 11, 30, tzinfo=UTC)  # a Monday; the review is [START, NOW)
NOW = START + timedelta(days=7)
DAYS = [(START + timedelta(days=i)).strftime("%Y-%m-%d") for i in range(7)]
BULK_DAY = DAYS[5]  # day 6 of the week

BILLING = Actor("svc-billing", 1001, 2100, "app1", "billing")
REPORTS = Actor("svc-reports", 1002, 2200, "app2", "reports")
ALICE = Actor("alice", 1000, 3100, "ws1", None)  # no application principal: alice@ws1
ETL = Actor("svc-etl", 1003, 2300, "batch1", "etl")
EVIL_NAME = '<img src=x onerror=alert(1)>"\n! spike  root'  # markup, a quote, and a forged text line
MALLORY = Actor("mallory", 1004, 2400, "ws2", EVIL_NAME)
EVIL_CUSTODIAN = "<script>alert('c')</script>"


def label(actor: Actor) -> str:
    return actor.principal or f"{actor.user}@{actor.host}"


@dataclass
class Week:
    """The logs of the synthetic week and what the generator knows it wrote."""

    paths: list[Path]
    decrypts: Counter[tuple[str, str]] = field(default_factory=Counter)  # (principal, day)
    encrypts: Counter[tuple[str, str]] = field(default_factory=Counter)
    failures: Counter[tuple[str, str]] = field(default_factory=Counter)
    key_decrypts: Counter[tuple[str, str]] = field(default_factory=Counter)  # (key, day)
    night: Counter[tuple[str, str]] = field(default_factory=Counter)  # decrypts 00:00-05:00
    entries: int = 0


class _Log:
    """Genuine log lines with chosen times: events are collected, sorted by time, then chained."""

    def __init__(self, path: Path, chain: str) -> None:
        self.path, self.chain = path, chain
        self.events: list[tuple[datetime, int, dict[str, Any]]] = []

    def add(self, when: datetime, actor: Actor, op: str, key: str | None = None, *, version: int | None = 1,
            outcome: str = "ok", error: str | None = None, detail: dict[str, Any] | None = None) -> None:
        self.events.append((when, len(self.events), {"actor": actor, "op": op, "key": key, "version": version,
                                                      "outcome": outcome, "error": error, "detail": detail or {}}))

    def write(self) -> int:
        prev, lines = GENESIS_PREV, []
        for seq, (when, _, fields) in enumerate(sorted(self.events, key=lambda e: (e[0], e[1])), start=1):
            entry = Entry(chain=self.chain, seq=seq, time=when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), prev=prev,
                          **fields)
            line = entry.line()
            lines.append(line)
            prev = line_digest(line)
        self.path.write_bytes(b"".join(line + b"\n" for line in lines))
        return len(lines)


def _aggregate(log: _Log, week: Week, when: datetime, actor: Actor, op: str, key: str, count: int,
               *, after: datetime | None = None) -> None:
    """An aggregated entry, as AuditLog writes one: the counts of ``first``..``last``, written a bit later."""
    last = when + timedelta(seconds=50)
    log.add(after or last + timedelta(seconds=5), actor, op, key, detail={
        "aggregated": True, "count": count, "first": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "last": last.strftime("%Y-%m-%dT%H:%M:%S.%fZ")})
    day = when.strftime("%Y-%m-%d")
    if not START <= when < NOW:
        return
    if op == "decrypt":
        week.decrypts[(label(actor), day)] += count
        week.key_decrypts[(key, day)] += count
        if when.hour < 5:
            week.night[(label(actor), day)] += count
    else:
        week.encrypts[(label(actor), day)] += count


def _single(log: _Log, week: Week, when: datetime, actor: Actor, key: str, outcome: str = "ok",
            error: str | None = None) -> None:
    """One decrypt written on its own (a log with ``aggregate=()``), or a failure (never aggregated)."""
    log.add(when, actor, "decrypt", key, outcome=outcome, error=error)
    day = when.strftime("%Y-%m-%d")
    if not START <= when < NOW:
        return
    if outcome == "ok":
        week.decrypts[(label(actor), day)] += 1
        week.key_decrypts[(key, day)] += 1
    elif outcome == "failed":
        week.failures[(label(actor), day)] += 1


def make_week(directory: Path) -> Week:
    rng = random.Random(20261130)
    app = _Log(directory / "app.log", "a" * 32)  # app1, app2, ws1, ws2 write here
    batch = _Log(directory / "batch1.log", "b" * 32)  # the batch host keeps its own log
    week = Week([app.path, batch.path])
    for d in range(-1, 8):  # a day before and a day after the period: must not be counted
        day = START + timedelta(days=d)
        for minute in range(8 * 60, 18 * 60, 15):
            _aggregate(app, week, day + timedelta(minutes=minute), BILLING, "decrypt",
                       rng.choice(["orders", "invoices"]), rng.randint(20, 40))
            _aggregate(app, week, day + timedelta(minutes=minute + 5), BILLING, "encrypt", "orders",
                       rng.randint(5, 15))
        _aggregate(app, week, day + timedelta(hours=2), BILLING, "decrypt", "orders", 10)  # night, under the floor
        if d not in (5, 6):  # reports rests at the weekend
            for minute in range(9 * 60, 17 * 60, 10):
                _aggregate(app, week, day + timedelta(minutes=minute), REPORTS, "decrypt", "orders",
                           rng.randint(5, 15))
        for _ in range(900 if d == 3 else rng.randint(20, 40)):  # alice: 900 on day 4, under the floor
            _single(app, week, day + timedelta(seconds=rng.randint(9 * 3600, 17 * 3600)), ALICE, "customers")
        for minute in range(10 * 60, 16 * 60, 30):
            _aggregate(batch, week, day + timedelta(minutes=minute), ETL, "decrypt", "customers",
                       rng.randint(30, 50))
        _single(app, week, day + timedelta(hours=13), MALLORY, "orders")
    bulk = START + timedelta(days=5, hours=1)
    for minute in range(150):  # 01:00-03:30 on day 6: the bulk read
        _aggregate(batch, week, bulk + timedelta(minutes=minute), ETL, "decrypt",
                   "customers" if minute % 3 else "orders", rng.randint(40, 60))
    _events(app, week)
    week.entries = app.write() + batch.write()
    return week


def _events(log: _Log, week: Week) -> None:
    """Refusals, failures, a rate-limit trip and its suspension, lifecycle, ceremonies."""
    at = START + timedelta(days=1, hours=11)
    for i in range(5):
        _single(log, week, at + timedelta(minutes=i), ALICE, "customers", "failed", "IntegrityError")
    _single(log, week, at, MALLORY, "orders", "failed", "IntegrityError")
    for i in range(2):
        log.add(at + timedelta(hours=1, minutes=i), ALICE, "login", None, version=None, outcome="failed",
                error="AuthenticationError", detail={"token": "keymgr-A"})
        week.failures[(label(ALICE), DAYS[1])] += 1
    for i in range(3):
        log.add(START + timedelta(days=2, hours=10, minutes=i), BILLING, "decrypt", "invoices", version=1,
                outcome="refused", error="PolicyError")
    trip = START + timedelta(days=2, hours=14)
    for i in range(4):
        log.add(trip + timedelta(seconds=i), REPORTS, "decrypt", "orders", version=2, outcome="refused",
                error="PolicyError", detail={"reason": "rate-limit", "limit": 500, "per_seconds": 60,
                                             "suspended": True})
    log.add(trip, REPORTS, "suspend", "orders", version=2, outcome="intent")
    log.add(trip + timedelta(milliseconds=5), REPORTS, "suspend", "orders", version=2)
    resume = trip + timedelta(hours=2)
    log.add(resume, ALICE, "resume", "orders", version=2, outcome="intent")
    log.add(resume + timedelta(milliseconds=5), ALICE, "resume", "orders", version=2)
    create = START + timedelta(days=3, hours=9)
    log.add(create, ALICE, "create", "payroll", outcome="intent", detail={"profile": "kw"})
    log.add(create + timedelta(seconds=1), ALICE, "create", "payroll", detail={"profile": "kw"})
    log.add(create + timedelta(hours=1), ALICE, "rotate", "orders", version=None, outcome="intent")
    log.add(create + timedelta(hours=1, seconds=1), ALICE, "rotate", "orders", version=3)
    log.add(create + timedelta(hours=2), ALICE, "retire", "orders", version=None, outcome="intent",
            detail={"below": 2})  # no outcome follows: interrupted
    ceremony = START + timedelta(days=4, hours=15)
    for i, custodian in enumerate(("carol", EVIL_CUSTODIAN)):
        log.add(ceremony + timedelta(minutes=i), Actor(f"cust{i}", 2000 + i, 4000 + i, "vault", None), "approve",
                "payroll", version=None, detail={"custodian": custodian, "request": "0123456789abcdef",
                                                 "operation": "backup"})
    log.add(ceremony + timedelta(minutes=10), ALICE, "backup", "payroll", version=None, outcome="intent",
            detail={"approvals": 2})
    log.add(ceremony + timedelta(minutes=11), ALICE, "backup", "payroll", version=None, detail={"approvals": 2})
    log.add(ceremony + timedelta(hours=1), Actor("carol", 2000, 4100, "vault", None), "approve", None,
            version=None, detail={"custodian": "carol", "request": "fedcba9876543210", "operation": "set-policy"})
    log.add(START + timedelta(days=6, hours=8), Actor("bob", 1005, 5000, "ws3", None), "audit-off", None,
            version=None, detail={"by": "audit=False"})
