"""Random 96-bit GCM nonces, from the OS CSPRNG a page at a time.

A message's nonce and a ``gcm`` recipient's nonce are random 96-bit values
(NIST SP 800-38D 8.2.2; at most 2^32 per key, which the cache limits and
keymgr.lifecycle.usage enforce). ``os.urandom(12)`` is one ``getrandom`` system call:
on this VM ~2.4 µs, 15 % of a cached message. So nonces are cut from 4 KiB
read with one call. GCM needs nonces unique, not secret, so holding the next
few hundred in memory reveals nothing; what must never happen is two
processes cutting the same bytes, so a forked child drops the buffer it
inherited (``os.register_at_fork``) and reads its own. Keys are never taken
from here: they come from ``os.urandom`` directly, so no future key waits in
a buffer.
"""

from __future__ import annotations

import os
import threading

__all__ = ["random_nonce"]

NONCE_SIZE = 12
_BATCH = 341 * NONCE_SIZE  # 4,092 bytes: one getrandom call


class _NonceSource:
    """A buffer of CSPRNG bytes handed out 12 at a time, never the same bytes twice."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._at = 0

    def take(self) -> bytes:
        with self._lock:
            at = self._at
            if at + NONCE_SIZE > len(self._buffer):
                self._buffer, at = os.urandom(_BATCH), 0
            self._at = at + NONCE_SIZE
            return self._buffer[at:at + NONCE_SIZE]

    def forget(self) -> None:
        """In a forked child: the parent's bytes (and a lock another thread may have held) go."""
        self._lock = threading.Lock()
        self._buffer, self._at = b"", 0


_SOURCE = _NonceSource()
os.register_at_fork(after_in_child=_SOURCE.forget)


def random_nonce() -> bytes:
    """12 bytes from the OS CSPRNG that no other call in this process (or a forked one) gets."""
    return _SOURCE.take()
