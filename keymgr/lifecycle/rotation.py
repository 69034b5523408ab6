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
    not primary,   destroyed       keymgr.lifecycle.shred.destroy       the token object is destroyed
    not destroyed                                             (terminal)

Retirement is not a state: ``retire(name, below=N)`` makes versions below N
stop decrypting whatever their state (Vault transit's ``min_decryption_version``).

Every change is a write-once fact (:mod:`keymgr.keyring.facts`), so hosts sharing a
token never overwrite each other: two rotations that race both create a
version, both stay decryptable, and every host picks the same primary (the
higher epoch, then the higher version number). Destroyed and compromised
absorb: a racing ``resume`` loses to a ``compromise``. The checks in the table
run against this process's view; a racing writer on another host can make a
change the table would have refused only in that absorbing way.

Crash safety of :func:`rotate` (docs/rotation.md): a *pending* fact names the
new CKA_ID first, then the key object is generated, then the *version* fact is
written (one new data object: the commit point). A crash before the commit
leaves the old primary and an orphan object that the next rotation destroys once
its pending fact is a day old (:meth:`keymgr.keyring.store.Keyring.sweep_orphans`;
another host may still be between the two steps). Never none, never two.

Rotations of one key on one host are serialised by an advisory lock file
(``fcntl.flock``), which only saves needless versions; correctness across
hosts does not depend on it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from keymgr import errors, interrupts
from keymgr._time import parse_utc
from keymgr.hsm import objects
from keymgr.hsm.locks import token_lock
from keymgr.keyring.store import KeyRecord, Keyring, KeyVersion, version_template

__all__ = ["STATES", "TRANSITIONS", "ROTATION_ONLY", "RETRIES", "rotate", "activate", "transition", "suspend",
           "resume", "mark_compromised", "retire", "check_transition",
           "check_settled", "SETTLE", "due", "due_at", "orphans", "key_lock",
           "now"]

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
#: Longest random pause before an automatic rotation (seconds; see rotate's ``if_primary``).
AUTO_ROTATE_JITTER = 0.05
#: How often a use reservation is retried when the version filled up meanwhile (keymgr.lifecycle.usage).
RETRIES = 5


@contextmanager
def key_lock(keyring: Keyring, name: str) -> Iterator[None]:
    """Hold this machine's advisory lock on key ``name`` of this token (blocks until free)."""
    with token_lock(keyring.token, name):
        yield


def now(keyring: Keyring) -> str:
    """The keyring's time (its clock is injectable: tests move it past cryptoperiods)."""
    return keyring.now()


def _written(record: KeyRecord | None, name: str) -> KeyRecord:
    if record is None:  # pragma: no cover - a fact about an existing key was just written
        raise errors.KeyNotFoundError(f"key {name!r} cannot be read back after a change; retry")
    return record


def _next_epoch(keyring: Keyring, name: str) -> int:
    """One more than any primary claim this process has seen: a new claim wins over all of them."""
    return 1 + max((f.body["epoch"] for f in keyring.facts(name)
                    if f.kind in ("version", "primary") and f.body.get("epoch") is not None), default=0)


def _latest(keyring: Keyring, name: str) -> KeyRecord:
    keyring.reload()
    return keyring.get(name)


# -- orphans ------------------------------------------------------------------------


def orphans(keyring: Keyring, record: KeyRecord) -> list[tuple[str, bytes]]:
    """Key objects labelled ``NAME/vN`` that no version fact names (a rotate that crashed
    before its commit, or one still in progress on another host), and objects of versions
    that are destroyed (a destroy that crashed after its commit)."""
    return keyring.orphans(record.name)


# -- rotate / activate --------------------------------------------------------------


def rotate(keyring: Keyring, name: str, *, activate: bool = True, if_primary: int | None = None) -> KeyRecord:
    """Create version n+1 of ``name`` in the token and (by default) make it the primary.

    ``activate=False`` creates it *pre-active* (no data under it yet; make it primary later
    with :func:`activate`, e.g. once every site has seen it). Orphans a crashed rotate left
    long enough ago are destroyed first. Atomic from the caller's view (module docstring).
    ``if_primary``: rotate only if that version is still the primary (automatic rotation: of
    several processes that saw the same key due, the first rotates and the others get its result)."""
    if if_primary is not None:
        # automatic rotation fires on every host that saw the key due at the same moment: a random
        # pause before looking lets the first host's new version reach the others (fewer spare versions)
        time.sleep(random.uniform(0, AUTO_ROTATE_JITTER))
    with interrupts.commit_scope(), key_lock(keyring, name):
        record = _latest(keyring, name)
        if if_primary is not None and record.primary != if_primary:
            return record
        keyring.sweep_orphans(name)
        number = max(v.version for v in record.versions) + 1
        key_id = keyring.new_key_id()
        template = version_template(record.profile, record.policy)
        pending = keyring.add_pending(name, key_id, number)
        try:
            objects.generate_key(keyring.token, template, label=record.label_of(number), key_id=key_id)
            body = {"kid": key_id.hex(), "num": number, "kcv": objects.check_value(keyring.token, key_id),
                    "epoch": _next_epoch(keyring, name) if activate else None, "restored": False,
                    "prof": record.profile}
            interrupts.hold_signals()  # the commit: an interrupt from here on waits for the caller's record of it
            written = _written(keyring.add(name, "version", body), name)
        except BaseException:
            keyring.discard_unrecorded(name, key_id, pending=pending)
            raise
        if not objects.key_exists(keyring.token, key_id):
            # another host swept it as an orphan while this one was between generating and recording
            # it (a clock far off, or this process paused for a day): retire the version at once, so
            # that no host makes it the primary, and say so
            _record_state(keyring, name, next(v for v in written.versions if v.key_id == key_id), "destroyed")
            raise errors.TokenError(f"rotation of key {name!r}: the new key object was destroyed by another "
                                    "host's orphan sweep before it was recorded (are the hosts' clocks a day "
                                    "apart?); nothing uses it. Retry the rotation")
        return written


def activate(keyring: Keyring, name: str, version: int) -> KeyRecord:
    """Make pre-active ``version`` the primary; the old primary becomes decrypt-only."""
    record = _latest(keyring, name)
    target = record.version(version)
    if target.state != "pre-active":
        raise errors.PolicyError(f"key {name!r} version {version} is {target.state}; only a pre-active "
                                 "version can be activated (rotate makes a new one)")
    body = {"kid": target.key_id.hex(), "epoch": _next_epoch(keyring, name)}
    return _written(keyring.add(name, "primary", body), name)


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


def _record_state(keyring: Keyring, name: str, version: KeyVersion, event: str) -> KeyRecord:
    kid = version.key_id.hex()
    body = {"kid": kid, "to": event, "lc": keyring.next_clock(name)}
    return _written(keyring.add(name, "state", body), name)


def transition(keyring: Keyring, name: str, version: int, state: str) -> KeyRecord:
    """Move ``version`` of ``name`` to ``state`` if the table in the module docstring allows it.

    ``destroyed`` is reached only through :func:`keymgr.lifecycle.shred.destroy` (which gates it and
    destroys the object), by :func:`record_destroyed`."""
    if state == "destroyed":
        raise errors.PolicyError("destroying a key version goes through destroy (keymgr key destroy), "
                                 "which checks approvals and remaining data")
    return _transition(keyring, name, version, state)


def record_destroyed(keyring: Keyring, name: str, version: int) -> KeyRecord:
    """The ``destroyed`` fact, for :func:`keymgr.lifecycle.shred.destroy` only: it writes it once
    its gates passed and before the object goes (a public caller gets the PolicyError of
    :func:`transition`; this name is not exported by :mod:`keymgr.lifecycle`)."""
    return _transition(keyring, name, version, "destroyed")


def _transition(keyring: Keyring, name: str, version: int, state: str) -> KeyRecord:
    record = _latest(keyring, name)
    current = record.version(version)
    check_transition(record, current, state)
    return _record_state(keyring, name, current, state)


def suspend(keyring: Keyring, name: str, version: int) -> KeyRecord:
    """Freeze ``version``: it neither encrypts nor decrypts until resumed (an investigation, a rate limit)."""
    return transition(keyring, name, version, "suspended")


def mark_compromised(keyring: Keyring, name: str, version: int) -> KeyRecord:
    """Record that ``version`` is (suspected) compromised: it decrypts only with ``allow_compromised``."""
    return transition(keyring, name, version, "compromised")


def resume(keyring: Keyring, name: str, version: int) -> KeyRecord:
    """Undo :func:`suspend`: back to the state before it; an old primary that lost its place
    while suspended comes back decrypt-only (there is only ever one primary). A version that
    some host marked compromised or destroyed meanwhile stays so (those states absorb)."""
    record = _latest(keyring, name)
    current = record.version(version)
    if current.state != "suspended":
        raise errors.PolicyError(f"key {name!r} version {version} is {current.state}, not suspended")
    return _record_state(keyring, name, current, "resumed")


#: How long a version that stopped being the primary (or was made and never activated) is kept
#: from destroy and retire, both final for the data under it: hosts sharing the token see a
#: new primary only at their next refresh, and until then go on encrypting under the old one
#: (docs/deployment.md). Measured on the hosts' wall clocks: skew between them shortens it.
SETTLE = timedelta(minutes=10)


def _sortable_time(at: str) -> datetime:
    try:
        return parse_utc(at)
    except ValueError:
        return datetime.max.replace(tzinfo=UTC)  # unreadable: taken as the latest


def check_settled(keyring: Keyring, record: KeyRecord, target: KeyVersion, verb: str) -> None:
    """Refuse while another host may still encrypt under ``target`` (:data:`SETTLE`): it is
    outranked by a newer primary claim (a higher (epoch, number), whatever its epoch: the loser
    of two racing rotations claimed the same epoch) made less than SETTLE ago."""
    kid = target.key_id.hex()
    number = {v.key_id.hex(): v.version for v in record.versions}
    leads = {v.key_id.hex() for v in record.versions if record.profile_of(v) == record.profile}
    facts = keyring.facts(record.name)
    claims = [(f.body["epoch"], number[f.kid], f.at, f.kid) for f in facts
              if f.kind in ("version", "primary") and f.body.get("epoch") is not None and f.kid in number]
    mine = max(((epoch, num) for epoch, num, _, k in claims if k == kid), default=None)
    destroyed = [f.at for f in facts if f.kind == "state" and f.kid == kid and f.body.get("to") == "destroyed"]
    if destroyed:  # finishing a destroy: it stopped encrypting when the facts said destroyed
        since, why = max(destroyed, key=_sortable_time), "was marked destroyed"
    elif mine is None:  # never activated: it may be activated right now by someone else
        since, why = target.created, "was created"
    else:
        # outranked by a higher (epoch, number), or by any claim that may lead where this one may
        # not (the loser of two creates with different profiles led on its own host until then);
        # from the latest of them: the earliest may be a version that never led, or one a forged
        # destroyed fact retired, after which this one led again
        later = [at for epoch, num, at, k in claims
                 if k != kid and ((epoch, num) > mine or (k in leads and kid not in leads))]
        if not later:
            return
        since, why = max(later, key=_sortable_time), "stopped being the primary"
    try:
        age = parse_utc(keyring.now()) - parse_utc(since)
    except ValueError:  # a time that does not parse proves nothing: wait as for a change just made
        age = timedelta(0)
    if age < SETTLE:
        raise errors.PolicyError(
            f"key {record.name!r} version {target.version} {why} at {since}, {int(age.total_seconds())} s ago: "
            f"hosts sharing the token may still encrypt under it until they refresh. {verb} it after "
            f"{int(SETTLE.total_seconds() // 60)} minutes, or now with --immediately if this is the only host "
            "(or every host has restarted since)")


def retire(keyring: Keyring, name: str, below: int, *, immediately: bool = False) -> KeyRecord:
    """Versions below ``below`` stop decrypting (Vault's ``min_decryption_version``). The
    primary cannot be retired, and the minimum never goes down (unretiring would revive
    versions an operator meant to be gone: rotate or restore instead). Like a destroy, it waits
    until other hosts must have stopped encrypting under what it retires (:func:`check_settled`)
    unless ``immediately``."""
    record = _latest(keyring, name)
    if below > record.primary:
        raise errors.PolicyError(f"key {name!r}: retiring below {below} would retire the primary "
                                 f"(version {record.primary})")
    if below < record.min_decryption_version:
        raise errors.PolicyError(f"key {name!r} is already retired below {record.min_decryption_version}")
    if below == record.min_decryption_version:
        return record
    if not immediately:
        for version in record.versions:
            if record.min_decryption_version <= version.version < below and version.state != "destroyed":
                check_settled(keyring, record, version, "Retire")
    return _written(keyring.add(name, "retire", {"kid": record.version(below).key_id.hex()}), name)


# -- cryptoperiods ----------------------------------------------------------------------


def due_at(record: KeyRecord) -> datetime | None:
    """When the primary's cryptoperiod (``rotate_after_days``) ends, or None without one."""
    days = record.policy.rotate_after_days
    if days is None:
        return None
    return parse_utc(record.primary_version.created) + timedelta(days=days)


def due(records: list[KeyRecord], *, now: datetime | None = None) -> list[tuple[KeyRecord, datetime]]:
    """Keys whose primary is past its cryptoperiod, with the time it ended, most overdue first."""
    moment = now or datetime.now(UTC)
    late = [(r, at) for r in records if (at := due_at(r)) is not None and at <= moment]
    return sorted(late, key=lambda item: item[1])
