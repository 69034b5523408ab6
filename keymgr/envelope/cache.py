"""Data-key caching with limits, after the AWS Encryption SDK's caching CMM.

Token calls dominate the cost of small messages (20-35 µs a call, 1.3 µs of
AES per KiB: STACK-FACTS.md), so a busy service may reuse one data key for a
bounded number of messages. Every message still gets its own random nonce
(and streams their own salt), so reuse never repeats a (key, nonce) pair
except with the negligible random-nonce probability, which the message limit
keeps far below NIST's 2^-32 bound.

* **Encrypt side**: a data key and its wrapped form are reused for at most
  ``max_messages`` messages, ``max_bytes`` plaintext bytes and ``max_age``
  seconds, per (key name, primary version, encryption context): messages of
  different contexts never share a data key (a partition, as in the CMM).
* **Decrypt side**: unwrapped data keys are kept for ``max_age`` seconds, at
  most ``max_entries`` of them, keyed by the exact wrapped-key bytes.

Evicted keys are wiped (their ``bytearray`` zeroed). Caching is off unless the
caller asks for it: it trades the HSM's per-use audit and instant revocation
for speed, and that trade is the application's to make.

Defaults: 300 s, 10,000 messages, 1 GiB per data key; decrypt side 300 s
and 1,000 entries. docs/performance.md ("Cache defaults") measures what
they buy and argues each bound: 10,000 messages already spread a token
call over so many messages that it no longer shows, while the age bound
is what makes a suspended or rotated key stop being used within minutes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from asn1crypto import cms

from keymgr import errors
from keymgr.envelope._aead import DataKey
from keymgr.oplog import cache as log

__all__ = ["CachePolicy", "EncryptCache", "DecryptCache"]


@dataclass(frozen=True)
class CachePolicy:
    """Limits on data-key reuse."""

    max_age: float = 300.0
    max_messages: int = 10_000
    max_bytes: int = 1 << 30
    max_entries: int = 1_000

    def __post_init__(self) -> None:
        if self.max_age <= 0 or self.max_messages < 1 or self.max_bytes < 1 or self.max_entries < 1:
            raise errors.ConfigurationError("cache limits must be positive")
        if self.max_messages > 1 << 32:
            raise errors.ConfigurationError("max_messages above 2^32 breaks the random-nonce bound for AES-GCM")


#: The recipients cached beside a data key: asn1crypto objects or their DER (keymgr.envelope.recipients).
Recipients = tuple[cms.RecipientInfo | bytes, ...]


@dataclass
class _EncryptEntry:
    dek: DataKey
    recipients: Recipients
    created: float
    messages: int = 0
    plaintext_bytes: int = 0
    leases: int = 0
    evicted: bool = False


class EncryptCache:
    """Reuse a data key (and its wrapped form) within the policy's limits.

    Pair every :meth:`acquire` with a :meth:`release` (in a ``finally``): an
    evicted key is wiped only when the last message still using it is sealed, so
    threads never race a wipe.
    """

    def __init__(self, policy: CachePolicy, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, _EncryptEntry] = OrderedDict()
        _live.add(self)

    def acquire(self, partition: Hashable, size: int, make: Callable[[], tuple[DataKey, Recipients]]) -> _EncryptEntry:
        """The cached entry (data key, recipients) for ``partition``, counting one message of
        ``size`` bytes; a new one from ``make()`` when none is cached or a limit would pass.
        Pair with :meth:`release`. Not a context manager: on the per-message path a
        generator-based one costs as much as the rest of a cache hit."""
        policy = self._policy
        if size > policy.max_bytes:  # larger than the whole byte budget: never cached
            dek, recipients = make()
            return _EncryptEntry(dek, recipients, 0.0, 1, size, leases=1, evicted=True)
        now = self._clock()
        with self._lock:
            entry = self._entries.get(partition)
            if entry is not None and (now - entry.created >= policy.max_age
                                      or entry.messages + 1 > policy.max_messages
                                      or entry.plaintext_bytes + size > policy.max_bytes):
                self._evict(partition, "a limit reached", now)
                entry = None
            if entry is not None:
                entry.messages += 1
                entry.plaintext_bytes += size
                entry.leases += 1
                self._entries.move_to_end(partition)
        if entry is None:
            dek, recipients = make()
            entry = _EncryptEntry(dek, recipients, now, 1, size, leases=1)
            with self._lock:
                if partition in self._entries:
                    self._evict(partition, "replaced by another thread's new key", now)
                self._entries[partition] = entry
                while len(self._entries) > policy.max_entries:
                    self._evict(next(iter(self._entries)), "max_entries reached", now)
        return entry

    def release(self, entry: _EncryptEntry) -> None:
        """The message sealed with ``entry`` is done; an evicted key is wiped by its last user."""
        with self._lock:
            entry.leases -= 1
            if entry.evicted and entry.leases == 0:
                entry.dek.wipe()

    def _evict(self, partition: Hashable, why: str, now: float | None = None) -> None:
        entry = self._entries.pop(partition, None)
        if entry is not None:
            entry.evicted = True
            if entry.leases == 0:
                entry.dek.wipe()
            if log.isEnabledFor(logging.DEBUG):  # no partition: it holds the encryption context
                age = (self._clock() if now is None else now) - entry.created
                log.debug("encrypt cache: data key evicted (%s) after %d messages, %d bytes, %.1f s",
                          why, entry.messages, entry.plaintext_bytes, age)

    def clear(self) -> None:
        with self._lock:
            for partition in list(self._entries):
                self._evict(partition, "cleared")

    def _after_fork(self) -> None:
        """In a forked child: a new lock (another thread of the parent may have held it), and no
        data key of the parent's: both processes would seal under it, each counting its own
        ``max_messages`` (N forked workers, N times the limit under one key). The child makes
        its own; the parent's are wiped in the child's memory (no thread of the child uses them)."""
        self._lock = threading.Lock()
        for entry in self._entries.values():
            entry.dek.wipe()
        self._entries = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)


class DecryptCache:
    """Unwrapped data keys by their wrapped bytes, for a bounded time."""

    def __init__(self, policy: CachePolicy, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, tuple[DataKey, float, Hashable]] = OrderedDict()
        _live.add(self)

    def get(self, wrapped: bytes) -> DataKey | None:
        now = self._clock()
        with self._lock:
            found = self._entries.get(wrapped)
            if found is None:
                return None
            if now - found[1] >= self._policy.max_age:
                self._entries.pop(wrapped)
                log.debug("decrypt cache: data key evicted (max_age reached)")
                return None
            self._entries.move_to_end(wrapped)
            return found[0]

    def put(self, wrapped: bytes, dek: DataKey, owner: Hashable = None) -> None:
        with self._lock:
            self._entries[wrapped] = (dek, self._clock(), owner)
            while len(self._entries) > self._policy.max_entries:
                # not wiped here: another thread may be using it; DataKey zeroes
                # its bytes when the last reference goes
                self._entries.popitem(last=False)
                log.debug("decrypt cache: oldest data key evicted (max_entries reached)")

    def forget(self, owner: Hashable) -> None:
        """Drop every key unwrapped by ``owner`` (a key version that was retired or destroyed)."""
        with self._lock:
            dropped = [w for w, (_, _, o) in self._entries.items() if o == owner]
            for wrapped in dropped:
                self._entries.pop(wrapped)
        if dropped:
            log.debug("decrypt cache: %d data keys of a retired or destroyed version dropped", len(dropped))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _after_fork(self) -> None:
        """In a forked child: a new lock (another thread of the parent may have held it); the
        unwrapped keys stay (opening under them spends no use)."""
        self._lock = threading.Lock()


_live: weakref.WeakSet[EncryptCache | DecryptCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cache in list(_live):
        cache._after_fork()  # noqa: SLF001 - the classes' own fork hook


os.register_at_fork(after_in_child=_after_fork_in_child)
