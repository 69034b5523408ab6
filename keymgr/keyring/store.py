"""The keyring: named keys, their versions and states, kept in the token itself.

The token is the source of truth for everything needed to decrypt (DESIGN.md,
"Where state lives"), and one token may serve a fleet of hosts (DESIGN.md,
"Many hosts on one token"). So the keyring is a set of write-once *facts*
(:mod:`keymgr.keyring.facts`), each a private CKO_DATA object (application
``keymgr``) authenticated by an HMAC-SHA256 computed inside the token by the
metadata MAC key, and every reader folds the facts it has seen into the same
records. Nothing shared is read, modified and written back, so two hosts
writing at once both succeed and agree afterwards.

Objects on the token::

    keymgr/f/NAME/ID      one fact
    keymgr/s/NAME/ID      a snapshot: a set of facts, and the objects it covers
    keymgr/key/NAME/GEN   a record of keymgr before facts (read as facts; covered by the next snapshot)

* **Compaction.** Every lookup scans every object of a token (STACK-FACTS 24),
  so once a key has more than :attr:`Keyring.compact_at` objects the writer
  folds them into one snapshot. Covered objects are destroyed only after a
  grace period: :attr:`Keyring.grace` seconds after this process first saw the
  snapshot, or once the snapshot is :attr:`Keyring.stale_after` old by this
  host's clock. A snapshot never drops a fact, so nothing is lost even when two
  hosts compact at once, and a process never forgets a fact it has seen.
* **Refresh.** A process re-reads the token every :attr:`Keyring.refresh_interval`
  seconds in a background thread, reading only objects that are new since its
  last look (one C_FindObjects, plus one read per new object); operations keep
  using the view they have meanwhile. A message or a name it cannot place makes
  it read again at once, and then re-initialise the module (STACK-FACTS 21) and
  read once more before it fails.
* **Orphans.** A rotation writes a ``pending`` fact, generates the key object,
  then writes the ``version`` fact that makes it usable. A key object that a crash
  left between the last two is destroyed once its pending fact is
  :attr:`Keyring.orphan_grace` old (hosts' clocks may differ, never by that much),
  after a re-initialise; an object no fact names is never touched.
* **Trust.** Anyone with the user PIN can MAC a fact, so a fact cannot prove that
  a key is safe: before a version encrypts, its key object must show what only the
  token sets (:mod:`keymgr.keyring.provenance`), checked once per version per process.

Key versions are AES-256 objects labelled ``NAME/vN`` with a random 16-byte
CKA_ID; ciphertexts name the CKA_ID, never the key name.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, replace
from datetime import timedelta
from typing import Any

from keymgr import errors, interrupts
from keymgr._canonical import canonical_json
from keymgr._time import parse_utc, utc_now
from keymgr.hsm import objects, registers
from keymgr.hsm.sessions import TokenSession
from keymgr.hsm.templates import DEFAULT_PROFILE, MAC_KEY, KeyTemplate, backup_capable, profile_named
from keymgr.keyring import provenance
from keymgr.keyring.facts import Fact, KeyPolicy, KeyRecord, KeyVersion, check_policy, fold, new_fact_id
from keymgr.oplog import keyring as log
from keymgr.oplog import warn_once

__all__ = ["KeyRecord", "KeyVersion", "KeyPolicy", "Keyring", "validate_name",
           "version_template"]

APPLICATION = "keymgr"
FACT_PREFIX = "keymgr/f/"
SNAPSHOT_PREFIX = "keymgr/s/"
LEGACY_PREFIX = "keymgr/key/"
META_MAC_ID = b"keymgr/meta-mac"
META_MAC_LABEL = "keymgr/meta-mac"
_FACT_DOMAIN = b"keymgr keyring fact v2"
_SNAPSHOT_DOMAIN = b"keymgr keyring snapshot v2"
_LEGACY_DOMAIN = b"keymgr keyring record v1"
#: A register every writer sets to a fresh random value after changing the keyring's objects, so
#: that a refresh can tell "nothing changed" from one attribute read instead of a find that scans
#: every object of the token (STACK-FACTS 19, 24; the find holds the module's lock, and every
#: token call of the process would wait for it)
CHANGES_REGISTER = "keymgr-keyring-changes"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise errors.ConfigurationError(
            f"invalid key name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def version_template(profile: str, policy: KeyPolicy) -> KeyTemplate:
    """The template every version of a key with this profile and policy is generated from."""
    template = profile_named(profile).template
    return backup_capable(template) if policy.backup else template


def facts_of_record(record: KeyRecord, *, restored: bool, seed: str | None = None) -> list[Fact]:
    """The facts that fold into ``record`` (a restored backup, or a record of keymgr before facts).
    ``seed`` makes the ids deterministic (a legacy record read by several hosts is one set of facts)."""
    counter = iter(range(1 << 30))

    def fid() -> str:
        return new_fact_id() if seed is None else hashlib.sha256(f"{seed}/{next(counter)}".encode()).hexdigest()[:32]

    facts = [Fact("key", record.name, fid(), record.created,
                  {"profile": record.profile, "policy": asdict(record.policy)})]
    for v in record.versions:
        kid = v.key_id.hex()
        states = [state for state, _ in v.history] + [v.state]
        epoch = 1 if v.version == record.primary else 0 if {"active", "decrypt-only"} & set(states) else None
        facts.append(Fact("version", record.name, fid(), v.created,
                          {"kid": kid, "num": v.version, "kcv": v.kcv, "epoch": epoch, "restored": restored,
                           "prof": record.profile_of(v)}))
        if v.state in ("suspended", "compromised", "destroyed"):
            facts.append(Fact("state", record.name, fid(), v.created, {"kid": kid, "to": v.state, "lc": 0}))
        if v.uses:
            facts.append(Fact("uses", record.name, fid(), v.created, {"kid": kid, "w": "00", "total": v.uses}))
        if v.version == record.min_decryption_version and v.version > 1:
            facts.append(Fact("retire", record.name, fid(), v.created, {"kid": kid}))
    return facts


_live_keyrings: weakref.WeakSet[Keyring] = weakref.WeakSet()


@atexit.register
def _stop_refreshers() -> None:  # a daemon thread inside a token call while the module finalises would crash
    for keyring in list(_live_keyrings):
        keyring.close()


def _after_fork_in_child() -> None:
    # a refresher thread of the parent may have held these locks at the fork: it does not exist here
    for keyring in list(_live_keyrings):
        keyring._lock = threading.RLock()  # noqa: SLF001 - the keyring's own locks, reset as modules reset theirs
        keyring._reloading = threading.Lock()  # noqa: SLF001
        keyring._refresher = None  # noqa: SLF001
        # a use counter is one writer: a child that kept its parent's identity would write totals the
        # merge (max per writer) folds into the parent's, and undercount (keymgr.lifecycle.usage)
        keyring.writer = os.urandom(8).hex()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Keyring:
    """Named, versioned keys on one token, shared safely by any number of hosts. Thread-safe."""

    def __init__(self, ts: TokenSession, *, clock: Callable[[], str] = utc_now) -> None:
        self._ts = ts
        self._clock = clock
        self._lock = threading.RLock()
        self._reloading = threading.Lock()
        self._facts: dict[str, dict[str, Fact]] = {}
        #: per key, the newest record of keymgr before facts (generation, its facts), read as facts
        self._legacy: dict[str, tuple[int, list[Fact]]] = {}
        self._owner: dict[str, str] = {}  # label of each object read (or written) -> key name
        self._covered: dict[str, tuple[float, str]] = {}  # label -> (monotonic first seen covered, snapshot time)
        self._present: set[str] = set()
        self._scan = objects.DataObjectScan()
        self._records: dict[str, KeyRecord] = {}
        self._by_id: dict[bytes, tuple[str, int]] = {}
        self._loaded_at = 0.0
        self._reread_at = -1e9
        self._writer_macs: list[bytes] | None = None
        self._reader_macs: list[bytes] = []
        self._trust: dict[tuple[bytes, int | None], str | None] = {}
        #: (version, its key object, the object's key in the session's handle cache) that last passed
        self._last_trusted: tuple[object, object, object] = (None, None, None)
        #: the session's handle cache (one dict for the session's life: TokenSession.cache)
        self._handles = ts.cache
        self._refresher: threading.Thread | None = None
        self._refresh_error: errors.KeymgrError | None = None
        self._closed = False
        #: seconds between background re-reads of the token (another host's change is seen within this)
        self.refresh_interval = 1.0
        #: seconds between two full re-reads when the changes register says nothing changed (a safety
        #: net: a writer that could not set the register, or two registers made at once)
        self.full_refresh_interval = 30.0
        self._marker: str | None = None
        self._full_at = 0.0
        #: least seconds between two re-initialisations of the module after misses
        self.reread_interval = 5.0
        #: seconds a snapshot's covered objects stay after this process first saw the snapshot
        self.grace = 30.0
        #: a snapshot this old (by this host's clock) lets any host destroy what it covers at once
        self.stale_after = timedelta(hours=1)
        #: a pending key object this old with no version fact is a crash's orphan
        self.orphan_grace = timedelta(days=1)
        #: objects of one key beyond which a writer compacts them into a snapshot
        self.compact_at = 8
        #: this process's identity as a use counter (keymgr.lifecycle.usage): its running totals are its own
        self.writer = os.urandom(8).hex()
        _live_keyrings.add(self)

    @property
    def token(self) -> TokenSession:
        return self._ts

    def now(self) -> str:
        """The keyring's time (injectable: tests move it past cryptoperiods and grace periods)."""
        return self._clock()

    def close(self) -> None:
        """Stop the background refresh (waits for one in progress)."""
        self._closed = True
        thread = self._refresher
        if thread is not None and thread is not threading.current_thread() and thread.is_alive():
            thread.join(timeout=30)

    # -- the metadata MAC key -------------------------------------------------------

    def _writer_mac(self) -> bytes:
        if self._writer_macs is None:
            self._writer_macs = objects.ensure_singleton_key(self._ts, MAC_KEY, label=META_MAC_LABEL,
                                                             id_prefix=META_MAC_ID)
            self._reader_macs = sorted(set(self._reader_macs) | set(self._writer_macs))
        return self._writer_macs[0]

    def _mac(self, domain: bytes, payload: bytes) -> tuple[bytes, bytes]:
        key_id = self._writer_mac()
        return key_id, objects.hmac_sha256(self._ts, key_id, domain + b"\x00" + payload)

    def _mac_holds(self, domain: bytes, payload: bytes, mac: bytes, hint: bytes | None = None) -> bool:
        """Whether any of the token's metadata MAC keys made ``mac`` (two hosts may each have made
        one on a fresh token: both stay valid). A key id not yet known makes the list be read again."""
        data = domain + b"\x00" + payload
        for attempt in (1, 2):
            keys = self._reader_macs
            if attempt == 2 or not keys or (hint is not None and hint not in keys):
                fresh = objects.singleton_keys(self._ts, META_MAC_LABEL)
                if attempt == 2 and fresh == keys:
                    return False
                self._reader_macs = keys = fresh
            ordered = ([hint] if hint in keys else []) + [k for k in keys if k != hint]
            for key_id in ordered:
                if objects.hmac_sha256_verify(self._ts, key_id, data, mac):
                    return True
        return False

    def authenticate(self, domain: bytes, payload: bytes) -> bytes:
        """HMAC-SHA256 inside the token, under the keyring's MAC key, of ``domain || 0x00 || payload``.

        The one mechanism that authenticates every keymgr record kept on this token
        (the custodian register uses it); ``domain`` separates the kinds of record."""
        return self._mac(domain, payload)[1]

    def verify_authentic(self, domain: bytes, payload: bytes, mac: bytes) -> bool:
        """Check a MAC made by :meth:`authenticate` (the token compares)."""
        return self._mac_holds(domain, payload, mac)

    # -- reading ----------------------------------------------------------------------

    def reload(self) -> None:
        """Read the objects that are new on the token since the last look, verify them, fold."""
        with self._reloading:
            started = time.monotonic()
            present, new = objects.scan_data_objects(self._ts, application=APPLICATION, memo=self._scan)
            changed: set[str] = set()
            refused: errors.IntegrityError | None = None
            for handle, label, value in new:
                if label in self._owner:
                    continue
                try:
                    name = self._ingest(label, value)
                except errors.IntegrityError as exc:
                    # take in every genuine object all the same, and read this one again next time:
                    # the refusal stands as long as the forged object does
                    self._scan.labels.pop(handle, None)
                    refused = refused or exc
                    warn_once(log, label, "%s: refused (every operation fails until it is removed; "
                              "docs/security.md)", exc)
                    continue
                if name is not None:
                    changed.add(name)
            with self._lock:
                self._present = present
                self._rebuild(changed)
                self._loaded_at = time.monotonic()
            log.debug("token %r: keyring scan: %d objects, %d read, keys changed: %s (%.1f ms)", self._ts.label,
                      len(present), len(new), sorted(changed) or "none", 1000 * (time.monotonic() - started))
            if refused is not None:
                raise refused

    def _ingest(self, label: str, value: bytes) -> str | None:
        """Verify and take in one object; the key it belongs to, or None if it is no keyring object."""
        if label.startswith(FACT_PREFIX):
            kind, domain, facts = "fact", _FACT_DOMAIN, None
        elif label.startswith(SNAPSHOT_PREFIX):
            kind, domain, facts = "snapshot", _SNAPSHOT_DOMAIN, None
        elif label.startswith(LEGACY_PREFIX):
            kind, domain, facts = "record", _LEGACY_DOMAIN, None
        else:
            return None
        what = f"keyring {kind} {label!r} on token {self._ts.label!r} is not authentic"
        try:
            envelope = json.loads(value)
            inner = envelope[kind]
            mac = bytes.fromhex(envelope["mac"])
            hint = bytes.fromhex(envelope["key"]) if "key" in envelope else None
            payload = canonical_json(inner)
        except (ValueError, KeyError, TypeError):
            raise errors.IntegrityError(what) from None
        if not self._mac_holds(domain, payload, mac, hint):
            raise errors.IntegrityError(what)
        try:
            if kind == "fact":
                facts = [Fact.from_json(inner)]
                name, expected = facts[0].name, f"{FACT_PREFIX}{facts[0].name}/{facts[0].fact_id}"
                covers: list[str] = []
            elif kind == "snapshot":
                name = validate_name(inner["n"])
                facts = [Fact.from_json(f) for f in inner["facts"]]
                covers = [str(c) for c in inner["covers"]]
                expected = f"{SNAPSHOT_PREFIX}{name}/{inner['id']}"
                if any(f.name != name for f in facts):
                    raise ValueError("a snapshot holds facts of one key")
            else:
                record = KeyRecord.from_json(inner)
                name, expected, covers = record.name, f"{LEGACY_PREFIX}{record.name}/{record.generation}", []
                facts = facts_of_record(record, restored=False, seed=f"{label}/{envelope['mac']}")
                if label != expected:
                    raise errors.IntegrityError(f"{what} (its label does not match its content)")
                with self._lock:  # keymgr before facts read the newest generation only: so do we
                    best = self._legacy.get(name)
                    if best is None or record.generation > best[0]:
                        self._legacy[name] = (record.generation, facts)
                    self._owner[label] = name
                return name
        except errors.IntegrityError:
            raise
        except (ValueError, KeyError, TypeError, errors.KeymgrError) as exc:
            raise errors.IntegrityError(what) from exc
        if label != expected:
            raise errors.IntegrityError(f"{what} (its label does not match its content)")
        validate_name(name)
        with self._lock:
            known = self._facts.setdefault(name, {})
            for fact in facts:
                known.setdefault(fact.fact_id, fact)
            self._owner[label] = name
            seen = time.monotonic()
            for covered in covers:
                self._covered.setdefault(covered, (seen, str(inner.get("at", ""))))
        return name

    def _all_facts(self, name: str) -> list[Fact]:
        legacy = self._legacy.get(name)
        known = self._facts.get(name, {})
        return list(known.values()) + [f for f in (legacy[1] if legacy else []) if f.fact_id not in known]

    def _rebuild(self, names: Iterable[str]) -> None:
        changed = False
        for name in names:
            record = fold(name, self._all_facts(name))
            if record is not None:
                self._records[name] = record
                changed = True
        if changed:
            self._by_id = {v.key_id: (rec.name, v.version) for rec in self._records.values() for v in rec.versions}

    def _fresh(self) -> None:
        if time.monotonic() - self._loaded_at <= self.refresh_interval and self._refresh_error is None:
            return  # the per-message path
        error, self._refresh_error = self._refresh_error, None
        if error is not None:
            raise error
        if time.monotonic() - self._loaded_at <= self.refresh_interval:
            return
        if self._loaded_at == 0.0:
            self.reload()
            return
        with self._lock:
            thread = self._refresher
            if self._closed or (thread is not None and thread.is_alive()):
                return
            self._refresher = threading.Thread(target=self._refresh_in_background, daemon=True,
                                               name="keymgr-keyring-refresh")
            self._refresher.start()

    def _refresh_in_background(self) -> None:
        try:
            marker = registers.read_register_cached(self._ts, CHANGES_REGISTER)
            if marker == self._marker and time.monotonic() - self._full_at < self.full_refresh_interval:
                self._loaded_at = time.monotonic()  # nobody wrote since the last look: one attribute read
                log.debug("token %r: keyring refresh: changes register unchanged, no scan", self._ts.label)
                return
            log.debug("token %r: keyring refresh: %s, full scan", self._ts.label,
                      "changes register moved" if marker != self._marker else "full refresh interval passed")
            self.reload()
            self._marker, self._full_at = marker, time.monotonic()
            self._sweep_covered()
        except errors.IntegrityError as exc:
            self._refresh_error = exc  # the next caller sees it: a forged object fails closed
        except errors.KeymgrError as exc:
            self._loaded_at = time.monotonic()  # the token was busy or away: try again next interval
            log.debug("token %r: keyring refresh failed, tried again in %g s: %s", self._ts.label,
                      self.refresh_interval, exc)

    def _look_again(self, found: Callable[[], bool]) -> None:
        """After a miss: read the token again; if that still does not show what ``found`` looks
        for, then, at most every :attr:`reread_interval` seconds, re-initialise the module and read
        once more (SoftHSM can keep a stale view of objects other processes wrote: STACK-FACTS 21;
        a C_Initialize costs a re-login and a re-read of every token in the module, so a stream of
        unknown ids must not pay it each time)."""
        log.debug("token %r: a key name or id is not known here: reading the keyring again", self._ts.label)
        self.reload()
        if found():
            return
        if time.monotonic() - self._reread_at >= self.reread_interval:
            self._reread_at = time.monotonic()
            self._ts.reread()
            self.reload()

    def records(self) -> list[KeyRecord]:
        self._fresh()
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.name)

    def get(self, name: str) -> KeyRecord:
        if time.monotonic() - self._loaded_at > self.refresh_interval or self._refresh_error is not None:
            self._fresh()  # its first test, inline: the per-message path (twice per message) makes no call
        if type(name) is str:  # the per-message path: a name found was validated when it was stored
            record = self._records.get(name)  # one dict read, atomic: the lock guards writers
            if record is not None:
                return record
        validate_name(name)
        self._look_again(lambda: name in self._records)
        record = self._records.get(name)
        if record is not None:
            return record
        raise errors.KeyNotFoundError(f"no key named {name!r} on token {self._ts.label!r}")

    def current(self, name: str) -> KeyRecord | None:
        """The record of ``name`` held now (re-read when due), or None: no lookup on the token.
        For callers that compare it by identity with a record they checked before."""
        if time.monotonic() - self._loaded_at > self.refresh_interval or self._refresh_error is not None:
            self._fresh()  # its first test, inline: the per-message path (a cached decrypt) makes no call
        return self._records.get(name)

    def find_by_id(self, key_id: bytes) -> tuple[KeyRecord, KeyVersion]:
        """Which named key and version a CKA_ID belongs to (ciphertexts carry only the id). A miss
        reads the token again, then re-initialises and reads once more, before it fails."""
        if time.monotonic() - self._loaded_at > self.refresh_interval or self._refresh_error is not None:
            self._fresh()  # its first test, inline: the per-message path makes no call
        where = self._by_id.get(key_id)  # one dict read, atomic: the lock guards writers
        if where is None:
            self._look_again(lambda: key_id in self._by_id)
            where = self._by_id.get(key_id)
        if where is None:
            raise errors.KeyNotFoundError(f"no key version with id {key_id.hex()} on token {self._ts.label!r}")
        record = self._records[where[0]]
        return record, record.version(where[1])

    def facts(self, name: str) -> list[Fact]:
        """Every fact of ``name`` this process has seen (rotation reads epochs and clocks from them)."""
        with self._lock:
            return self._all_facts(name)

    # -- writing ----------------------------------------------------------------------

    def add(self, name: str, kind: str, body: Mapping[str, Any]) -> KeyRecord | None:
        """Write one fact about ``name`` and return the record as this process now sees it. The
        fact carries the key's logical clock (one more than any this process has seen), which
        orders suspend and resume and the history people read, never the wall clock."""
        return self._put(name, [Fact(kind, name, new_fact_id(), self.now(), {"lc": self.next_clock(name), **body})])

    def next_clock(self, name: str) -> int:
        with self._lock:
            return 1 + max((f.body.get("lc", 0) for f in self._facts.get(name, {}).values()), default=0)

    def _put(self, name: str, facts: list[Fact], covers: list[str] | None = None) -> KeyRecord | None:
        """Write ``facts`` as one object (atomic: a create or a restore appears whole or not at all)."""
        if len(facts) == 1 and covers is None:
            inner, kind, domain = facts[0].to_json(), "fact", _FACT_DOMAIN
            label = f"{FACT_PREFIX}{name}/{facts[0].fact_id}"
        else:
            sid = new_fact_id()
            inner = {"n": name, "id": sid, "at": self.now(), "facts": [f.to_json() for f in facts],
                     "covers": covers or []}
            kind, domain, label = "snapshot", _SNAPSHOT_DOMAIN, f"{SNAPSHOT_PREFIX}{name}/{sid}"
        key_id, mac = self._mac(domain, canonical_json(inner))
        value = canonical_json({kind: inner, "mac": mac.hex(), "key": key_id.hex()})
        objects.write_data_object(self._ts, application=APPLICATION, label=label, value=value)
        self._mark_changed()
        with self._lock:
            known = self._facts.setdefault(name, {})
            for fact in facts:
                known.setdefault(fact.fact_id, fact)
            self._owner[label] = name
            self._present.add(label)
            seen = time.monotonic()
            for covered in covers or []:
                self._covered.setdefault(covered, (seen, inner.get("at", "")))
            self._rebuild([name])
            record = self._records.get(name)
        if covers is None:
            self._maybe_compact(name)
        return record

    def _mark_changed(self) -> None:
        try:
            registers.write_register(self._ts, CHANGES_REGISTER, os.urandom(8).hex())
        except errors.KeymgrError as exc:  # readers re-read everything every full_refresh_interval
            log.debug("token %r: setting the keyring's changes register failed: %s", self._ts.label, exc)

    def forget_object(self, label: str) -> None:
        """Destroy an object of this keyring that nothing needs any more (a use counter's own
        superseded total). Its facts stay in every view that has read them."""
        objects.destroy_data_object(self._ts, application=APPLICATION, label=label)
        with self._lock:
            self._present.discard(label)

    def fact_label(self, name: str, fact_id: str) -> str:
        return f"{FACT_PREFIX}{name}/{fact_id}"

    def add_uses(self, name: str, key_id: bytes, total: int) -> str:
        """Record this writer's running total of reservations under ``key_id``; the fact's id."""
        fact = Fact("uses", name, new_fact_id(), self.now(), {"kid": key_id.hex(), "w": self.writer, "total": total})
        # no logical clock: a use count orders nothing
        self._put(name, [fact])
        return fact.fact_id

    def _maybe_compact(self, name: str) -> None:
        with self._lock:
            loose = sorted(label for label in self._present if self._owner.get(label) == name)
            if sum(label not in self._covered for label in loose) <= self.compact_at:
                # objects a snapshot already covers do not count; they go when their grace is over
                pending = any(label in self._covered for label in loose)
                facts = None
            else:
                facts = self._compacted(name)
        if facts is None:
            if pending:
                self._sweep_covered()
            return
        self._put(name, facts, covers=loose)
        log.debug("token %r: key %r: compacted %d objects (%d facts) into one snapshot", self._ts.label, name,
                  len(loose), len(facts))
        self._sweep_covered()

    def _compacted(self, name: str) -> list[Fact]:
        """Every fact of ``name``, less what no reader needs: per use counter only its highest
        total, and pending facts whose version fact exists."""
        facts = self._all_facts(name)
        named = {f.kid for f in facts if f.kind == "version"}
        best: dict[tuple[str, str], Fact] = {}
        kept = []
        for fact in facts:
            if fact.kind == "uses":
                slot = (fact.kid, fact.body["w"])
                if slot not in best or fact.body["total"] > best[slot].body["total"]:
                    best[slot] = fact
            elif not (fact.kind == "pending" and fact.kid in named):
                kept.append(fact)
        return sorted(kept + list(best.values()), key=lambda f: f.fact_id)

    def _sweep_covered(self) -> None:
        """Destroy objects a snapshot covers once their grace period is over (module docstring)."""
        moment = time.monotonic()
        wall = parse_utc(self.now())
        with self._lock:
            due = []
            for label, (seen, at) in list(self._covered.items()):
                if label not in self._present:
                    continue
                old = bool(at) and wall - parse_utc(at) >= self.stale_after
                if moment - seen >= self.grace or old:
                    due.append(label)
        for label in due:
            try:
                objects.destroy_data_object(self._ts, application=APPLICATION, label=label)
            except errors.KeymgrError as exc:
                log.debug("token %r: sweeping %r failed, tried again later: %s", self._ts.label, label, exc)
                return  # best effort: the change that led here is written; the next sweep tries again
            with self._lock:
                self._present.discard(label)
                self._covered.pop(label, None)
        if due:
            log.debug("token %r: swept %d objects covered by snapshots", self._ts.label, len(due))
            self._mark_changed()

    # -- keys -------------------------------------------------------------------------

    def new_key_id(self) -> bytes:
        return os.urandom(16)

    def create(self, name: str, *, profile: str = DEFAULT_PROFILE, policy: KeyPolicy | None = None) -> KeyRecord:
        """Generate version 1 of a new named key inside the token (never from a value given:
        a key keymgr did not generate never encrypts, :mod:`keymgr.keyring.provenance`)."""
        validate_name(name)
        policy = check_policy(policy or KeyPolicy())
        template = version_template(profile, policy)
        self.reload()
        if name in self._records:
            raise errors.KeyExistsError(f"a key named {name!r} already exists on token {self._ts.label!r}")
        key_id = self.new_key_id()
        pending = self.add_pending(name, key_id, 1)
        try:
            objects.generate_key(self._ts, template, label=f"{name}/v1", key_id=key_id)
            record = self._record_first_version(name, key_id, profile=profile, policy=policy)
        except BaseException:
            self.discard_unrecorded(name, key_id, pending=pending)
            raise
        if record is None:  # pragma: no cover - the facts were just written
            raise errors.KeyNotFoundError(f"key {name!r} was created but cannot be read back; retry")
        self.reload()  # another host may have created the same name at the same moment
        merged = self._records.get(name, record)
        if merged.profile != profile:
            raise errors.KeyExistsError(
                f"another host created key {name!r} with profile {merged.profile!r} at the same moment; the "
                f"version made here (profile {profile!r}) stays, decrypt-only, and the key is the other host's")
        return merged

    def _record_first_version(self, name: str, key_id: bytes, *, profile: str, policy: KeyPolicy) -> KeyRecord | None:
        """Write, as one object, the facts of a new key whose version 1 is the key object under
        ``key_id`` (just generated): its profile and policy, and the version with its check value."""
        now = self.now()
        facts = [Fact("key", name, new_fact_id(), now, {"profile": profile, "policy": asdict(policy)}),
                 Fact("version", name, new_fact_id(), now,
                      {"kid": key_id.hex(), "num": 1, "kcv": objects.check_value(self._ts, key_id),
                       "epoch": 1, "restored": False, "prof": profile})]
        return self._put(name, facts, covers=[])

    def restore(self, record: KeyRecord) -> KeyRecord:
        """Write a restored key's record (versions unwrapped from a backup) as one snapshot: every
        version is marked restored, so it decrypts but never encrypts (a rotation gives the key a
        fresh version generated here)."""
        written = self._put(record.name, facts_of_record(record, restored=True), covers=[])
        if written is None:  # pragma: no cover
            raise errors.KeyNotFoundError(f"key {record.name!r} was restored but cannot be read back")
        return written

    def add_pending(self, name: str, key_id: bytes, number: int) -> str:
        """Write the fact that a key object for version ``number`` is about to be generated under
        ``key_id`` (module docstring, "Orphans"); its object's label, for :meth:`discard_unrecorded`."""
        fact_id = new_fact_id()
        label = self.fact_label(name, fact_id)
        try:
            self._put(name, [Fact("pending", name, fact_id, self.now(),
                                  {"lc": self.next_clock(name), "kid": key_id.hex(), "num": number})])
        except BaseException:  # an interrupt as the write returned: nothing was generated, take it back
            with interrupts.deferred_signals(), contextlib.suppress(errors.KeymgrError):
                if label not in self._covered:
                    self.forget_object(label)
            raise
        return label

    def discard_unrecorded(self, name: str, key_id: bytes, *, pending: str | None = None) -> None:
        """After a failed or interrupted create or rotate, destroy the new key object unless a
        version fact names it (the write happened and only its answer was lost), and then the
        ``pending`` fact's object, which names nothing any more (a snapshot that took it in keeps
        it: inert). Signals are held meanwhile. Best effort: an object left behind is named by its
        pending fact and swept later (:meth:`sweep_orphans`)."""
        with interrupts.deferred_signals():
            try:
                self.reload()
                if key_id in self._by_id:
                    return
                objects.destroy_key(self._ts, key_id)
                log.debug("token %r: key %r: destroyed the key object (id %s) of a create or rotation that did "
                          "not finish", self._ts.label, name, key_id.hex())
                if pending is not None and pending in self._present and pending not in self._covered:
                    self.forget_object(pending)
                    self._mark_changed()
            except errors.KeymgrError as exc:
                log.debug("token %r: key %r: cleaning up after a failed create or rotation failed (swept "
                          "later): %s", self._ts.label, name, exc)

    def orphans(self, name: str) -> list[tuple[str, bytes]]:
        """Key objects labelled ``NAME/vN`` that no version fact of ``name`` names, and objects of
        versions the facts say are destroyed: (label, CKA_ID)."""
        record = self._records.get(name)
        named = {v.key_id: v for v in record.versions} if record else {}
        prefix = f"{name}/v"
        found = []
        for label, key_id in objects.list_secret_keys(self._ts):
            if label.startswith(prefix) and label[len(prefix):].isdigit():
                version = named.get(key_id)
                if version is None or version.state == "destroyed":
                    found.append((label, key_id))
        return found

    def sweep_orphans(self, name: str) -> int:
        """Destroy what :meth:`orphans` finds that surely protects nothing: objects whose pending
        fact is older than :attr:`orphan_grace` and that no version fact names, even after a
        re-initialise (STACK-FACTS 21). Returns how many. An object of a version the facts call
        destroyed is never swept: facts alone never destroy a key (a PIN holder can write them);
        ``keymgr key verify`` reports it and ``keymgr key destroy`` finishes it, with its checks."""
        if not self._sweepable(name):
            return 0
        self._ts.reread()  # only now: a re-initialise costs a login, which rewrites SoftHSM's token file
        self.reload()
        swept = 0
        for key_id in self._sweepable(name):
            objects.destroy_key(self._ts, key_id)
            log.debug("token %r: key %r: swept orphaned key object (id %s): its pending fact is older than %s and "
                      "no version names it", self._ts.label, name, key_id.hex(), self.orphan_grace)
            swept += 1
        return swept

    def _sweepable(self, name: str) -> list[bytes]:
        pending = {bytes.fromhex(f.kid): f.at for f in self.facts(name) if f.kind == "pending"}
        wall = parse_utc(self.now())
        found = []
        for _, key_id in self.orphans(name):
            stamp = pending.get(key_id)
            if key_id not in self._by_id and stamp and wall - parse_utc(stamp) >= self.orphan_grace:
                found.append(key_id)
        return found

    # -- provenance ---------------------------------------------------------------------

    def check_encrypts(self, record: KeyRecord, version: KeyVersion) -> None:
        """Refuse (PolicyError) a version whose key object does not prove that the token made it
        and that it can never leave (:func:`keymgr.keyring.provenance.encrypt_refusal`); checked once per
        version and key object per Keyring (each KeyManager has one)."""
        last = self._last_trusted
        if last[0] is version and self._handles.get(last[2]) is last[1]:
            return  # the per-message path: this very version, through this very object, passed
        slot = (version.key_id, objects.cached_key_handle(self._ts, version.key_id))
        try:
            refusal = self._trust[slot]
        except KeyError:
            refusal = provenance.encrypt_refusal(self._ts, record, version)
            if refusal is not None:
                log.warning("token %r: %s", self._ts.label, refusal)
            # tied to the object checked: one found anew under the CKA_ID (destroyed and replaced by a
            # PIN holder, or a new session) is checked again before it encrypts
            self._trust[(version.key_id, objects.cached_key_handle(self._ts, version.key_id))] = refusal
        if refusal is not None:
            raise errors.PolicyError(refusal)
        slot_key = objects.key_cache_slot(version.key_id)
        self._last_trusted = (version, self._handles.get(slot_key), slot_key)

    def with_policy(self, name: str, policy: KeyPolicy) -> KeyRecord:
        """Change ``name``'s lifecycle policy (latest change wins on every host). ``backup`` is fixed
        at creation: EXTRACTABLE cannot be turned on for existing versions."""
        check_policy(policy)
        record = self.get(name)
        if policy.backup != record.policy.backup:
            raise errors.PolicyError(f"key {name!r}: backup capability is fixed when the key is created")
        written = self.add(name, "policy", {"policy": asdict(policy)})
        return written or replace(record, policy=policy)
