"""How many times a key version has encrypted: ``max_messages``, the GCM nonce bound, auto-rotation.

A version may protect at most ``limit`` data keys (:func:`limit_for`): the
key's ``max_messages`` policy and, for the ``gcm`` profile, NIST SP 800-38D
8.3's bound of 2^32 invocations with random 96-bit IVs per key, whichever is
lower. Counting must survive restarts and be shared by every process and every
host using the token, yet a token write per message would cost more than the
message. So uses are *reserved in blocks*, and counted as a grow-only counter
(DESIGN.md, "Counters that never undercount"): each process (a writer, with a
random identity) writes a ``uses`` fact holding its own running total for the
version, and the recorded count is the sum over writers of each one's highest
total (:func:`keymgr.keyring.facts.fold`). Nothing is read, modified and written back,
so two hosts reserving at once both count, snapshots merge exactly, and the
recorded count never falls below the encryptions made. Reservations a process did
not spend when it exits stay counted: the count overstates, never understates.
After writing its fact a writer reads the count again and keeps only the part of
its block that fits under the limit, so racing writers cannot together pass it
(as far as each sees the others' facts: a stale view can let a race overshoot by
at most one block per racing host, each at most 1/16 of the limit).

Blocks grow (:func:`block_for`): a process's first block for a version is
:data:`FIRST_BLOCK` uses, and each next one twice the last, up to 1/16 of
the limit and :data:`MAX_BLOCK`. A short-lived process (one CLI call) so
wastes at most 256 uses, a long-lived one at most about as many as it
already made, and a busy service writes the record about once per million
messages instead of once per thousand: a record write costs milliseconds on
SoftHSM, which at one per 1,024 messages was a third of a ``gcm`` message
(measured: 35 of 116 µs, docs/performance.md).

At the limit, a key whose policy has ``auto_rotate`` is rotated and the new
primary takes over; otherwise encryption fails with
:class:`~keymgr.errors.PolicyError`. ``auto_rotate`` also rotates on the
first use after the primary's cryptoperiod (``rotate_after_days``) ended.
Only one process rotates: the others find the primary already changed
(:func:`keymgr.lifecycle.rotation.rotate`'s ``if_primary``).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from datetime import datetime

from keymgr import errors
from keymgr._time import parse_utc
from keymgr.keyring.store import KeyRecord, Keyring
from keymgr.lifecycle import rotation

__all__ = ["FIRST_BLOCK", "MAX_BLOCK", "UsageMeter", "block_for", "limit_for"]

#: A process's first reservation for a key version.
FIRST_BLOCK = 256
#: The largest reservation one fact makes (2^32 / 2^20: the GCM bound is 4,096 of them).
MAX_BLOCK = 1 << 20


def limit_for(record: KeyRecord) -> int | None:
    """Encryptions one version of this key may make, or None when nothing limits them
    (:attr:`KeyRecord.use_limit`, computed once per record)."""
    return record.use_limit


def block_for(limit: int, previous: int = 0) -> int:
    """The next reservation's size after a spent block of ``previous`` uses (0: none yet).

    Twice the previous block, starting at :data:`FIRST_BLOCK`, so that what a process can
    leave unspent stays in proportion to what it used; and small next to the limit (at
    most 1/16 of it), so that a few processes' unspent blocks waste little of it, and at
    most :data:`MAX_BLOCK`."""
    cap = max(1, min(MAX_BLOCK, limit // 16))
    return min(cap, max(FIRST_BLOCK, 2 * previous))


_meters: weakref.WeakSet[UsageMeter] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # the parent's reserved blocks are the parent's: a child spending them again would undercount
    for meter in list(_meters):
        meter.forget()


os.register_at_fork(after_in_child=_after_fork_in_child)


class UsageMeter:
    """One process's reservations, per key version (by CKA_ID). Thread-safe."""

    def __init__(self, keyring: Keyring,
                 rotate: Callable[[str, int, str], KeyRecord] | None = None) -> None:
        """``rotate(name, if_primary, why)`` makes an automatic rotation (the manager's records it in
        the audit log, as every change of key state is); default: :func:`keymgr.lifecycle.rotation.rotate`."""
        _meters.add(self)
        self._keyring = keyring
        self._rotate = rotate or (lambda name, primary, why: rotation.rotate(keyring, name, if_primary=primary))
        self._lock = threading.Lock()
        #: one block reservation at a time in this process: two threads that both found their block
        #: spent would otherwise both reserve, and the second's block would replace the first's unspent one
        self._reserving = threading.Lock()
        #: key_id -> [next use, end of the reserved block)
        self._blocks: dict[bytes, list[int]] = {}
        #: key_id -> size of this process's last block for it (the next one is twice that)
        self._sizes: dict[bytes, int] = {}
        #: key_id -> this writer's running total of reservations, and the label of the fact saying so
        self._totals: dict[bytes, tuple[int, str]] = {}

    def forget(self) -> None:
        """Drop every reservation (in a forked child: they belong to the parent)."""
        self._lock = threading.Lock()
        self._reserving = threading.Lock()
        self._blocks, self._sizes, self._totals = {}, {}, {}

    def _now(self) -> datetime:
        return parse_utc(rotation.now(self._keyring))

    def reserve(self, record: KeyRecord) -> KeyRecord:
        """Account for one encryption under ``record``'s primary; returns the record to encrypt
        with (a newer one after an automatic rotation)."""
        if record.policy.auto_rotate:
            record = self._rotate_if_due(record)
        limit = record.use_limit
        version = record.primary_version
        if limit is None or version.state != "active":
            return record  # nothing to count, or the wrap refuses anyway
        if self._spend(version.key_id):
            return record
        with self._reserving:
            if self._spend(record.primary_version.key_id):  # another thread reserved meanwhile
                return record
            return self._reserve_block(record, limit)

    def _spend(self, key_id: bytes) -> bool:
        """Take one use from this process's block for ``key_id``; False when it has none left."""
        with self._lock:
            block = self._blocks.get(key_id)
            if block is not None and block[0] < block[1]:
                block[0] += 1
                return True
        return False

    def _rotate_if_due(self, record: KeyRecord) -> KeyRecord:
        ends = rotation.due_at(record)
        if ends is None or self._now() < ends:
            return record
        return self._rotate(record.name, record.primary, "cryptoperiod")

    def _reserve_block(self, record: KeyRecord, limit: int) -> KeyRecord:
        keyring = self._keyring
        for _ in range(rotation.RETRIES):
            keyring.reload()
            current = keyring.get(record.name)
            version = current.primary_version
            if limit - version.uses <= 4 * block_for(limit, self._sizes.get(version.key_id, 0)):
                # near the limit, another process's newest reservation must not be missed: SoftHSM can
                # keep a stale view of other processes' writes (STACK-FACTS 21) until a re-initialise
                keyring.token.reread()
                keyring.reload()
                current = keyring.get(record.name)
                version = current.primary_version
            if version.state != "active":
                return current  # the wrap refuses, with the reason
            granted = self._take_block(current, limit)
            if granted:
                return current
            if not current.policy.auto_rotate:
                raise errors.PolicyError(
                    f"key {current.name!r} version {version.version} reached its limit of {limit} encryptions "
                    f"(max_messages / the GCM nonce bound): rotate it (keymgr key rotate {current.name})")
            record = self._rotate(current.name, current.primary, "use limit")
        raise errors.PolicyError(f"key {record.name!r}: could not reserve encryptions; retry")

    def _take_block(self, current: KeyRecord, limit: int) -> int:
        """Reserve the next block of the primary's uses; how many of them this process may spend
        (0 when the version is used up)."""
        keyring, version = self._keyring, current.primary_version
        key_id = version.key_id
        take = min(block_for(limit, self._sizes.get(key_id, 0)), limit - version.uses)
        if take <= 0:
            return 0
        mine, old_label = self._totals.get(key_id, (0, ""))
        fact_id = keyring.add_uses(current.name, key_id, mine + take)
        self._totals[key_id] = (mine + take, keyring.fact_label(current.name, fact_id))
        if old_label:
            keyring.forget_object(old_label)  # superseded by the higher total: every reader takes the max
        if limit - (version.uses + take) <= 4 * take:
            keyring.token.reread()  # near the limit: see the others' reservations made at the same moment
        keyring.reload()  # others may have reserved at the same moment: keep only what fits
        after = keyring.get(current.name)
        counted = next((v.uses for v in after.versions if v.key_id == key_id), version.uses + take)
        spendable = min(take, limit - (counted - take))
        if spendable <= 0:
            return 0
        with self._lock:
            self._blocks[key_id] = [1, spendable]  # this encryption is the block's first use
            self._sizes[key_id] = take
        return spendable
