"""Helpers for tests of the keyring of write-once facts (keymgr.keyring.store, keymgr.keyring.facts).

* :class:`WallClock` is a keyring clock (``tests._internals.clocked(km, wall_clock=...)``) that follows the
  real time plus an offset the test moves: facts written by other processes, with the real
  time, and the test's own stay comparable (orphan grace, snapshot staleness).
* :func:`eventually` polls a condition with a deadline: another manager's change reaches a
  manager through its background refresh (within ``refresh_interval``), not at once.
* :func:`key_objects`, :func:`legacy_record`: the keyring's data objects of one key, and a
  record as keymgr wrote them before facts (``keymgr/key/NAME/GEN``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from keymgr._canonical import canonical_json as canonical
from keymgr.hsm import objects
from keymgr.keyring.store import (
    APPLICATION,
    FACT_PREFIX,
    LEGACY_PREFIX,
    SNAPSHOT_PREFIX,
    KeyRecord,
)

__all__ = ["WallClock", "eventually", "key_objects", "legacy_record", "same_record", "LEGACY_DOMAIN"]

T = TypeVar("T")

#: The MAC domain of keymgr's records before facts (keymgr.keyring.store before e7d05ab).
LEGACY_DOMAIN = b"keymgr keyring record v1"


class WallClock:
    """The real UTC time plus an offset the test moves (the keyring's clock format)."""

    def __init__(self, offset: timedelta = timedelta(0)) -> None:
        self.offset = offset

    def __call__(self) -> str:
        moment = datetime.now(UTC).replace(microsecond=0) + self.offset
        return moment.isoformat().replace("+00:00", "Z")

    def advance(self, by: timedelta) -> None:
        self.offset += by


def eventually(condition: Callable[[], T], *, timeout: float = 3.0, what: str = "condition") -> T:
    """``condition()``'s first truthy value, polled until ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last value {value!r})")
        time.sleep(0.02)


def key_objects(ts: Any, name: str) -> dict[str, bytes]:
    """The keyring's data objects of key ``name`` on the token (facts, snapshots, legacy records):
    label -> value. Exact name: ``NAME-other``'s objects are not ``NAME``'s."""
    prefixes = tuple(f"{p}{name}/" for p in (FACT_PREFIX, SNAPSHOT_PREFIX, LEGACY_PREFIX))
    return {label: value for label, value in objects.read_data_objects(ts, application=APPLICATION)
            if label.startswith(prefixes)}


def legacy_record(keyring: Any, record: KeyRecord) -> tuple[str, bytes]:
    """(label, value) of ``record`` as keymgr before facts stored it: one MACed object per
    generation, without the fields added since (a version's ``restored``)."""
    inner = record.to_json()
    for version in inner["versions"]:
        version.pop("restored", None)
    mac = keyring.authenticate(LEGACY_DOMAIN, canonical(inner))
    return f"{LEGACY_PREFIX}{record.name}/{record.generation}", canonical({"record": inner, "mac": mac.hex()})


def same_record(a: KeyRecord, b: KeyRecord) -> bool:
    """Whether two views fold to the same key. ``generation`` counts the facts a view was folded
    from, which differs between a process that read the loose facts and one that read only the
    snapshot that replaced them (compaction drops facts no reader needs)."""
    return replace(a, generation=0) == replace(b, generation=0)
