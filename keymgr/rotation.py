"""Key versions and their lifecycle: rotate, activate, suspend, resume, compromise, retire.

States follow NIST SP 800-57 Part 1 (5.3): a version is created *pre-active*
or *active*; exactly one version is the key's primary (the one that encrypts,
Tink's "primary key"); rotating demotes the old primary to *decrypt-only*
(SP 800-57's "deactivated": processes data, protects nothing new).
Allowed transitions (anything else raises :class:`~keymgr.errors.PolicyError`)::

    from           to              how
    -------------  --------------  -------------------------------------------------
    (new)          active          rotate(name)               becomes primary
    (new)          pre-active      rotate(name, activate=False)
    pre-active     active          activate(name, version)    becomes primary
    active         decrypt-only    only by rotate / activate  (the new primary takes over)
    pre-active,    suspended       suspend(name, version)     neither encrypts nor decrypts
    active,
    decrypt-only
    suspended      (previous)      resume(name, version)      back to what it was (decrypt-only
                                                              if it lost primary meanwhile)
    any but        compromised     mark_compromised(...)      decrypts only with allow_compromised
    destroyed
    not primary,   destroyed       keymgr.shred.destroy       the token object is destroyed
    not destroyed                                             (terminal)

Retirement is not a state: ``retire(name, below=N)`` sets the record's
``min_decryption_version`` (Vault transit), and versions below it stop
decrypting whatever their state. Every transition is appended, with its time,
to the version's ``history``.

Crash safety of :func:`rotate` (docs/rotation.md): the new key object is
generated first, then the keyring record naming it primary is written (one
new data object: the commit point; :mod:`keymgr.keyring`). A crash before
the commit leaves the old primary and an *orphan* object ``NAME/vN`` that no
record names: it never protected anything, and the next rotate destroys it.
A crash after the commit leaves the new primary. Never none, never two.

Writers of one key's record are serialised per machine and user by an advisory
lock file (``fcntl.flock``; threads too: each takes its own descriptor), and
each re-reads the record from the token under it. A writer on another machine
sharing a network HSM is caught by the keyring's generation check: a stale
write is refused with a clear "retry" error (state changes retry by themselves,
:data:`RETRIES` times).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from keymgr import errors
from keymgr.hsm import objects
from keymgr.hsm.locks import token_lock
from keymgr.keyring import KeyRecord, Keyring, KeyVersion, version_template

__all__ = ["STATES", "TRANSITIONS", "ROTATION_ONLY", "RETRIES", "rotate", "activate", "transition", "suspend",
           "resume", "mark_compromised", "retire", "check_transition", "due", "due_at", "orphans", "update_record",
           "key_lock", "parse_time", "now"]

STATES = ("pre-active", "active", "decrypt-only", "suspended", "compromised", "destroyed")

#: Transitions an operator may ask for by name (:func:`transition`); resume and destroy have their own calls.
TRANSITIONS: dict[str, frozenset[str]] = {
    "pre-active": frozenset({"suspended", "compromised", "destroyed"}),
    "active": frozenset({"suspended", "compromised"}),
    "decrypt-only": frozenset({"suspended", "compromised", "destroyed"}),
    "suspended": frozenset({"compromised", "destroyed"}),
    "compromised": frozenset({"destroyed"}),
    "destroyed": frozenset(),
}
#: Transitions only a change of primary makes (rotate / activate), never a direct request.
ROTATION_ONLY = frozenset({("pre-active", "active"), ("active", "decrypt-only")})
#: How often a record update is retried when another writer got in first.
RETRIES = 5


def parse_time(stamp: str) -> datetime:
    """A keyring timestamp (``2026-12-02T16:41:36Z``) as an aware datetime."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


# -- serialising writers ----------------------------------------------------------


@contextmanager
def key_lock(keyring: Keyring, name: str) -> Iterator[None]:
    """Hold this machine's advisory lock on key ``name`` of this token (blocks until free)."""
    with token_lock(keyring.token, name):
        yield


def update_record(keyring: Keyring, name: str, change: Callable[[KeyRecord], KeyRecord]) -> KeyRecord:
    """Re-read key ``name`` from the token, apply ``change`` and write the result, under the key's lock.

    ``change`` may raise (a refused transition) and is re-run on a fresh record if another
    writer raced this one; after :data:`RETRIES` lost races the error says to retry. When it
    returns the record unchanged nothing is written."""
    with key_lock(keyring, name):
        for attempt in range(RETRIES):
            keyring.reload()
            record = keyring.get(name)
            try:
                changed = change(record)
                return record if changed is record else keyring.write(changed)
            except errors.ConfigurationError as exc:
                if "changed by another process" not in str(exc) or attempt == RETRIES - 1:
                    raise
                time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


def now(keyring: Keyring) -> str:
    """The keyring's time (its clock is injectable: tests move it past cryptoperiods)."""
    return keyring._clock()  # noqa: SLF001 - the keyring's injectable clock stamps every record


def _moved(version: KeyVersion, state: str, now: str) -> KeyVersion:
    return replace(version, state=state, history=version.history + ((state, now),))


def _with_version(record: KeyRecord, version: KeyVersion) -> KeyRecord:
    return replace(record, versions=tuple(version if v.version == version.version else v
                                          for v in record.versions))


def _promote(record: KeyRecord, new: KeyVersion, now: str) -> KeyRecord:
    """``new`` becomes the active primary; the old primary, if active, becomes decrypt-only."""
    old = record.primary_version
    if old.version != new.version and old.state == "active":
        record = _with_version(record, _moved(old, "decrypt-only", now))
    if new.state != "active":
        new = _moved(new, "active", now)
    versions = {v.version: v for v in record.versions}
    versions[new.version] = new
    return replace(record, versions=tuple(versions[n] for n in sorted(versions)), primary=new.version)


# -- orphans ------------------------------------------------------------------------


def orphans(keyring: Keyring, record: KeyRecord) -> list[tuple[str, bytes]]:
    """Key objects labelled ``NAME/vN`` that the record does not name (a rotate that crashed
    before its commit), and objects of versions the record says are destroyed (a destroy
    that crashed after its commit). None of them ever protected data under this record."""
    prefix = f"{record.name}/v"
    named = {v.key_id: v for v in record.versions}
    found = []
    for label, key_id in objects.list_secret_keys(keyring.token):
        if not label.startswith(prefix) or not label[len(prefix):].isdigit():
            continue
        version = named.get(key_id)
        if version is None or version.state == "destroyed":
            found.append((label, key_id))
    return found


def _clean_orphans(keyring: Keyring, record: KeyRecord) -> int:
    found = orphans(keyring, record)
    for _, key_id in found:
        objects.destroy_key(keyring.token, key_id)
    return len(found)


# -- rotate / activate --------------------------------------------------------------


def rotate(keyring: Keyring, name: str, *, activate: bool = True, if_primary: int | None = None) -> KeyRecord:
    """Create version n+1 of ``name`` in the token and (by default) make it the primary.

    ``activate=False`` creates it *pre-active* (no data under it yet; make it primary later
    with :func:`activate`, e.g. once every site has seen it). Orphans left by an earlier
    crashed rotate are destroyed first. Atomic from the caller's view (module docstring).
    ``if_primary``: rotate only if that version is still the primary (automatic rotation: of
    several processes that saw the same key due, one rotates and the others get its result)."""
    with key_lock(keyring, name):
        keyring.reload()
        record = keyring.get(name)
        if if_primary is not None and record.primary != if_primary:
            return record
        _clean_orphans(keyring, record)
        number = max(v.version for v in record.versions) + 1
        key_id = keyring.new_key_id()
        template = version_template(record.profile, record.policy)
        objects.generate_key(keyring.token, template, label=record.label_of(number), key_id=key_id)
        stamp = now(keyring)
        state = "active" if activate else "pre-active"
        new = KeyVersion(number, key_id, state, stamp, ((state, stamp),), objects.check_value(keyring.token, key_id))
        updated = _promote(record, new, stamp) if activate else replace(record, versions=record.versions + (new,))
        try:
            return keyring.write(updated)
        except BaseException:
            _discard_unless_named(keyring, name, key_id)
            raise


def _discard_unless_named(keyring: Keyring, name: str, key_id: bytes) -> None:
    """After a failed record write: destroy the new object if the record surely does not name it.
    Best effort (it is an orphan at worst, which the next rotate removes), so a second failure
    here must not hide the first."""
    try:
        keyring.reload()
        if not any(v.key_id == key_id for v in keyring.get(name).versions):
            objects.destroy_key(keyring.token, key_id)
    except errors.KeymgrError:
        pass


def activate(keyring: Keyring, name: str, version: int) -> KeyRecord:
    """Make pre-active ``version`` the primary; the old primary becomes decrypt-only."""

    def change(record: KeyRecord) -> KeyRecord:
        target = record.version(version)
        if target.state != "pre-active":
            raise errors.PolicyError(f"key {name!r} version {version} is {target.state}; only a pre-active "
                                     "version can be activated (rotate makes a new one)")
        return _promote(record, target, now(keyring))

    return update_record(keyring, name, change)


# -- state changes ------------------------------------------------------------------


def check_transition(record: KeyRecord, version: KeyVersion, state: str) -> None:
    """Raise PolicyError unless the table allows ``version`` to become ``state`` now."""
    if state not in STATES:
        raise errors.ConfigurationError(f"unknown key state {state!r} (choose from {', '.join(STATES)})")
    where = f"key {record.name!r} version {version.version}"
    if (version.state, state) in ROTATION_ONLY:
        raise errors.PolicyError(f"{where}: {version.state} -> {state} happens only by rotating or activating")
    if state not in TRANSITIONS.get(version.state, frozenset()):
        raise errors.PolicyError(f"{where} is {version.state}; it cannot become {state}")
    if state == "destroyed" and version.version == record.primary:
        raise errors.PolicyError(f"{where} is the primary; rotate before destroying it")


def transition(keyring: Keyring, name: str, version: int, state: str, *, _shredding: bool = False) -> KeyRecord:
    """Move ``version`` of ``name`` to ``state`` if the table in the module docstring allows it.

    ``destroyed`` is reached only through :func:`keymgr.shred.destroy` (which gates it and
    destroys the object); ``_shredding`` is its private way in."""
    if state == "destroyed" and not _shredding:
        raise errors.PolicyError("destroying a key version goes through destroy (keymgr key destroy), "
                                 "which checks approvals and remaining data")

    def change(record: KeyRecord) -> KeyRecord:
        current = record.version(version)
        check_transition(record, current, state)
        return _with_version(record, _moved(current, state, now(keyring)))

    return update_record(keyring, name, change)


def suspend(keyring: Keyring, name: str, version: int) -> KeyRecord:
    """Freeze ``version``: it neither encrypts nor decrypts until resumed (an investigation, a rate limit)."""
    return transition(keyring, name, version, "suspended")


def mark_compromised(keyring: Keyring, name: str, version: int) -> KeyRecord:
    """Record that ``version`` is (suspected) compromised: it decrypts only with ``allow_compromised``."""
    return transition(keyring, name, version, "compromised")


def resume(keyring: Keyring, name: str, version: int) -> KeyRecord:
    """Undo :func:`suspend`: back to the state before it; an old primary that lost its place
    while suspended comes back decrypt-only (there is only ever one primary)."""

    def change(record: KeyRecord) -> KeyRecord:
        current = record.version(version)
        if current.state != "suspended":
            raise errors.PolicyError(f"key {name!r} version {version} is {current.state}, not suspended")
        before = "active"
        for state, _ in reversed(current.history):
            if state != "suspended":
                before = state
                break
        if before == "active" and version != record.primary:
            before = "decrypt-only"
        return _with_version(record, _moved(current, before, now(keyring)))

    return update_record(keyring, name, change)


def retire(keyring: Keyring, name: str, below: int) -> KeyRecord:
    """Versions below ``below`` stop decrypting (Vault's ``min_decryption_version``). The
    primary cannot be retired, and the minimum never goes down (unretiring would revive
    versions an operator meant to be gone: rotate or restore instead)."""

    def change(record: KeyRecord) -> KeyRecord:
        if below > record.primary:
            raise errors.PolicyError(f"key {name!r}: retiring below {below} would retire the primary "
                                     f"(version {record.primary})")
        if below < record.min_decryption_version:
            raise errors.PolicyError(f"key {name!r} is already retired below {record.min_decryption_version}")
        return replace(record, min_decryption_version=below)

    return update_record(keyring, name, change)


# -- cryptoperiods ----------------------------------------------------------------------


def due_at(record: KeyRecord) -> datetime | None:
    """When the primary's cryptoperiod (``rotate_after_days``) ends, or None without one."""
    days = record.policy.rotate_after_days
    if days is None:
        return None
    return parse_time(record.primary_version.created) + timedelta(days=days)


def due(records: list[KeyRecord], *, now: datetime | None = None) -> list[tuple[KeyRecord, datetime]]:
    """Keys whose primary is past its cryptoperiod, with the time it ended, most overdue first."""
    moment = now or datetime.now(UTC)
    late = [(r, at) for r in records if (at := due_at(r)) is not None and at <= moment]
    return sorted(late, key=lambda item: item[1])
