"""Anomaly limits: a ceiling on how many data keys one principal may unwrap per interval.

The seed requirement ("freeze access on unusual bulk reads"): an application that
normally decrypts a few hundred records a minute and suddenly reads the whole table
is refused past its limit (:class:`~keymgr.errors.PolicyError`, audited as
``refused``), and, if the limit says ``suspend=True``, the key version is suspended
until an operator resumes it.

Counting is per process, in fixed windows of ``per`` seconds per (key, principal):
O(1) and lock-cheap on the per-message path. A deployment of many processes gets a
limit per process; the suspension, kept in the token's keyring, applies to all.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from keymgr import errors

__all__ = ["RateLimit", "RateLimiter", "ANY_KEY"]

#: The limit of keys that have none of their own.
ANY_KEY = "*"
_MAX_TRACKED = 10_000


@dataclass(frozen=True)
class RateLimit:
    """At most ``max_ops`` decryptions (data-key unwraps) per principal per ``per`` seconds;
    ``suspend``: also suspend the key version when the limit is exceeded."""

    max_ops: int
    per: float = 60.0
    suspend: bool = False

    def __post_init__(self) -> None:
        if type(self.max_ops) is not int or self.max_ops < 1 or not self.per > 0:
            raise errors.ConfigurationError("a rate limit needs max_ops >= 1 and per > 0 seconds")


class RateLimiter:
    """Fixed-window counters for the limits of each key (``"*"``: every other key)."""

    def __init__(self, limits: Mapping[str, RateLimit] | RateLimit, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = dict(limits) if isinstance(limits, Mapping) else {ANY_KEY: limits}
        if not all(isinstance(v, RateLimit) for v in self._limits.values()):
            raise errors.ConfigurationError("rate_limits maps key names (or '*') to RateLimit values")
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], list[float]] = {}
        _live.add(self)

    def _after_fork(self) -> None:
        """In a forked child: a new lock (another thread of the parent may have held it)."""
        self._lock = threading.Lock()

    def limit_for(self, key: str) -> RateLimit | None:
        return self._limits.get(key) or self._limits.get(ANY_KEY)

    def hit(self, key: str, principal: str) -> RateLimit | None:
        """Count one decryption; the limit it exceeds, or None while within it."""
        limit = self.limit_for(key)
        if limit is None:
            return None
        now = self._clock()
        with self._lock:
            window = self._windows.get((key, principal))
            if window is None or now - window[0] >= limit.per:
                if len(self._windows) >= _MAX_TRACKED:
                    self._windows = {k: w for k, w in self._windows.items() if now - w[0] < limit.per}
                self._windows[(key, principal)] = window = [now, 0]
            window[1] += 1
            return limit if window[1] > limit.max_ops else None


_live: weakref.WeakSet[RateLimiter] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for limiter in list(_live):
        limiter._after_fork()  # noqa: SLF001 - the class's own fork hook


os.register_at_fork(after_in_child=_after_fork_in_child)
