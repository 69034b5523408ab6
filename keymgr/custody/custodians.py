"""Custodians and quorum policies, registered in the HSM beside the keyring.

A custodian is a person with a key pair on a token of their own (a USB key,
a smart card): RSA >= 2048 or EC P-256 / P-384. keymgr knows them by name and
by public key, and keeps the certificate of that key (the one on their token,
or a self-signed one their token makes at registration: see ``_certs``).

The register is one private CKO_DATA record on the keyring's token,
authenticated by the keyring's in-token MAC key (:meth:`Keyring.authenticate`,
domain ``keymgr custody register v1``) over the record *and its label*, so an
edited, swapped or replayed register is detected. Like keyring records,
updates write generation ``n+1`` and then delete ``n``; readers take the
newest generation that verifies.

A quorum policy says which custodians (N of them) guard a key, or every key of
the keyring (scope ``*``), and how many of them (M) must take part.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from keymgr import errors
from keymgr._canonical import canonical_json
from keymgr._certs import (
    PublicKey,
    certificate_public_key,
    kind_of,
    load_spki,
    spki_der,
    verify_signature,
)
from keymgr._time import utc_now
from keymgr.hsm import objects
from keymgr.keyring.store import Keyring, validate_name

__all__ = ["Custodian", "CustodyRegister", "QuorumPolicy", "Register", "KEYRING_SCOPE", "MAX_CUSTODIANS"]

APPLICATION = "keymgr"
REGISTER_PREFIX = "keymgr/custody/register/"
DOMAIN = b"keymgr custody register v1"
FORMAT = 1
KEYRING_SCOPE = "*"
#: Shamir over GF(2^8) has 255 non-zero evaluation points.
MAX_CUSTODIANS = 255


@dataclass(frozen=True)
class Custodian:
    """A registered custodian: who, which key, on which token."""

    name: str
    kind: str
    public_key_der: bytes = field(repr=False)
    certificate_der: bytes = field(repr=False)
    token_label: str = ""
    token_serial: str = ""
    key_label: str = ""
    key_id: bytes = b""
    added: str = ""
    self_signed: bool = True
    #: RSA keys: the OAEP hash the custodian's token decrypts with (probed at registration)
    oaep_hash: str = ""

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the SubjectPublicKeyInfo, hex: how files name this custodian's key."""
        return hashlib.sha256(self.public_key_der).hexdigest()

    def public_key(self) -> PublicKey:
        return load_spki(self.public_key_der)

    def verify(self, signature: bytes, data: bytes) -> bool:
        return verify_signature(self.public_key(), signature, data)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "public_key": self.public_key_der.hex(),
                "certificate": self.certificate_der.hex(), "token_label": self.token_label,
                "token_serial": self.token_serial, "key_label": self.key_label, "key_id": self.key_id.hex(),
                "added": self.added, "self_signed": self.self_signed, "oaep_hash": self.oaep_hash}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Custodian:
        """Parse and check a custodian entry; :class:`~keymgr.errors.FormatError` if it is not one."""
        try:
            custodian = cls(name=validate_name(str(data["name"])), kind=str(data["kind"]),
                            public_key_der=bytes.fromhex(data["public_key"]),
                            certificate_der=bytes.fromhex(data["certificate"]),
                            token_label=str(data.get("token_label", "")),
                            token_serial=str(data.get("token_serial", "")),
                            key_label=str(data.get("key_label", "")), key_id=bytes.fromhex(data.get("key_id", "")),
                            added=str(data.get("added", "")), self_signed=bool(data.get("self_signed", True)),
                            oaep_hash=str(data.get("oaep_hash", "")))
        except (KeyError, TypeError, ValueError, AttributeError, errors.ConfigurationError):
            raise errors.FormatError("malformed custodian entry") from None
        key = custodian.public_key()
        if kind_of(key) != custodian.kind or spki_der(certificate_public_key(custodian.certificate_der)) != \
                custodian.public_key_der:
            raise errors.FormatError(f"custodian {custodian.name!r}: key, kind and certificate do not match")
        return custodian


@dataclass(frozen=True)
class QuorumPolicy:
    """M of N: ``threshold`` of the named ``custodians`` must take part."""

    threshold: int
    custodians: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.custodians)
        if len(set(self.custodians)) != n:
            raise errors.ConfigurationError("a quorum names each custodian once")
        if not 2 <= self.threshold <= n <= MAX_CUSTODIANS:
            raise errors.ConfigurationError(f"a quorum needs 2 <= M <= N <= {MAX_CUSTODIANS} (one person alone "
                                            f"is not dual control); got M={self.threshold}, N={n}")

    @property
    def n(self) -> int:
        return len(self.custodians)

    def describe(self) -> str:
        return f"{self.threshold} of {self.n} ({', '.join(self.custodians)})"

    def to_json(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "custodians": list(self.custodians)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QuorumPolicy:
        try:
            return cls(int(data["threshold"]), tuple(str(c) for c in data["custodians"]))
        except (KeyError, TypeError, ValueError, errors.ConfigurationError):
            raise errors.FormatError("malformed quorum policy") from None


@dataclass(frozen=True)
class Register:
    """The custodians, quorum policies and spent approval requests of one keyring."""

    custodians: tuple[Custodian, ...] = ()
    policies: Mapping[str, QuorumPolicy] = field(default_factory=dict)
    #: request digests already acted on, with their expiry: a replayed request is refused
    consumed: tuple[tuple[str, str], ...] = ()
    generation: int = 0

    def custodian(self, name: str) -> Custodian:
        for c in self.custodians:
            if c.name == name:
                return c
        known = ", ".join(c.name for c in self.custodians) or "none"
        raise errors.KeyNotFoundError(f"no custodian named {name!r} is registered (registered: {known})")

    def by_fingerprint(self, fingerprint: str) -> Custodian | None:
        return next((c for c in self.custodians if c.fingerprint == fingerprint), None)

    def policy_for(self, key: str | None) -> QuorumPolicy | None:
        """The key's own policy, else the keyring's, else None (no dual control configured)."""
        if key is not None and key in self.policies:
            return self.policies[key]
        return self.policies.get(KEYRING_SCOPE)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "generation": self.generation,
                "custodians": [c.to_json() for c in self.custodians],
                "policies": {scope: p.to_json() for scope, p in sorted(self.policies.items())},
                "consumed": [list(c) for c in self.consumed]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Register:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise errors.FormatError("unsupported custodian register format")
        try:
            return cls(custodians=tuple(Custodian.from_json(c) for c in data["custodians"]),
                       policies={str(k): QuorumPolicy.from_json(v) for k, v in data["policies"].items()},
                       consumed=tuple((str(d), str(e)) for d, e in data["consumed"]),
                       generation=int(data["generation"]))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise errors.FormatError("malformed custodian register") from None


class CustodyRegister:
    """The register on a keyring's token: read (verified), and updated generation by generation."""

    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring

    @property
    def keyring(self) -> Keyring:
        return self._keyring

    def _label(self, generation: int) -> str:
        return f"{REGISTER_PREFIX}{generation}"

    def load(self) -> Register:
        """The newest register that verifies; an empty one if none was ever written."""
        ts = self._keyring.token
        best: Register | None = None
        for label, value in objects.read_data_objects(ts, application=APPLICATION):
            if not label.startswith(REGISTER_PREFIX):
                continue
            register = self._verify(label, value)
            if best is None or register.generation > best.generation:
                best = register
        return best or Register()

    def _verify(self, label: str, value: bytes) -> Register:
        what = f"custodian register {label!r} on token {self._keyring.token.label!r} is not authentic"
        try:
            envelope = json.loads(value)
            payload = canonical_json({"label": label, "register": envelope["register"]})
            mac = bytes.fromhex(envelope["mac"])
        except (ValueError, KeyError, TypeError):
            raise errors.IntegrityError(what) from None
        if not self._keyring.verify_authentic(DOMAIN, payload, mac):
            raise errors.IntegrityError(what)
        try:
            register = Register.from_json(envelope["register"])
        except errors.FormatError as exc:
            raise errors.IntegrityError(what) from exc
        if label != self._label(register.generation):
            raise errors.IntegrityError(what)
        return register

    def _write(self, register: Register) -> Register:
        ts = self._keyring.token
        current = self.load()
        register = replace(register, generation=current.generation + 1)
        label = self._label(register.generation)
        body = register.to_json()
        mac = self._keyring.authenticate(DOMAIN, canonical_json({"label": label, "register": body}))
        objects.write_data_object(ts, application=APPLICATION, label=label,
                                  value=canonical_json({"register": body, "mac": mac.hex()}))
        for stale, _ in objects.read_data_objects(ts, application=APPLICATION):
            if stale.startswith(REGISTER_PREFIX) and stale != label:
                objects.destroy_data_object(ts, application=APPLICATION, label=stale)
        return register

    def add(self, custodian: Custodian) -> Register:
        register = self.load()
        if any(c.name == custodian.name for c in register.custodians):
            raise errors.ConfigurationError(f"a custodian named {custodian.name!r} is already registered")
        twin = register.by_fingerprint(custodian.fingerprint)
        if twin is not None:
            raise errors.PolicyError(f"this key is already registered to custodian {twin.name!r}; "
                                     "each custodian needs a key of their own")
        if len(register.custodians) >= MAX_CUSTODIANS:
            raise errors.PolicyError(f"at most {MAX_CUSTODIANS} custodians can be registered")
        return self._write(replace(register, custodians=(*register.custodians, custodian)))

    def remove(self, name: str) -> Register:
        register = self.load()
        register.custodian(name)
        using = sorted(scope for scope, p in register.policies.items() if name in p.custodians)
        if using:
            raise errors.PolicyError(f"custodian {name!r} is part of the quorum for {', '.join(using)}; "
                                     "change that policy first")
        return self._write(replace(register, custodians=tuple(c for c in register.custodians if c.name != name)))

    def set_policy(self, policy: QuorumPolicy | None, *, key: str | None = None,
                   spend: tuple[str, str] | None = None) -> Register:
        """Set (or with ``None`` remove) the policy of ``key`` or, by default, of the keyring.

        Authorising the change is the caller's work (:mod:`keymgr.custody.approvals`); ``spend``
        (request digest, expiry) consumes its request in the same register write, so that the
        change and the spent approvals are one atomic object (a kill cannot separate them)."""
        register = self.load()
        scope = KEYRING_SCOPE if key is None else validate_name(key)
        if policy is not None:
            for name in policy.custodians:
                register.custodian(name)
        policies = {k: v for k, v in register.policies.items() if k != scope}
        if policy is not None:
            policies[scope] = policy
        if spend is not None:
            register = replace(register, consumed=self._spent(register, *spend))
        return self._write(replace(register, policies=policies))

    def consume(self, digest: str, expires: str) -> Register:
        """Record that the request with this digest was acted on; refuse it the second time."""
        register = self.load()
        return self._write(replace(register, consumed=self._spent(register, digest, expires)))

    @staticmethod
    def _spent(register: Register, digest: str, expires: str) -> tuple[tuple[str, str], ...]:
        if any(d == digest for d, _ in register.consumed):
            raise errors.PolicyError("this request was already carried out once; approvals cannot be replayed")
        now = utc_now()
        return (*((d, e) for d, e in register.consumed if e >= now), (digest, expires))

    def adoptable(self, custodians: tuple[Custodian, ...]) -> bool:
        """Whether :meth:`adopt` would register ``custodians`` (no name taken by another key, no
        key under another name): a restore says which in its transcript, signed before its commit."""
        return self._adoptable(self.load(), custodians)

    @staticmethod
    def _adoptable(register: Register, custodians: tuple[Custodian, ...]) -> bool:
        known = {c.name: c for c in register.custodians}
        return not (any(c.name in known and known[c.name].fingerprint != c.fingerprint for c in custodians) or
                    any(register.by_fingerprint(c.fingerprint) not in (None, known.get(c.name)) for c in custodians))

    def adopt(self, custodians: tuple[Custodian, ...], policies: Mapping[str, QuorumPolicy]) -> bool:
        """Register ``custodians`` (those not yet known) and set ``policies`` (scopes that have
        none), as a restore onto a new HSM does; False, changing nothing, if a name is taken by
        another key (then the operator registers them by hand)."""
        register = self.load()
        if not self._adoptable(register, custodians):
            return False
        known = {c.name: c for c in register.custodians}
        added = tuple(c for c in custodians if c.name not in known)
        merged = {**policies, **register.policies}
        if not added and merged == dict(register.policies):
            return True
        self._write(replace(register, custodians=(*register.custodians, *added), policies=merged))
        return True
