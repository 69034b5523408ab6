"""The backup file: key versions wrapped under a transport key that M of N custodians hold.

A backup is one UTF-8 JSON document (canonical: keys sorted, no whitespace,
ASCII), so that an operator can read at a glance which keys it holds and
whom it needs, and so that its parser is small (docs/ceremonies.md has an
annotated example)::

    {"format": "keymgr-backup/1", "id": <16 random bytes, hex>, "created": <UTC>,
     "source": {"token": "keymgr-A", "serial": "..."},
     "mechanism": "aes-kw",                                 how the versions are wrapped
     "quorum": {"threshold": 2, "custodians": ["alice", "bob", "carol"]},
     "keys": [{"record": <keyring record of the key, only the versions backed up>,
               "versions": [{"version": 1, "wrapped": <hex>, "proof": <hex>}]}],
     "shares": [{"custodian": <register entry: name, public key, certificate...>,
                 "index": 1, "commitment": <hex>, "sealed": <hex>}],
     "approvals": [<approval request digest and approvers>],
     "mac": <hex>}

* ``wrapped``: C_WrapKey of the version under the transport key (RFC 3394,
  or RFC 5649 for ``aes-kwp``), done inside the source token;
* ``proof``: what the version's key itself makes of a fixed input (``kw``
  profile: AES-KW of the all-zero 32-byte key, a deterministic check value;
  ``gcm`` profile: nonce || AES-GCM of 32 zero bytes); the restoring token
  recomputes / opens it with the restored object, which proves the object
  holds the same key (SoftHSM does not compute CKA_CHECK_VALUE on unwrap);
* ``sealed``: the custodian's Shamir share of the transport key, sealed to
  their token key (``_seal``), bound to :meth:`BackupFile.share_context`;
* ``commitment``: ``shamir.share_commitment`` of that share under the same
  context, so a share that opens but is not the one dealt is named;
* ``mac``: HMAC-SHA256 (RFC 2104) over the canonical document without
  ``mac``, keyed by HKDF-SHA256(transport key, salt = id, info = ``keymgr
  backup manifest v1``). Only the transport key, i.e. M custodians, can check
  it, and restore checks it before it touches the target token: a file edited
  anywhere (a wrapped key, a name, the quorum, a commitment) is refused.

Parsing checks every field; anything else raises :class:`~keymgr.errors.FormatError`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from keymgr import errors
from keymgr._canonical import canonical_json
from keymgr.custody._json import load_document
from keymgr.custody._shares import SealedShare
from keymgr.custody.custodians import Custodian, QuorumPolicy
from keymgr.envelope._aead import hkdf_sha256
from keymgr.keyring.store import KeyRecord, validate_name

__all__ = ["BackupFile", "BackupKey", "ShareSlot", "WrappedVersion", "FORMAT", "MAX_BACKUP"]

FORMAT = "keymgr-backup/1"
MAC_INFO = b"keymgr backup manifest v1"
MAX_BACKUP = 16 * 1024 * 1024
MECHANISMS = ("aes-kw", "aes-kwp", "aes-kwp-3.0")
_FIELDS = {"format", "id", "created", "source", "mechanism", "quorum", "keys", "shares", "approvals", "mac"}


def _hex(value: Any, what: str, *, low: int = 1, high: int = 4096) -> bytes:
    if not isinstance(value, str):
        raise errors.FormatError(f"backup file: {what} must be hex")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise errors.FormatError(f"backup file: {what} must be hex") from None
    if not low <= len(raw) <= high or raw.hex() != value:
        raise errors.FormatError(f"backup file: {what} has an impossible length")
    return raw


def _obj(value: Any, keys: set[str], what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != keys:
        raise errors.FormatError(f"backup file: malformed {what}")
    return value


def _int(value: Any, what: str, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
        raise errors.FormatError(f"backup file: {what} out of range")
    return value


@dataclass(frozen=True)
class WrappedVersion:
    version: int
    wrapped: bytes = field(repr=False)
    proof: bytes = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "wrapped": self.wrapped.hex(), "proof": self.proof.hex()}


@dataclass(frozen=True)
class BackupKey:
    """One named key: its keyring record (restored as is) and its wrapped versions."""

    record: KeyRecord
    versions: tuple[WrappedVersion, ...]

    def to_json(self) -> dict[str, Any]:
        return {"record": self.record.to_json(), "versions": [v.to_json() for v in self.versions]}


@dataclass(frozen=True)
class ShareSlot(SealedShare):
    """One custodian's place in the backup: who, which share, its commitment, the sealed share."""

    def to_json(self) -> dict[str, Any]:
        return {"custodian": self.custodian.to_json(), "index": self.index, "commitment": self.commitment.hex(),
                "sealed": self.sealed.hex()}


@dataclass(frozen=True)
class BackupFile:
    """A parsed (not yet authenticated) backup; :meth:`verify_mac` needs the transport key."""

    id: bytes
    created: str
    source_token: str
    source_serial: str
    mechanism: str
    quorum: QuorumPolicy
    keys: tuple[BackupKey, ...]
    shares: tuple[ShareSlot, ...]
    approvals: tuple[Mapping[str, Any], ...] = ()
    mac: bytes = field(default=b"", repr=False)

    def body(self) -> dict[str, Any]:
        return {"format": FORMAT, "id": self.id.hex(), "created": self.created,
                "source": {"token": self.source_token, "serial": self.source_serial}, "mechanism": self.mechanism,
                "quorum": self.quorum.to_json(), "keys": [k.to_json() for k in self.keys],
                "shares": [s.to_json() for s in self.shares], "approvals": [dict(a) for a in self.approvals]}

    def to_bytes(self) -> bytes:
        return canonical_json({**self.body(), "mac": self.mac.hex()}) + b"\n"

    def compute_mac(self, transport: bytes | bytearray) -> bytes:
        key = hkdf_sha256(transport, salt=self.id, info=MAC_INFO)
        return hmac.new(key, canonical_json(self.body()), hashlib.sha256).digest()

    def verify_mac(self, transport: bytes | bytearray) -> bool:
        return hmac.compare_digest(self.compute_mac(transport), self.mac)

    def share_context(self, slot: SealedShare) -> dict[str, str]:
        """What a share is bound to: this backup, this custodian's key, this index."""
        return {"purpose": "keymgr backup share", "backup": self.id.hex(), "custodian": slot.custodian.name,
                "fingerprint": slot.custodian.fingerprint, "index": str(slot.index)}

    def slot(self, name: str) -> ShareSlot:
        for s in self.shares:
            if s.custodian.name == name:
                return s
        raise errors.PolicyError(f"custodian {name!r} is not one of this backup's custodians "
                                 f"({', '.join(self.quorum.custodians)})")

    def describe(self) -> str:
        keys = ", ".join(f"{k.record.name} v{','.join(str(v.version) for v in k.versions)}" for k in self.keys)
        return (f"backup {self.id.hex()[:8]} of {keys} from token {self.source_token!r}, made {self.created}; "
                f"needs {self.quorum.describe()}")

    @classmethod
    def parse(cls, data: bytes) -> BackupFile:
        """Read a backup file's structure (FormatError on anything but a well-formed one)."""
        doc = _obj(load_document(data, "backup file", format=FORMAT, limit=MAX_BACKUP), _FIELDS, "document")
        source = _obj(doc["source"], {"token", "serial"}, "source")
        if not all(isinstance(v, str) for v in source.values()) or not isinstance(doc["created"], str):
            raise errors.FormatError("backup file: malformed source")
        if doc["mechanism"] not in MECHANISMS:
            raise errors.FormatError("backup file: unknown wrapping mechanism")
        quorum = QuorumPolicy.from_json(doc["quorum"]) if isinstance(doc["quorum"], dict) else None
        if quorum is None or not isinstance(doc["keys"], list) or not isinstance(doc["shares"], list) \
                or not isinstance(doc["approvals"], list) or not all(isinstance(a, dict) for a in doc["approvals"]):
            raise errors.FormatError("backup file: malformed quorum, keys, shares or approvals")
        keys = tuple(_parse_key(k) for k in doc["keys"])
        shares = tuple(_parse_share(s) for s in doc["shares"])
        if not keys or len({k.record.name for k in keys}) != len(keys):
            raise errors.FormatError("backup file: no keys, or a key named twice")
        if [s.custodian.name for s in shares] != list(quorum.custodians) or \
                len({s.index for s in shares}) != len(shares):
            raise errors.FormatError("backup file: the shares do not match the quorum")
        return cls(id=_hex(doc["id"], "id", low=16, high=16), created=doc["created"],
                   source_token=source["token"], source_serial=source["serial"], mechanism=doc["mechanism"],
                   quorum=quorum, keys=keys, shares=shares, approvals=tuple(doc["approvals"]),
                   mac=_hex(doc["mac"], "mac", low=32, high=32))


def _parse_key(value: Any) -> BackupKey:
    entry = _obj(value, {"record", "versions"}, "key")
    try:
        record = KeyRecord.from_json(entry["record"])
        validate_name(record.name)
    except (errors.KeymgrError, KeyError, TypeError, ValueError, AttributeError):
        raise errors.FormatError("backup file: malformed key record") from None
    if not isinstance(entry["versions"], list) or not entry["versions"]:
        raise errors.FormatError("backup file: a key without versions")
    versions = []
    for item in entry["versions"]:
        v = _obj(item, {"version", "wrapped", "proof"}, "version")
        versions.append(WrappedVersion(_int(v["version"], "version", 2**31 - 1),
                                       _hex(v["wrapped"], "wrapped key", low=24, high=1024),
                                       _hex(v["proof"], "proof", low=16, high=1024)))
    numbers = [v.version for v in versions]
    if sorted(numbers) != sorted(v.version for v in record.versions) or len(set(numbers)) != len(numbers):
        raise errors.FormatError("backup file: wrapped versions do not match the key record")
    return BackupKey(record, tuple(versions))


def _parse_share(value: Any) -> ShareSlot:
    entry = _obj(value, {"custodian", "index", "commitment", "sealed"}, "share")
    if not isinstance(entry["custodian"], dict):
        raise errors.FormatError("backup file: malformed custodian")
    return ShareSlot(Custodian.from_json(entry["custodian"]), _int(entry["index"], "share index", 255),
                     _hex(entry["commitment"], "share commitment", low=16, high=64),
                     _hex(entry["sealed"], "sealed share", low=32, high=4096))
