"""Blind-index subkeys held on the host for a bounded time, after the data-key cache.

A blind-index term computed by one ``C_Sign`` per value runs at the token's HMAC rate (~41k/s on
SoftHSM), which bounds an indexed insert and adds a token call to every lookup. AWS's Database
Encryption SDK derives a key per beacon from its root key and computes beacons on the host; keymgr
does the same per (index version, context): the token derives the subkey once (one ``C_Sign`` under
the index key, which never leaves the token), and the host computes terms with it
(:mod:`keymgr.fields.index`). This module keeps those subkeys, with the limits of the data-key
cache (:class:`keymgr.envelope.cache.CachePolicy`'s decrypt side: ``max_age`` 300 s, ``max_entries``
1,000): a subkey older than ``max_age`` is zeroed at the next use of the cache (any slot) and derived
again (and audited again) when needed, the least recently used beyond ``max_entries`` goes, and
a subkey derived while a rotation or close cleared the cache serves that one call and is zeroed.
Every subkey lives in a ``bytearray`` the cache owns and zeroes when it evicts,
replaces or clears it; terms are computed under the cache's lock, so a subkey is never zeroed while
a thread is using it. Beside it the cache keeps the subkey's HMAC-SHA256 (RFC 2104) as two
SHA-256 states already keyed (``hashlib``, OpenSSL's: the inner one fed ``key XOR ipad``, the
outer one ``key XOR opad``), copied for each message. ``hmac.digest`` sets the key up anew on
every call (1.3 µs a term here), and copying ``hmac.new``'s context makes a Python object per
message (0.8 µs, and a garbage-collector allocation), against 0.5 µs for the two state copies.
Those states are freed, not zeroed by keymgr, when the subkey goes (OpenSSL clears digest
contexts as it frees them), as a cached data key's AES-GCM context is
(:class:`keymgr.envelope._aead.DataKey`). What a host compromise yields is the
same class as a cached data key: the subkeys of the contexts this process used, until the index
is rotated (docs/fields.md).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from keymgr import errors
from keymgr._memory import zero
from keymgr.oplog import cache as log

__all__ = ["SubkeyCache", "SubkeyPolicy"]


@dataclass(frozen=True)
class SubkeyPolicy:
    """Limits on how long and how many blind-index subkeys stay on the host (the data-key
    cache's decrypt-side defaults: 300 s, 1,000 entries)."""

    max_age: float = 300.0
    max_entries: int = 1_000

    def __post_init__(self) -> None:
        numbers = (self.max_age, self.max_entries)
        if any(isinstance(n, bool) for n in numbers) or not isinstance(self.max_entries, int) \
                or not isinstance(self.max_age, int | float) or not 0 < self.max_age < float("inf") \
                or self.max_entries < 1:
            raise errors.ConfigurationError("subkey cache limits: max_age a finite number of seconds > 0, "
                                            "max_entries an int >= 1")


class SubkeyCache:
    """Subkeys by slot (index version, key object, context), each computing HMACs on the host."""

    def __init__(self, policy: SubkeyPolicy | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy or SubkeyPolicy()
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, tuple[bytearray, HostHmac, float]] = OrderedDict()
        self._born: OrderedDict[Hashable, float] = OrderedDict()  # slots by derivation time, oldest first
        self._cleared = 0  # counts clear()s: a subkey derived across one is used once, never kept
        _live_caches.add(self)

    def __repr__(self) -> str:  # never the subkeys, nor the slots (they hold the contexts)
        return f"SubkeyCache({len(self._entries)} subkeys, max_age={self._policy.max_age:g})"

    def macs(self, slot: Hashable, derive: Callable[[], bytearray], messages: Sequence[bytes]) -> list[bytes]:
        """HMAC-SHA256 of each message under ``slot``'s subkey, derived by ``derive()`` (a token
        call, audited by the caller) when none is cached or it is older than ``max_age``. The
        cache owns the ``bytearray`` that ``derive`` returns and zeroes it when it goes."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            found = self._entries.get(slot)
            if found is not None:
                self._entries.move_to_end(slot)
                return found[1].macs(messages)
            cleared = self._cleared
        subkey = derive()  # outside the lock: a token call
        with self._lock:
            keyed = HostHmac(subkey)
            if cleared != self._cleared:  # a rotation or close came meanwhile: nothing of before stays
                try:
                    return keyed.macs(messages)
                finally:
                    zero(subkey)
            self._evict(slot, "replaced")
            self._entries[slot] = (subkey, keyed, now)
            self._born[slot] = now
            while len(self._entries) > self._policy.max_entries:
                self._evict(next(iter(self._entries)), "max_entries reached")
            return keyed.macs(messages)

    def expire(self) -> None:
        """Zero and drop every subkey older than ``max_age`` now (each use does this too)."""
        with self._lock:
            self._expire(self._clock())

    def _expire(self, now: float) -> None:
        """Subkeys past ``max_age`` go on the next use of *any* slot, not only of their own: one
        context used once must not stay on the host for good."""
        while self._born:
            slot, born = next(iter(self._born.items()))
            if now - born < self._policy.max_age:
                return
            self._evict(slot, "max_age reached")

    def _evict(self, slot: Hashable, why: str) -> None:
        self._born.pop(slot, None)
        found = self._entries.pop(slot, None)
        if found is not None:
            zero(found[0])
            log.debug("blind index: subkey evicted (%s)", why)  # no slot: it holds the context

    def clear(self) -> None:
        """Zero and drop every subkey (rotation, close)."""
        with self._lock:
            self._cleared += 1
            for slot in list(self._entries):
                self._evict(slot, "cleared")

    def __len__(self) -> int:
        return len(self._entries)

    def _after_fork(self) -> None:
        """In a forked child: another thread of the parent may have held the lock (terms are
        computed under it) and be gone, and the entries may be half-changed: a new lock, and
        no subkey kept (the child derives its own, audited, as it needs them)."""
        self._lock = threading.Lock()
        for subkey, _, _ in self._entries.values():
            zero(subkey)
        self._entries = OrderedDict()
        self._born = OrderedDict()


_live_caches: weakref.WeakSet[SubkeyCache] = weakref.WeakSet()


def _reset_in_child() -> None:
    for cache in list(_live_caches):
        cache._after_fork()  # noqa: SLF001 - the class's own fork hook


os.register_at_fork(after_in_child=_reset_in_child)


class HostHmac:
    """HMAC-SHA256 under one key (RFC 2104), as two SHA-256 states already keyed: each message
    costs two state copies and no key setup, and makes no object the garbage collector tracks.
    The key is read once; the padded copies made from it are zeroed here."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes | bytearray) -> None:
        if len(key) > _SHA256_BLOCK:
            raise errors.ConfigurationError("an HMAC subkey is at most one SHA-256 block")
        block = bytearray(_SHA256_BLOCK)
        block[:len(key)] = key
        inner = bytearray(b ^ 0x36 for b in block)
        outer = bytearray(b ^ 0x5C for b in block)
        try:
            self._inner = hashlib.sha256(inner)
            self._outer = hashlib.sha256(outer)
        finally:
            for buffer in (block, inner, outer):
                zero(buffer)

    def __repr__(self) -> str:  # never the key
        return "HostHmac(sha256)"

    def macs(self, messages: Sequence[bytes]) -> list[bytes]:
        """The 32-byte HMAC of each message."""
        inner_copy, outer_copy = self._inner.copy, self._outer.copy
        out = []
        for message in messages:
            inner = inner_copy()
            inner.update(message)
            outer = outer_copy()
            outer.update(inner.digest())
            out.append(outer.digest())
        return out


_SHA256_BLOCK = 64
