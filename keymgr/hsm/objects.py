"""Key and data objects in a token, and the few operations keymgr performs with them.

Keys are addressed by CKA_ID (the identity a ciphertext records) and named by
CKA_LABEL. Templates come from :mod:`keymgr.hsm.templates`; this module only turns
attribute names into ``CKA_*`` constants. Handles are cached per session so
the hot path (one wrap or one GCM call per message) costs one token call.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

import pkcs11
import pkcs11.exceptions as p11x
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.mechanisms import GCMParams

from keymgr import errors
from keymgr._memory import zero
from keymgr.hsm._errors import missing_role
from keymgr.hsm.finding import find_objects
from keymgr.hsm.locks import token_lock
from keymgr.hsm.sessions import TokenSession
from keymgr.hsm.templates import EPHEMERAL_DATA_KEY, KeyTemplate
from keymgr.oplog import hsm as log
from keymgr.oplog import warn_once

__all__ = [
    "ObjectInfo",
    "generate_key",
    "key_exists",
    "key_attributes",
    "cached_key_handle",
    "check_value",
    "destroy_key",
    "list_secret_keys",
    "wrap_data_key",
    "unwrap_data_key",
    "checked_for_authenticity",
    "gcm_encrypt",
    "kek_proof",
    "gcm_decrypt",
    "hmac_sha256",
    "hmac_sha256_verify",
    "write_data_object",
    "read_data_objects",
    "destroy_data_object",
    "DataObjectScan",
    "scan_data_objects",
    "singleton_keys",
    "ensure_singleton_key",
    "random_bytes",
    "WRAP_MECHANISMS",
]

#: keymgr's names for key-wrap mechanisms. KWP has two codes in the wild
#: (SoftHSM 0x210A, YubiHSM 0x210B: STACK-FACTS.md 13).
WRAP_MECHANISMS: Mapping[str, int] = {
    "aes-kw": int(Mechanism.AES_KEY_WRAP),
    "aes-kwp": int(Mechanism.AES_KEY_WRAP_PAD),
    "aes-kwp-3.0": 0x210B,
}

#: Each of those as python-pkcs11's enum, made once (an enum call per message costs ~0.3 µs).
_WRAP_MECHANISM_ENUMS: Mapping[str, Mechanism] = MappingProxyType(
    {name: Mechanism(code) for name, code in WRAP_MECHANISMS.items()})

_KEY_TYPES = {"AES": KeyType.AES, "GENERIC_SECRET": KeyType.GENERIC_SECRET}
T = TypeVar("T")


@dataclass(frozen=True)
class ObjectInfo:
    """Non-secret facts about a key object, read back from the token."""

    key_id: bytes
    label: str
    attributes: Mapping[str, Any]


def _template(template: KeyTemplate) -> dict[Attribute, Any]:
    return {Attribute[name]: value for name, value in template.attributes.items()}


def generate_key(ts: TokenSession, template: KeyTemplate, *, label: str, key_id: bytes) -> None:
    """Generate a key inside the token from a purpose template."""
    attrs = _template(template)
    store = bool(template.attributes.get("TOKEN", True))
    attrs.pop(Attribute.TOKEN, None)
    key_type = _KEY_TYPES[template.key_type]
    bits = template.bits

    def call(session: pkcs11.Session) -> None:
        session.generate_key(key_type, bits, label=label, id=key_id, store=store, template=attrs)

    ts.run(f"generate {template.purpose} key {label!r}", call)


def _find_key(session: pkcs11.Session, ts: TokenSession, key_id: bytes,
              proof: Mapping[Attribute, Any] | None = None) -> pkcs11.SecretKey:
    """The key object under ``key_id`` (cached per session). With ``proof``, only an object that
    also shows those attributes (the token matches them in C_FindObjects) is ever found."""
    cached = ts.cache.get(("key", key_id))  # key_cache_slot(key_id), inline: the per-message path
    if cached is not None:
        return cached  # type: ignore[return-value]
    template = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: key_id, **(proof or {})}
    found = list(session.get_objects(template))
    if not found:
        raise errors.KeyNotFoundError(f"no key object with id {key_id.hex()} on token {ts.label!r}")
    if len(found) > 1:
        raise errors.PolicyError(f"{len(found)} key objects share id {key_id.hex()} on token {ts.label!r}")
    ts.cache[("key", key_id)] = found[0]
    return found[0]  # type: ignore[return-value]


def key_cache_slot(key_id: bytes) -> tuple[str, bytes]:
    """Where :func:`_find_key` keeps the object found for ``key_id`` in ``TokenSession.cache``:
    a caller that checked that object can tell, by one dict read, whether it is still the one used."""
    return ("key", key_id)


def cached_key_handle(ts: TokenSession, key_id: bytes) -> int | None:
    """The handle this session uses for ``key_id`` now, or None before its first use. No token
    call: lets a caller tie a check of the object (keymgr.keyring.provenance) to this very object."""
    cached = ts.cache.get(("key", key_id))
    return None if cached is None else int(cached.handle)  # type: ignore[attr-defined]


def _with_key(ts: TokenSession, key_id: bytes, operation: str, use: Any, *, refind: bool = True,
              proof: Mapping[Attribute, Any] | None = None) -> Any:
    """Run ``use(key)`` with the cached handle; look it up again once if it went stale, unless
    ``refind`` is False (a KEK that encrypts: its object was checked, and an object found anew
    under the same CKA_ID may be another one, planted; the caller checks it again first).
    A key asked for a role its template does not give it is a :class:`~keymgr.errors.PolicyError`."""

    def call(session: pkcs11.Session) -> Any:
        key = _find_key(session, ts, key_id, proof)
        try:
            try:
                return use(key)
            except (p11x.KeyHandleInvalid, p11x.ObjectHandleInvalid, p11x.WrappingKeyHandleInvalid):
                ts.cache.pop(("key", key_id), None)
                if not refind:
                    raise errors.KeyNotFoundError(
                        f"{operation} on token {ts.label!r}: key object {key_id.hex()} went away while in use "
                        "(destroyed, or replaced); nothing was encrypted. Retry: the next attempt checks the "
                        "object again") from None
                key = _find_key(session, ts, key_id, proof)
                return use(key)
        except AttributeError as exc:
            role = missing_role(exc, key)
            if role is None:
                raise
            raise errors.PolicyError(f"{operation} on token {ts.label!r}: key {key_id.hex()} has no {role} role "
                                     "(its template does not allow it)") from None

    return ts.run(operation, call)


def _gcm_params(nonce: bytes, aad: bytes) -> GCMParams:
    """AES-GCM parameters with keymgr's 96-bit nonce (python-pkcs11 would raise a raw ArgumentsBad
    for a longer one, outside any token call)."""
    if len(nonce) != 12:
        raise errors.ConfigurationError(f"an AES-GCM nonce is 12 bytes, not {len(nonce)}")
    return GCMParams(bytes(nonce), bytes(aad), 128)


def key_exists(ts: TokenSession, key_id: bytes) -> bool:
    try:
        _with_key(ts, key_id, "find key", lambda key: None)
    except errors.KeyNotFoundError:
        return False
    return True


_READABLE = ("LABEL", "ID", "KEY_TYPE", "VALUE_LEN", "TOKEN", "PRIVATE", "SENSITIVE", "EXTRACTABLE",
             "ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE", "MODIFIABLE", "COPYABLE", "WRAP_WITH_TRUSTED",
             "TRUSTED", "ENCRYPT", "DECRYPT", "WRAP", "UNWRAP", "SIGN", "VERIFY", "DERIVE", "LOCAL")


def key_attributes(ts: TokenSession, key_id: bytes) -> ObjectInfo:
    """Read back every non-secret attribute keymgr cares about (tests, ``key show``)."""

    def read(key: Any) -> ObjectInfo:
        values: dict[str, Any] = {}
        for name in _READABLE:
            try:
                value = key[Attribute[name]]
            except (p11x.AttributeTypeInvalid, p11x.AttributeSensitive, NotImplementedError, KeyError):
                continue
            values[name] = value.name if hasattr(value, "name") else value
        return ObjectInfo(key_id=key_id, label=str(values.get("LABEL", "")), attributes=values)

    return _with_key(ts, key_id, "read key attributes", read)  # type: ignore[no-any-return]


def check_value(ts: TokenSession, key_id: bytes) -> str | None:
    """The key check value (CKA_CHECK_VALUE: first 3 bytes of AES-ECB(key, 0^128)), hex.

    Standard since PKCS#11 v2.40 and computed by the token, so keymgr needs no
    ECB-encrypt permission on the key to show it. None if the token has none.
    """

    def read(key: Any) -> str | None:
        try:
            value = key[Attribute.CHECK_VALUE]
        except (p11x.AttributeTypeInvalid, p11x.AttributeSensitive, KeyError):
            return None
        return bytes(value).hex() if value else None

    return _with_key(ts, key_id, "read key check value", read)  # type: ignore[no-any-return]


def destroy_key(ts: TokenSession, key_id: bytes) -> None:
    """Destroy the key object (crypto-shredding). Idempotent."""

    def call(session: pkcs11.Session) -> None:
        ts.cache.pop(("key", key_id), None)
        for obj in list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: key_id})):
            obj.destroy()

    ts.run("destroy key", call)


def _scan(session: pkcs11.Session, template: Mapping[Attribute, Any],
          read: Callable[[Any], T]) -> list[T]:
    """``read`` of every object matching ``template`` that still exists: one another process
    destroys after the find (a keyring compaction) is skipped, as if the find came later."""
    result: list[T] = []
    for obj in find_objects(session, template):
        try:
            result.append(read(obj))
        except p11x.ObjectHandleInvalid:
            continue
    return result


def list_secret_keys(ts: TokenSession) -> list[tuple[str, bytes]]:
    """(CKA_LABEL, CKA_ID) of every secret-key token object visible to the session (rotation uses it
    to find key versions that a crash left out of the keyring's facts)."""

    def read(obj: Any) -> tuple[str, bytes] | None:
        try:
            return str(obj[Attribute.LABEL]), bytes(obj[Attribute.ID])
        except (p11x.AttributeTypeInvalid, KeyError):
            return None

    def call(session: pkcs11.Session) -> list[tuple[str, bytes]]:
        template = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TOKEN: True}
        return [found for found in _scan(session, template, read) if found is not None]

    return ts.run("list secret keys", call)


#: EPHEMERAL_DATA_KEY as python-pkcs11 attributes, converted once (1.8 µs a message otherwise):
#: for the session object a wrap makes (C_CreateObject), and for the one an unwrap makes
_EPHEMERAL_OBJECT: Mapping[Attribute, Any] = MappingProxyType(
    {**_template(EPHEMERAL_DATA_KEY), Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES})
_EPHEMERAL_UNWRAP: Mapping[Attribute, Any] = MappingProxyType(
    {a: v for a, v in _template(EPHEMERAL_DATA_KEY).items() if a is not Attribute.TOKEN})


def wrap_data_key(ts: TokenSession, kek_id: bytes, data_key: bytes, mechanism: str = "aes-kw", *,
                  proof: Mapping[Attribute, Any] | None = None) -> bytes:
    """Wrap a host data key under a token KEK with C_WrapKey (RFC 3394 / 5649).

    The data key must become a session object first (KW works only through
    C_WrapKey: STACK-FACTS.md 5); it is destroyed again before returning.
    """
    mech = _WRAP_MECHANISM_ENUMS[mechanism]
    attrs = {**_EPHEMERAL_OBJECT, Attribute.VALUE: bytes(data_key)}

    def use(kek: Any) -> bytes:
        temp = kek.session.create_object(attrs)
        try:
            return bytes(kek.wrap_key(temp, mechanism=mech))
        finally:
            temp.destroy()

    return _with_key(ts, kek_id, "wrap data key", use, refind=False, proof=proof)  # type: ignore[no-any-return]


def checked_for_authenticity(ts: TokenSession, operation: str, call: Callable[[], T]) -> T:
    """Run one token call that verifies data (C_UnwrapKey with AES-KW/KWP, C_Decrypt with
    AES-GCM) inside :meth:`TokenSession.run`, so that a failed check is an
    :class:`~keymgr.errors.IntegrityError`.

    SoftHSM 2.6.1 answers a failed RFC 3394 / 5649 integrity check and a wrong GCM tag
    with CKR_GENERAL_ERROR, not CKR_WRAPPED_KEY_INVALID / CKR_ENCRYPTED_DATA_INVALID
    (measured: every invalid Wycheproof KW and KWP vector, every tampered tag). The
    session layer would report that as a token failure; when the token still answers
    (:meth:`TokenSession.answers`), the data is at fault, not the token.
    """
    try:
        return call()
    except p11x.GeneralError as exc:
        if ts.answers():
            raise errors.IntegrityError(
                f"{operation} on token {ts.label!r}: the token rejected the data as not authentic "
                "(CKR_GENERAL_ERROR)") from exc
        raise


def unwrap_data_key(ts: TokenSession, kek_id: bytes, wrapped: bytes, mechanism: str = "aes-kw",
                    key_length: int = 32) -> bytearray:
    """Unwrap a data key with C_UnwrapKey into a session object, read it, destroy it."""
    mech = _WRAP_MECHANISM_ENUMS[mechanism]
    attrs = dict(_EPHEMERAL_UNWRAP)

    def use(kek: Any) -> bytearray:
        temp = checked_for_authenticity(ts, "unwrap data key", lambda: kek.unwrap_key(
            ObjectClass.SECRET_KEY, KeyType.AES, bytes(wrapped), mechanism=mech, store=False, template=attrs))
        try:
            value = bytearray(temp[Attribute.VALUE])
        finally:
            temp.destroy()
        if len(value) != key_length:
            zero(value)
            raise errors.IntegrityError("the wrapped data key is not authentic")
        return value

    return _with_key(ts, kek_id, "unwrap data key", use)  # type: ignore[no-any-return]


def gcm_encrypt(ts: TokenSession, key_id: bytes, plaintext: bytes, *, nonce: bytes, aad: bytes,
                proof: Mapping[Attribute, Any] | None = None) -> bytes:
    """AES-GCM inside the token: one C_Encrypt; returns ciphertext || 16-byte tag.

    The caller owns nonce uniqueness (SoftHSM uses the nonce it is given: STACK-FACTS.md 6).
    """
    params = _gcm_params(nonce, aad)
    return _with_key(ts, key_id, "encrypt data key",  # type: ignore[no-any-return]
                     lambda key: bytes(key.encrypt(bytes(plaintext), mechanism=Mechanism.AES_GCM,
                                                   mechanism_param=params)), refind=False, proof=proof)


def kek_proof(*, backup_capable: bool) -> Mapping[Attribute, Any]:
    """What a KEK that encrypts must show in the very find that picks its object (C_FindObjects
    matches these: STACK-FACTS): when a session is reopened inside a token call, the object is
    found anew after keymgr.keyring.provenance checked the old one, and an object planted under
    the same CKA_ID must not be the one found. The full check (KCV, roles, AES-256) stays
    keymgr.keyring.provenance's; this is its part the token can test in the find."""
    return _BACKUP_KEK_PROOF if backup_capable else _KEK_PROOF


_KEK_PROOF = MappingProxyType({Attribute.LOCAL: True, Attribute.ALWAYS_SENSITIVE: True,
                               Attribute.NEVER_EXTRACTABLE: True, Attribute.SENSITIVE: True,
                               Attribute.EXTRACTABLE: False, Attribute.MODIFIABLE: False})
_BACKUP_KEK_PROOF = MappingProxyType({Attribute.LOCAL: True, Attribute.ALWAYS_SENSITIVE: True,
                                      Attribute.WRAP_WITH_TRUSTED: True, Attribute.SENSITIVE: True,
                                      Attribute.MODIFIABLE: False})


def gcm_decrypt(ts: TokenSession, key_id: bytes, ciphertext: bytes, *, nonce: bytes, aad: bytes) -> bytearray:
    """AES-GCM decrypt inside the token; a bad tag is an :class:`IntegrityError`."""
    params = _gcm_params(nonce, aad)
    return _with_key(ts, key_id, "decrypt data key",  # type: ignore[no-any-return]
                     lambda key: checked_for_authenticity(ts, "decrypt data key", lambda: bytearray(
                         key.decrypt(bytes(ciphertext), mechanism=Mechanism.AES_GCM, mechanism_param=params))))


def hmac_sha256(ts: TokenSession, key_id: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 computed inside the token, by a key that shows :data:`_SINGLETON_PROOF` (every
    HMAC key of keymgr is one: the keyring's, the audit log's, blind indexes'): an object planted
    under the same CKA_ID, after the genuine one was destroyed, is never found."""
    return _with_key(ts, key_id, "compute HMAC",  # type: ignore[no-any-return]
                     lambda key: bytes(key.sign(bytes(data), mechanism=Mechanism.SHA256_HMAC)),
                     proof=_SINGLETON_PROOF)


def hmac_sha256_verify(ts: TokenSession, key_id: bytes, data: bytes, mac: bytes) -> bool:
    """Verify an HMAC inside the token (C_Verify compares; no MAC bytes are compared in Python)."""

    def use(key: Any) -> bool:
        try:
            return bool(key.verify(bytes(data), bytes(mac), mechanism=Mechanism.SHA256_HMAC))
        except (p11x.SignatureInvalid, p11x.SignatureLenRange):
            return False

    return _with_key(ts, key_id, "verify HMAC", use, proof=_SINGLETON_PROOF)  # type: ignore[no-any-return]


def write_data_object(ts: TokenSession, *, application: str, label: str, value: bytes) -> None:
    """Create a private CKO_DATA token object (values of data objects are read-only in SoftHSM,
    so updates are new objects: see :mod:`keymgr.keyring.store`)."""
    attrs = {Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: True, Attribute.PRIVATE: True,
             Attribute.APPLICATION: application, Attribute.LABEL: label, Attribute.VALUE: bytes(value)}
    ts.run(f"write data object {label!r}", lambda session: session.create_object(attrs) and None)


def read_data_objects(ts: TokenSession, *, application: str) -> list[tuple[str, bytes]]:
    """Every (label, value) of this application's data objects."""

    def call(session: pkcs11.Session) -> list[tuple[str, bytes]]:
        return _scan(session, {Attribute.CLASS: ObjectClass.DATA, Attribute.APPLICATION: application},
                     lambda obj: (str(obj[Attribute.LABEL]), bytes(obj[Attribute.VALUE])))

    return ts.run("read data objects", call)


def destroy_data_object(ts: TokenSession, *, application: str, label: str) -> None:
    """Destroy every data object of ``application`` labelled ``label``. Idempotent: one that
    another process destroyed first is gone either way."""

    def call(session: pkcs11.Session) -> None:
        template = {Attribute.CLASS: ObjectClass.DATA, Attribute.APPLICATION: application, Attribute.LABEL: label}
        for obj in _scan(session, template, lambda obj: obj):
            try:
                obj.destroy()
            except (p11x.ObjectHandleInvalid, p11x.FunctionFailed):
                continue  # another process destroyed it first (SoftHSM may say CKR_FUNCTION_FAILED then)

    ts.run(f"destroy data object {label!r}", call)


class DataObjectScan:
    """What one process knows of a token's data objects between scans: the label of each handle
    it has read, for the session those handles belong to (a new session, after a re-initialise,
    starts over). Lets a refresh read only the objects that are new since the last one: the
    find is paid every time (it scans the token, STACK-FACTS 19), the reads only once.
    Relies on the module not reusing a destroyed object's handle for a new object within one
    session (SoftHSM counts handles up)."""

    def __init__(self) -> None:
        self.session: object = None
        self.labels: dict[int, str] = {}


def scan_data_objects(ts: TokenSession, *, application: str,
                      memo: DataObjectScan) -> tuple[set[str], list[tuple[int, str, bytes]]]:
    """The labels of every data object of ``application`` now, and (handle, label, value) of those
    whose handle ``memo`` has not seen. One find, plus one read per new object. A caller that
    cannot take an object in forgets its handle (``memo.labels.pop``), so it is read again."""

    def call(session: pkcs11.Session) -> tuple[set[str], list[tuple[int, str, bytes]]]:
        if memo.session is not session:
            memo.session, memo.labels = session, {}
        handles: set[int] = set()
        new: list[tuple[int, str, bytes]] = []
        for obj in find_objects(session, {Attribute.CLASS: ObjectClass.DATA, Attribute.APPLICATION: application}):
            handle = obj.handle
            if handle is None:  # pragma: no cover - a found object always has one
                continue
            if handle not in memo.labels:
                try:
                    label, value = str(obj[Attribute.LABEL]), bytes(obj[Attribute.VALUE])
                except (p11x.ObjectHandleInvalid, p11x.FunctionFailed):
                    continue  # destroyed by another process since the find: it is gone
                memo.labels[handle] = label
                new.append((handle, label, value))
            handles.add(handle)
        for gone in [h for h in memo.labels if h not in handles]:
            del memo.labels[gone]
        return set(memo.labels.values()), new

    return ts.run("read data objects", call)


#: What a singleton MAC key (the keyring's, the audit log's) must show to be used or trusted: made
#: inside this token and never readable. A PIN holder can import a key of a value they know under
#: the same label (and a lower CKA_ID, which writers prefer): with it they could MAC forged records
#: and audit entries offline, so such a key is never used (``untrusted_singletons`` names it).
_SINGLETON_PROOF = {Attribute.LOCAL: True, Attribute.ALWAYS_SENSITIVE: True, Attribute.NEVER_EXTRACTABLE: True,
                    Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.MODIFIABLE: False,
                    Attribute.KEY_TYPE: KeyType.GENERIC_SECRET, Attribute.SIGN: True, Attribute.DERIVE: False,
                    Attribute.ENCRYPT: False, Attribute.DECRYPT: False, Attribute.WRAP: False,
                    Attribute.UNWRAP: False}


def _singleton_scan(ts: TokenSession, label: str) -> list[tuple[bytes, list[str]]]:
    """(CKA_ID, what it fails of :data:`_SINGLETON_PROOF`) of each secret key labelled ``label``."""

    def read(obj: Any) -> tuple[bytes, list[str]] | None:
        try:
            key_id = bytes(obj[Attribute.ID])
        except (p11x.AttributeTypeInvalid, KeyError):
            return None
        failed = []
        for attribute, wanted in _SINGLETON_PROOF.items():
            try:
                value = obj[attribute]
            except (p11x.AttributeTypeInvalid, p11x.AttributeSensitive, KeyError):
                value = None
            if value != wanted:
                failed.append(f"CKA_{attribute.name} is {value}")
        return key_id, failed

    def call(session: pkcs11.Session) -> list[tuple[bytes, list[str]]]:
        template = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TOKEN: True, Attribute.LABEL: label}
        return sorted(found for found in _scan(session, template, read) if found is not None)

    return ts.run("find keys by label", call)


def singleton_keys(ts: TokenSession, label: str) -> list[bytes]:
    """CKA_IDs of the secret-key token objects labelled ``label`` that the token made and never
    let out (:data:`_SINGLETON_PROOF`), sorted (one find by label: a token holds thousands of key
    versions, which must not be read one by one)."""
    found = _singleton_scan(ts, label)
    for key_id, failed in found:
        if failed:
            warn_once(log, key_id.hex(), "token %r: key %r (id %s) is ignored: %s (not made by this token, or "
                      "readable: planted?); run keymgr key verify", ts.label, label, key_id.hex(), "; ".join(failed))
    return [key_id for key_id, failed in found if not failed]


def untrusted_singletons(ts: TokenSession, label: str) -> list[tuple[bytes, list[str]]]:
    """Keys labelled ``label`` that keymgr ignores, each with why (``keymgr key verify``)."""
    return [(key_id, failed) for key_id, failed in _singleton_scan(ts, label) if failed]


#: How long :func:`ensure_singleton_key` waits for a key another process is still generating.
_SINGLETON_WAIT = 5.0


def _usable_mac_key(ts: TokenSession, key_id: bytes) -> bool:
    """A key that computes an HMAC. SoftHSM lists a key another process is still generating
    before its value is written (STACK-FACTS 22): such a key fails, and is skipped for now."""
    try:
        hmac_sha256(ts, key_id, b"keymgr singleton probe")
    except errors.KeymgrError:
        ts.cache.pop(("key", key_id), None)
        return False
    return True


def ensure_singleton_key(ts: TokenSession, template: KeyTemplate, *, label: str, id_prefix: bytes) -> list[bytes]:
    """The usable keys labelled ``label`` (a token's metadata MAC key, its audit key), made if there
    is none; sorted by CKA_ID, so every host that sees the same keys writes with the same first one.

    Hosts sharing a network HSM cannot coordinate a create-if-absent (no compare-and-swap in
    PKCS#11), so two of them may each make one: both keys get their own random CKA_ID under the
    same label, both stay valid for checking what each MACed, and writers use the lowest. This
    machine's lock (:mod:`keymgr.hsm.locks`) only keeps processes of one host from doing so."""
    deadline = time.monotonic() + _SINGLETON_WAIT
    while True:
        present = singleton_keys(ts, label)
        usable = [key_id for key_id in present if _usable_mac_key(ts, key_id)]
        if usable:
            return usable
        if not present:
            with token_lock(ts, f"singleton {label}"):
                if not singleton_keys(ts, label):
                    generate_key(ts, template, label=label, key_id=id_prefix + b"/" + os.urandom(8))
            continue
        if time.monotonic() > deadline:
            raise errors.TokenError(f"token {ts.label!r} has {len(present)} key(s) labelled {label!r}, and none "
                                    "computes an HMAC: check the token (keymgr tokens --login)")
        time.sleep(0.05)  # being generated by another process: wait for its value


def random_bytes(ts: TokenSession, count: int) -> bytes:
    return ts.run("generate random", lambda session: bytes(session.generate_random(count * 8)))
