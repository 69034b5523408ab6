"""Data keys protected by KEKs that live in a token: the envelope's token glue.

Two key-encryption profiles (chosen per key at creation, docs/format.md):

* ``kw``: the data key is wrapped with C_WrapKey, AES key wrap (RFC 3394,
  ``id-aes256-wrap``; RFC 5649 ``id-aes256-wrap-pad`` where the token has no
  plain KW). The standard form that OpenSSL and every CMS library read.
  Costs a short-lived key object per wrap and per unwrap (STACK-FACTS.md 5).
* ``gcm``: the data key is encrypted by one C_Encrypt with AES-256-GCM under
  the KEK (``id-aes256-GCM`` with its nonce in the parameters). One token
  call per message, no key objects; random 96-bit nonces, so each KEK version
  is good for at most 2^32 encryptions (NIST SP 800-38D 8.3), which
  :mod:`keymgr.lifecycle.usage` enforces through the ``reserve`` hook (docs/performance.md,
  "Default profile", says why ``kw`` is the default).

Decrypting checks the key version's state first (suspended and compromised
versions are refused unless the caller allows compromised keys for recovery),
so a retired key cannot be used through the envelope even with a valid blob.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from asn1crypto import cms

from keymgr import errors
from keymgr._memory import zero
from keymgr.envelope._aead import DataKey
from keymgr.envelope._nonces import random_nonce
from keymgr.envelope.recipients import KekAlgorithm, kek_recipient_der, read_kek_recipient
from keymgr.hsm import objects, probe
from keymgr.hsm.templates import PROFILES, Profile, profile_named
from keymgr.keyring.store import KeyRecord, Keyring, KeyVersion

__all__ = ["KekProtector", "KeyRecipient", "Recipient", "DECRYPTABLE_STATES"]

#: States in which a version may decrypt (unwrap) data keys.
DECRYPTABLE_STATES = frozenset({"active", "decrypt-only"})

_KEKRI_TAG = 0xA2
#: How long a key id that is not on this token is remembered as such (see ``unwrap_der``).
_UNKNOWN_TTL = 1.0
_UNKNOWN_MAX = 1024


def _profile(record: KeyRecord, version: KeyVersion) -> Profile:
    return profile_named(record.profile_of(version))


class Recipient(Protocol):
    """Anything that can carry a data key for someone: a token KEK, a public key, a quorum."""

    @property
    def description(self) -> str: ...

    def wrap(self, dek: DataKey) -> cms.RecipientInfo: ...


class KeyRecipient:
    """The primary version of a named key on some token, as a message recipient."""

    def __init__(self, protector: KekProtector, name: str) -> None:
        self._protector = protector
        self._name = name

    @property
    def description(self) -> str:
        return f"key {self._name!r} on token {self._protector.keyring.token.label!r}"

    def __repr__(self) -> str:
        return f"KeyRecipient({self.description})"

    def wrap(self, dek: DataKey) -> cms.RecipientInfo:
        return self._protector.wrap(self._protector.keyring.get(self._name), dek)


class KekProtector:
    """Wrap data keys for a named key's primary version; unwrap them for any allowed version."""

    def __init__(self, keyring: Keyring, *, allow_compromised: bool = False,
                 on_unwrap: Callable[[KeyRecord, KeyVersion], None] | None = None,
                 reserve: Callable[[KeyRecord], KeyRecord] | None = None) -> None:
        """``reserve`` counts each wrap under a primary and may hand back a newer record
        (:meth:`keymgr.lifecycle.usage.UsageMeter.reserve`: max_messages, the GCM bound, auto-rotation)."""
        self._keyring = keyring
        self._ts = keyring.token  # a keyring's token never changes: read once, not per message
        self._reserve = reserve
        self._allow_compromised = allow_compromised
        self._on_unwrap = on_unwrap
        self._wrap_choice: tuple[str, KekAlgorithm] | None = None
        self._unknown: dict[bytes, float] = {}
        #: the key id in each recipient unwrapped here, for check_der on a decrypt-cache hit
        #: (the cache is keyed by the same DER, so its id was read once already); not secret
        self._kek_ids: dict[bytes, bytes] = {}
        #: the record whose version each such recipient's last check_der passed under: records are
        #: immutable and replaced on every write and reload, so the same object means the same state
        self._passed: dict[bytes, KeyRecord] = {}

    @property
    def keyring(self) -> Keyring:
        return self._keyring

    def _wrap_mechanism(self) -> tuple[str, KekAlgorithm]:
        choice = self._wrap_choice
        if choice is None:  # the probe is per process anyway: look it up once
            mechanism = probe(self._keyring.token).preferred_wrap_mechanism()
            if mechanism is None:
                raise errors.MechanismUnsupportedError(
                    f"token {self._keyring.token.label!r} can do neither AES-KW nor AES-KWP")
            algorithm: KekAlgorithm = "aes256_wrap" if mechanism == "aes-kw" else "aes256_wrap_pad"
            self._wrap_choice = choice = (mechanism, algorithm)
        return choice

    def algorithm_for(self, record: KeyRecord) -> KekAlgorithm:
        """The key-encryption algorithm messages for ``record`` carry on this token."""
        return self._wrap_mechanism()[1] if record.primary_profile.wraps else "aes256_gcm"

    def wrap(self, record: KeyRecord, dek: DataKey, version: KeyVersion | None = None) -> cms.RecipientInfo:
        """A KEKRecipientInfo carrying ``dek`` under ``version`` (default: the primary)."""
        return cms.RecipientInfo.load(self.wrap_der(record, dek, version))

    def wrap_der(self, record: KeyRecord, dek: DataKey, version: KeyVersion | None = None) -> bytes:
        """:meth:`wrap`, as DER: what the per-message path hands to the format layer (one token
        call and a few concatenations; no asn1crypto object)."""
        if version is None:
            if self._reserve is not None:
                record = self._reserve(record)
            version = record.primary_version
        self.check_encrypts(record, version)
        ts = self._ts
        profile = record.primary_profile if version is record.primary_version else _profile(record, version)
        proof = objects.kek_proof(backup_capable=record.policy.backup)  # a session reopened mid-call
        if profile.wraps:
            mechanism, algorithm = self._wrap_mechanism()
            wrapped = objects.wrap_data_key(ts, version.key_id, dek.reveal(), mechanism, proof=proof)
            return kek_recipient_der(version.key_id, wrapped, algorithm)
        nonce = random_nonce()
        sealed = objects.gcm_encrypt(ts, version.key_id, dek.reveal(), nonce=nonce, aad=b"", proof=proof)
        return kek_recipient_der(version.key_id, sealed, "aes256_gcm", gcm_nonce=nonce)

    def check_encrypts(self, record: KeyRecord, version: KeyVersion | None = None, *,
                       provenance: bool = True) -> None:
        """Refuse to encrypt under anything but an active version (the primary, by default):
        checked per wrap, and per message where a cached data key spares the wrap. And refuse a
        version whose key object does not prove the token made it (:mod:`keymgr.keyring.provenance`),
        unless ``provenance`` is False: a cached data key was wrapped, and so checked, under
        that very version, and a message that reuses it never reaches the key object."""
        version = version or record.primary_version
        if version.state != "active":
            raise errors.PolicyError(f"key {record.name!r} version {version.version} is {version.state}; "
                                     "only the active primary version encrypts")
        if provenance:
            self._keyring.check_encrypts(record, version)

    def check_state(self, record: KeyRecord, version: KeyVersion) -> None:
        """Refuse versions that policy says must not decrypt."""
        state = version.state
        if version.version < record.min_decryption_version:
            state = "retired"
        elif state in DECRYPTABLE_STATES:
            return
        if state == "compromised" and self._allow_compromised:
            return
        hint = {"compromised": " (pass allow_compromised=True only to recover data)",
                "suspended": " (an operator must resume it)",
                "destroyed": " (its key object was destroyed: the data is unrecoverable)",
                "pre-active": " (it was never activated)",
                "retired": f" (versions below {record.min_decryption_version} are retired)"}.get(state, "")
        raise errors.PolicyError(f"key {record.name!r} version {version.version} is {state}; "
                                 f"decryption refused{hint}")

    def unwrap(self, ri: cms.RecipientInfo) -> DataKey | None:
        """The data key in ``ri`` if it is for a key of this keyring; None if not ours."""
        return self.unwrap_der(ri.dump())

    def find(self, kek_id: bytes) -> tuple[KeyRecord, KeyVersion] | None:
        """The key version ``kek_id`` names, or None. A miss re-reads the keyring from the token
        (a key made by another process), but an id missed less than a second ago is not
        looked up again: a message whose first recipient is another site's key must not cost
        a keyring reload each time."""
        missed = self._unknown.get(kek_id)
        if missed is not None and time.monotonic() - missed < _UNKNOWN_TTL:
            return None
        try:
            return self._keyring.find_by_id(kek_id)
        except errors.KeyNotFoundError:
            if len(self._unknown) >= _UNKNOWN_MAX:
                self._unknown.clear()
            self._unknown[kek_id] = time.monotonic()
            return None

    def check_der(self, der: bytes) -> None:
        """The state check of :meth:`unwrap_der` alone, for a data key served from a cache: a
        version suspended, retired or destroyed since must stop its cached keys too."""
        if not der or der[0] != _KEKRI_TAG:
            return
        passed = self._passed.get(der)
        if passed is not None and self._keyring.current(passed.name) is passed:
            return
        kek_id = self._kek_ids.get(der)
        found = self.find(read_kek_recipient(der).kek_id if kek_id is None else kek_id)
        if found is not None:
            self.check_state(*found)
            if len(self._passed) >= _UNKNOWN_MAX:
                self._passed.clear()
            self._passed[der] = found[0]

    def unwrap_der(self, der: bytes) -> DataKey | None:
        """:meth:`unwrap` of a recipient given as DER (the per-message path)."""
        if not der or der[0] != _KEKRI_TAG:
            return None
        recipient = read_kek_recipient(der)
        found = self.find(recipient.kek_id)
        if found is None:
            return None
        if len(self._kek_ids) >= _UNKNOWN_MAX:
            self._kek_ids.clear()
        self._kek_ids[der] = recipient.kek_id
        record, version = found
        if self._on_unwrap is not None:  # before the state check: a refusal is attributed too (audit)
            self._on_unwrap(record, version)
        self.check_state(record, version)
        ts = self._ts
        profile = PROFILES.get(record.profile_of(version))
        if profile is None or recipient.algorithm not in profile.kek_algorithms:
            raise errors.IntegrityError("the data key is not authentic")
        if not profile.wraps:
            raw = objects.gcm_decrypt(ts, version.key_id, recipient.encrypted_key,
                                      nonce=recipient.gcm_nonce or b"", aad=b"")
        else:
            mechanism = "aes-kw" if recipient.algorithm == "aes256_wrap" else self._kwp_mechanism()
            raw = objects.unwrap_data_key(ts, version.key_id, recipient.encrypted_key, mechanism)
        try:
            if len(raw) != 32:
                raise errors.IntegrityError("the data key is not authentic")
            return DataKey(raw)
        finally:
            zero(raw)

    def _kwp_mechanism(self) -> str:
        caps = probe(self._keyring.token)
        for name in ("aes-kwp", "aes-kwp-3.0"):
            if caps.has(name):
                return name
        raise errors.MechanismUnsupportedError(f"token {self._keyring.token.label!r} cannot do AES-KWP")
