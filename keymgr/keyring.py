"""The keyring: named keys, their versions and states, kept in the token itself.

The token is the source of truth for everything needed to decrypt (DESIGN.md,
"Where state lives"). Each named key has one metadata record, stored as a
private CKO_DATA object (application ``keymgr``) and authenticated by an
HMAC-SHA256 computed *inside* the token by a dedicated non-extractable MAC key,
so an edited record is detected; a record names itself and its generation
inside the MAC, so records cannot be swapped between keys or replayed under a
newer generation number.

Updates are crash-safe without transactions: data-object values are
read-only on SoftHSM, so an update writes generation ``n+1`` as a new object
and then deletes generation ``n``. Readers take the highest generation; a
crash between the two steps leaves both, which the next write cleans up.
Two writers racing for the same generation are detected after the write
(the loser gets a :class:`~keymgr.errors.ConfigurationError` asking to retry).

Key versions are AES-256 objects labelled ``NAME/vN`` with a random 16-byte
CKA_ID; ciphertexts name the CKA_ID, never the key name.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from keymgr import errors
from keymgr.hsm import objects
from keymgr.hsm.sessions import TokenSession
from keymgr.templates import KEK_GCM, KEK_WRAP, MAC_KEY, KeyTemplate, backup_capable

__all__ = ["KeyRecord", "KeyVersion", "KeyPolicy", "Keyring", "DEFAULT_PROFILE", "PROFILES", "validate_name", "utc_now",
           "version_template"]

APPLICATION = "keymgr"
RECORD_PREFIX = "keymgr/key/"
META_MAC_ID = b"keymgr/meta-mac"
META_MAC_LABEL = "keymgr/meta-mac"
FORMAT = 1

#: Key-encryption profiles: how a KEK protects data keys (docs/format.md).
PROFILES: Mapping[str, KeyTemplate] = {"kw": KEK_WRAP, "gcm": KEK_GCM}
#: The profile of keys created without one: standard RFC 3394 key wrap, which OpenSSL and every
#: CMS reader understand, needs no nonce and works on FIPS-mode HSMs that refuse caller-chosen
#: GCM IVs; measured against ``gcm`` in docs/performance.md ("Default profile").
DEFAULT_PROFILE = "kw"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise errors.ConfigurationError(
            f"invalid key name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def utc_now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class KeyPolicy:
    """Per-key lifecycle policy (NIST SP 800-57 cryptoperiod; SP 800-38D use bound)."""

    rotate_after_days: int | None = None
    max_messages: int | None = None
    auto_rotate: bool = False
    #: versions are created backup-capable (EXTRACTABLE only under a trusted transport key;
    #: keymgr.custody.ceremony); fixed at creation: EXTRACTABLE cannot be turned on later
    backup: bool = False


def version_template(profile: str, policy: KeyPolicy) -> KeyTemplate:
    """The template every version of a key with this profile and policy is generated from."""
    if profile not in PROFILES:
        raise errors.ConfigurationError(f"unknown key profile {profile!r} (choose from {', '.join(PROFILES)})")
    return backup_capable(PROFILES[profile]) if policy.backup else PROFILES[profile]


@dataclass(frozen=True)
class KeyVersion:
    """One version of a named key: a KEK object in the token."""

    version: int
    key_id: bytes
    state: str
    created: str
    history: tuple[tuple[str, str], ...] = ()
    kcv: str | None = None
    #: encryptions reserved under this version so far (keymgr.rotation: max_messages, the GCM bound)
    uses: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "id": self.key_id.hex(), "state": self.state, "created": self.created,
                "history": [list(h) for h in self.history], "kcv": self.kcv, "uses": self.uses}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KeyVersion:
        return cls(version=int(data["version"]), key_id=bytes.fromhex(data["id"]), state=str(data["state"]),
                   created=str(data["created"]), history=tuple((str(a), str(b)) for a, b in data.get("history", [])),
                   kcv=data.get("kcv"), uses=int(data.get("uses", 0)))


@dataclass(frozen=True)
class KeyRecord:
    """A named key: its versions, which one is primary, its profile and policy."""

    name: str
    profile: str
    primary: int
    versions: tuple[KeyVersion, ...]
    policy: KeyPolicy = field(default_factory=KeyPolicy)
    generation: int = 1
    created: str = ""
    #: versions below this no longer decrypt (Vault's min_decryption_version; keymgr.rotation.retire)
    min_decryption_version: int = 1

    def version(self, number: int) -> KeyVersion:
        for v in self.versions:
            if v.version == number:
                return v
        raise errors.KeyNotFoundError(f"key {self.name!r} has no version {number}")

    @functools.cached_property
    def primary_version(self) -> KeyVersion:
        """The primary's version (looked up once per record: records are immutable, and every
        message asks for it several times)."""
        return self.version(self.primary)

    def label_of(self, number: int) -> str:
        return f"{self.name}/v{number}"

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "name": self.name, "profile": self.profile, "primary": self.primary,
                "generation": self.generation, "created": self.created, "policy": asdict(self.policy),
                "versions": [v.to_json() for v in self.versions], "min_decryption_version": self.min_decryption_version}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KeyRecord:
        if data.get("format") != FORMAT:
            raise errors.FormatError("unsupported keyring record format")
        return cls(name=str(data["name"]), profile=str(data["profile"]), primary=int(data["primary"]),
                   versions=tuple(KeyVersion.from_json(v) for v in data["versions"]),
                   policy=KeyPolicy(**data.get("policy", {})), generation=int(data["generation"]),
                   created=str(data.get("created", "")),
                   min_decryption_version=int(data.get("min_decryption_version", 1)))


def _canonical(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")


class Keyring:
    """Named, versioned keys on one token. Thread-safe; cheap to re-read."""

    def __init__(self, ts: TokenSession, *, clock: Callable[[], str] = utc_now) -> None:
        self._ts = ts
        self._clock = clock
        self._lock = threading.RLock()
        self._records: dict[str, KeyRecord] = {}
        self._by_id: dict[bytes, tuple[str, int]] = {}
        self._loaded_at = 0.0
        self.refresh_interval = 1.0
        self._mac_key_ready = False  # set once ensure_key found or made it (once per process and keyring)

    @property
    def token(self) -> TokenSession:
        return self._ts

    # -- the metadata MAC key ---------------------------------------------------

    def _ensure_mac_key(self) -> None:
        if not self._mac_key_ready:
            objects.ensure_key(self._ts, MAC_KEY, label=META_MAC_LABEL, key_id=META_MAC_ID)
            self._mac_key_ready = True

    def _mac(self, payload: bytes) -> bytes:
        return objects.hmac_sha256(self._ts, META_MAC_ID, b"keymgr keyring record v1\x00" + payload)

    def authenticate(self, domain: bytes, payload: bytes) -> bytes:
        """HMAC-SHA256 inside the token, under the keyring's MAC key, of ``domain || 0x00 || payload``.

        The one mechanism that authenticates every keymgr record kept on this token
        (the custodian register uses it); ``domain`` separates the kinds of record."""
        self._ensure_mac_key()
        return objects.hmac_sha256(self._ts, META_MAC_ID, domain + b"\x00" + payload)

    def verify_authentic(self, domain: bytes, payload: bytes, mac: bytes) -> bool:
        """Check a MAC made by :meth:`authenticate` (the token compares)."""
        if not objects.key_exists(self._ts, META_MAC_ID):
            return False
        return objects.hmac_sha256_verify(self._ts, META_MAC_ID, domain + b"\x00" + payload, mac)

    # -- reading ----------------------------------------------------------------

    def reload(self) -> None:
        """Read every record from the token and verify its MAC."""
        raw = objects.read_data_objects(self._ts, application=APPLICATION)
        newest: dict[str, tuple[int, KeyRecord]] = {}
        for label, value in raw:
            if not label.startswith(RECORD_PREFIX):
                continue
            record = self._verify(label, value)
            current = newest.get(record.name)
            if current is None or record.generation > current[0]:
                newest[record.name] = (record.generation, record)
        with self._lock:
            self._records = {name: rec for name, (_, rec) in newest.items()}
            self._by_id = {v.key_id: (rec.name, v.version) for rec in self._records.values() for v in rec.versions}
            self._loaded_at = time.monotonic()

    def _verify(self, label: str, value: bytes) -> KeyRecord:
        what = f"keyring record {label!r} on token {self._ts.label!r}"
        try:
            envelope = json.loads(value)
            payload = _canonical(envelope["record"])
            mac = bytes.fromhex(envelope["mac"])
        except (ValueError, KeyError, TypeError):
            raise errors.IntegrityError(f"{what} is not authentic") from None
        if not objects.hmac_sha256_verify(self._ts, META_MAC_ID, b"keymgr keyring record v1\x00" + payload, mac):
            raise errors.IntegrityError(f"{what} is not authentic")
        try:
            record = KeyRecord.from_json(envelope["record"])
        except (ValueError, KeyError, TypeError) as exc:
            raise errors.IntegrityError(f"{what} is not authentic") from exc
        if label != f"{RECORD_PREFIX}{record.name}/{record.generation}":
            raise errors.IntegrityError(f"{what} is not authentic (label does not match its content)")
        return record

    def _fresh(self) -> None:
        if time.monotonic() - self._loaded_at > self.refresh_interval:
            self.reload()

    def records(self) -> list[KeyRecord]:
        self._fresh()
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.name)

    def get(self, name: str) -> KeyRecord:
        self._fresh()
        if type(name) is str:  # the per-message path: a name found was validated when it was stored
            record = self._records.get(name)  # one dict read, atomic: the lock guards writers
            if record is not None:
                return record
        validate_name(name)
        with self._lock:
            record = self._records.get(name)
        if record is None:
            self.reload()
            with self._lock:
                record = self._records.get(name)
        if record is None:
            raise errors.KeyNotFoundError(f"no key named {name!r} on token {self._ts.label!r}")
        return record

    def current(self, name: str) -> KeyRecord | None:
        """The record of ``name`` held now (re-read when due), or None: no lookup on the token.
        For callers that compare it by identity with a record they checked before."""
        self._fresh()
        return self._records.get(name)

    def find_by_id(self, key_id: bytes) -> tuple[KeyRecord, KeyVersion]:
        """Which named key and version a CKA_ID belongs to (ciphertexts carry only the id)."""
        self._fresh()
        where = self._by_id.get(key_id)  # one dict read, atomic: the lock guards writers
        if where is None:
            self.reload()
            with self._lock:
                where = self._by_id.get(key_id)
        if where is None:
            raise errors.KeyNotFoundError(f"no key version with id {key_id.hex()} on token {self._ts.label!r}")
        record = self.get(where[0])
        return record, record.version(where[1])

    # -- writing ----------------------------------------------------------------

    def write(self, record: KeyRecord) -> KeyRecord:
        """Store ``record`` as the next generation, then delete older generations."""
        self._ensure_mac_key()
        with self._lock:
            previous = self._records.get(record.name)
            generation = (previous.generation + 1) if previous else 1
            record = replace(record, generation=generation)
            payload_data = record.to_json()
            payload = _canonical(payload_data)
            mac = self._mac(payload)
            value = _canonical({"record": payload_data, "mac": mac.hex()})
            prefix = f"{RECORD_PREFIX}{record.name}/"
            label = f"{prefix}{generation}"
            labels = {lbl for lbl, _ in objects.read_data_objects(self._ts, application=APPLICATION)}
            if label in labels:
                raise errors.ConfigurationError(
                    f"key {record.name!r} was changed by another process at the same time; retry")
            objects.write_data_object(self._ts, application=APPLICATION, label=label, value=value)
            # the older generations still on the token (one, or a few a crash left), not every
            # number below this one: a find per past generation made each write slower with age
            for old in sorted(labels):
                number = old[len(prefix):] if old.startswith(prefix) else ""
                if number.isdigit() and int(number) < generation:
                    objects.destroy_data_object(self._ts, application=APPLICATION, label=old)
            self._records[record.name] = record
            for v in record.versions:
                self._by_id[v.key_id] = (record.name, v.version)
            return record

    def new_key_id(self) -> bytes:
        return os.urandom(16)

    def create(self, name: str, *, profile: str = DEFAULT_PROFILE, policy: KeyPolicy | None = None,
               _value: bytes | None = None) -> KeyRecord:
        """Generate version 1 of a new named key inside the token.

        ``_value`` is for interop tests only: the key is imported with that known value
        instead of being generated (:mod:`keymgr.hsm.known_keys`), so that a test can hand
        the same KEK to ``openssl cms``. Such a key is not ALWAYS_SENSITIVE, and is no keymgr key.
        """
        validate_name(name)
        template = version_template(profile, policy or KeyPolicy())
        self.reload()
        with self._lock:
            if name in self._records:
                raise errors.ConfigurationError(f"a key named {name!r} already exists on token {self._ts.label!r}")
            key_id = self.new_key_id()
            try:
                if _value is None:
                    objects.generate_key(self._ts, template, label=f"{name}/v1", key_id=key_id)
                else:
                    from keymgr.hsm.known_keys import import_secret_key

                    import_secret_key(self._ts, template, label=f"{name}/v1", key_id=key_id, value=_value)
                now = self._clock()
                version = KeyVersion(1, key_id, "active", now, (("active", now),),
                                     objects.check_value(self._ts, key_id))
                record = KeyRecord(name=name, profile=profile, primary=1, versions=(version,),
                                   policy=policy or KeyPolicy(), created=now)
                return self.write(record)
            except BaseException:
                self._discard_unrecorded(key_id)
                raise

    def _discard_unrecorded(self, key_id: bytes) -> None:
        """After a failed create, destroy the new key object unless its record reached the token
        (the write happened and only its answer was lost), so no key lives outside the keyring.
        Best effort: if the token is gone the orphan stays; it is named by no record, so never used."""
        try:
            self.reload()
            if key_id not in self._by_id:
                objects.destroy_key(self._ts, key_id)
        except errors.KeymgrError:
            pass
