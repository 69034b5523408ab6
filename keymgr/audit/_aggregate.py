"""Aggregation of high-rate operations: counts per key, version, principal and interval.

An entry per message would cost more than the message (an fsync and a token
HMAC against ~30 µs for a 1 KiB encrypt), so successful encrypts and decrypts
are counted in memory and written as one entry per group at the end of each
interval, when the log is flushed or closed, and at process exit. A count is
never dropped: a flush that fails leaves the counts in place for the next one.
Refusals and failures are never aggregated: each is an entry of its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["Aggregator", "Group"]


@dataclass(frozen=True)
class Group:
    """One aggregated entry to write: ``count`` successful ``op``s between ``first`` and ``last``
    (wall-clock seconds since the epoch)."""

    op: str
    key: str | None
    version: int | None
    principal: str | None
    count: int
    first: float
    last: float


class Aggregator:
    """Thread-safe counters, drained by :meth:`drain` (which the log calls)."""

    def __init__(self, ops: Iterable[str], interval: float, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.ops = frozenset(ops)
        self.interval = float(interval)
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str | None, int | None, str | None], list[float]] = {}
        self._started = clock()

    def add(self, op: str, key: str | None, version: int | None, principal: str | None) -> None:
        now = self._wall()
        group = (op, key, version, principal)
        with self._lock:
            counts = self._counts.get(group)
            if counts is None:
                self._counts[group] = [1, now, now]
            else:
                counts[0] += 1
                counts[2] = now

    def due(self) -> bool:
        return bool(self._counts) and self._clock() - self._started >= self.interval

    def drain(self) -> list[Group]:
        """Take every pending count (the caller writes them, or hands them back with :meth:`restore`)."""
        with self._lock:
            counts, self._counts = self._counts, {}
            self._started = self._clock()
        return [Group(op, key, version, principal, int(c[0]), c[1], c[2])
                for (op, key, version, principal), c in sorted(counts.items(), key=lambda kv: kv[1][1])]

    def restore(self, groups: Iterable[Group]) -> None:
        """Put back counts that could not be written, so that no count is lost."""
        with self._lock:
            for g in groups:
                counts = self._counts.setdefault((g.op, g.key, g.version, g.principal), [0, g.first, g.last])
                counts[0] += g.count
                counts[1] = min(counts[1], g.first)
                counts[2] = max(counts[2], g.last)

    def discard(self, *, new_lock: bool = False) -> None:
        """Forget pending counts: in a child after ``fork()``, whose parent reports them
        (``new_lock``: the parent's lock may have been held by one of its threads)."""
        if new_lock:
            self._lock = threading.Lock()
        with self._lock:
            self._counts = {}
            self._started = self._clock()

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(int(c[0]) for c in self._counts.values())
