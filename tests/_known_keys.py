"""Keys whose value a test knows: made by the tests, never by keymgr.

Every key keymgr makes is generated inside the token and never leaves it in the clear
(:mod:`keymgr.hsm.templates`), and a key it did not generate never encrypts
(:mod:`keymgr.keyring.provenance`). Some tests need a key whose bytes they hold:

* **a known key keymgr encrypts under** (``openssl cms -decrypt -secretkey HEX``, RFC 5083
  checked from scratch, the hygiene sweep): :func:`generated_known_key` generates it the
  ordinary way, backup-capable, and learns its value the one way keymgr lets such a key
  out, wrapped under a trusted transport key (the SO step of a backup) whose value the
  test chose. The key proves its provenance like any other: it may encrypt.
* **a known key keymgr only decrypts with, or must refuse** (messages built elsewhere,
  Wycheproof's AES-GCM cases, the attack suite's weakened templates, a planted KEK):
  :func:`imported_key` imports the value (C_CreateObject with python-pkcs11, so the
  object is not LOCAL and was not always sensitive) and records it as version 1 of a
  key with the keyring's own fact writer. Encrypting under it is refused.
* **vectors**: Wycheproof's AES-KW / KWP cases name their wrapping key, so each one is
  imported as a short-lived session object and the token's own C_UnwrapKey is run on
  the case (:func:`unwrap_with_session_key`).
"""

from __future__ import annotations

import os
from typing import Any

import pkcs11
import pkcs11.exceptions as p11x
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from keymgr import KeyManager, KeyPolicy, KeyRecord
from keymgr.hsm.objects import _KEY_TYPES, WRAP_MECHANISMS, _template, checked_for_authenticity
from keymgr.hsm.pins import Pin
from keymgr.hsm.sessions import TokenSession
from keymgr.hsm.templates import DEFAULT_PROFILE, KeyTemplate
from keymgr.hsm.transport import export_wrapped
from keymgr.keyring.store import version_template
from tests._internals import keyring_of, token_of
from tests.conftest import SO_PIN

__all__ = ["generated_known_key", "import_secret_key", "imported_key", "unwrap_with_session_key"]

#: AES key lengths; an unwrapped key of any other length is made a GENERIC_SECRET.
_AES_LENGTHS = frozenset({16, 24, 32})
#: What a token may answer when the unwrapped value cannot be a key of the type asked for.
_NOT_THIS_KEY_TYPE = (p11x.KeySizeRange, p11x.KeyTypeInconsistent, p11x.TemplateInconsistent,
                      p11x.AttributeValueInvalid, p11x.WrappedKeyLenRange)


def import_secret_key(ts: TokenSession, template: KeyTemplate, *, label: str, key_id: bytes, value: bytes) -> None:
    """Create a key object with the attributes of ``template`` and the known ``value`` (C_CreateObject):
    the value has been outside the token, so the object is neither LOCAL nor ALWAYS_SENSITIVE."""
    attrs = _template(template)
    attrs.update({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: _KEY_TYPES[template.key_type],
                   Attribute.LABEL: label, Attribute.ID: key_id, Attribute.VALUE: bytes(value)})
    attrs.setdefault(Attribute.TOKEN, True)
    ts.run(f"import {template.purpose} key {label!r}", lambda session: session.create_object(attrs) and None)


def unwrap_with_session_key(ts: TokenSession, kek: bytes, wrapped: bytes, mechanism: str) -> bytearray:
    """C_UnwrapKey of ``wrapped`` under ``kek`` (imported as a session object that may only
    unwrap), returning the unwrapped value; both objects are destroyed before returning.

    ``mechanism`` is a key of :data:`keymgr.hsm.objects.WRAP_MECHANISMS`. The unwrapped
    key is made an AES key when its length may be an AES length (for KW the length is
    ``len(wrapped) - 8``; for KWP the padded length bounds it) and, where the token
    refuses that, or for any other length, a GENERIC_SECRET of whatever length the
    unwrap yields: keys of every size go through the token. (SoftHSM 2.6.1 makes AES
    objects of any length, 1 to 384 bytes included; stricter tokens need the fallback.)
    A failed integrity check is an
    :class:`~keymgr.errors.IntegrityError` (:func:`keymgr.hsm.objects.checked_for_authenticity`).
    """
    mech = Mechanism(WRAP_MECHANISMS[mechanism])
    if mechanism == "aes-kw":
        may_be_aes = len(wrapped) - 8 in _AES_LENGTHS
    else:  # RFC 5649 pads to a multiple of 8: the key is 1 to 8 bytes shorter than the padded length
        may_be_aes = any(0 <= len(wrapped) - 8 - n < 8 for n in _AES_LENGTHS)
    key_types = (KeyType.AES, KeyType.GENERIC_SECRET) if may_be_aes else (KeyType.GENERIC_SECRET,)
    kek_attrs = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES, Attribute.TOKEN: False,
                 Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                 Attribute.UNWRAP: True, Attribute.WRAP: False, Attribute.ENCRYPT: False, Attribute.DECRYPT: False,
                 Attribute.VALUE: bytes(kek)}
    out_attrs = {Attribute.PRIVATE: True, Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True}

    def call(session: pkcs11.Session) -> bytearray:
        key: Any = session.create_object(kek_attrs)

        def unwrap_as(key_type: KeyType) -> Any:
            return checked_for_authenticity(ts, "unwrap with a session key", lambda: key.unwrap_key(
                ObjectClass.SECRET_KEY, key_type, bytes(wrapped), mechanism=mech, store=False, template=out_attrs))

        try:
            for key_type in key_types:
                try:
                    temp = unwrap_as(key_type)
                    break
                except _NOT_THIS_KEY_TYPE:
                    if key_type == key_types[-1]:
                        raise
            try:
                return bytearray(temp[Attribute.VALUE])
            finally:
                temp.destroy()
        finally:
            key.destroy()

    return ts.run("unwrap with a session key", call)


def imported_key(km: KeyManager, name: str, value: bytes, *, profile: str = DEFAULT_PROFILE,
                 policy: KeyPolicy | None = None) -> KeyRecord:
    """Key ``name`` on ``km``'s token whose version 1 is ``value``, imported with the template
    keymgr would generate it from and recorded with the keyring's own facts. It decrypts; it
    never encrypts (not LOCAL: :mod:`keymgr.keyring.provenance` refuses it)."""
    keyring, policy = keyring_of(km), policy or KeyPolicy()
    key_id = keyring.new_key_id()
    import_secret_key(token_of(km), version_template(profile, policy), label=f"{name}/v1", key_id=key_id,
                      value=value)
    keyring._record_first_version(name, key_id, profile=profile, policy=policy)  # noqa: SLF001 - tests only
    keyring.reload()
    return keyring.get(name)


def generated_known_key(km: KeyManager, name: str, *, profile: str = DEFAULT_PROFILE,
                        so_pin: str = SO_PIN) -> tuple[bytes, KeyRecord]:
    """(value, record) of key ``name``, generated in ``km``'s token as any backup-capable key is,
    its value learnt through the backup path: wrapped out (AES-KW) under a trusted transport key
    the test chose, which needs the SO PIN. It encrypts like any key keymgr made."""
    record = km.create_key(name, profile=profile, backup=True)
    transport = os.urandom(32)
    (wrapped,) = export_wrapped(token_of(km), [record.primary_version.key_id], transport, so_pin=Pin(so_pin))
    return aes_key_unwrap(transport, wrapped), record
