"""Hazmat for interop tests and published vectors only: secret keys whose value is known.

Every key keymgr makes for real use is generated inside the token and never
leaves it (:mod:`keymgr.hsm.templates`). Two jobs need the opposite, a key whose
bytes a test already holds:

* **interop**: `openssl cms -decrypt -secretkey HEX` can decrypt a keymgr
  message only if the test knows the KEK's value, so the test imports that
  value into the token as a KEK (:func:`import_secret_key`, reached through
  ``Keyring.create(..., _value=...)``);
* **vectors**: Wycheproof's AES-KW / KWP cases name their wrapping key, so
  each one is imported as a short-lived session object and the token's own
  C_UnwrapKey is run on the case (:func:`unwrap_with_session_key`).

A key created from a known value is, by PKCS#11's own account, not
``ALWAYS_SENSITIVE`` and not ``LOCAL``; it is no keymgr key. Nothing in keymgr
outside the tests calls this module.
"""

from __future__ import annotations

from typing import Any

import pkcs11
import pkcs11.exceptions as p11x
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from keymgr.hsm.objects import _KEY_TYPES, WRAP_MECHANISMS, _template, checked_for_authenticity
from keymgr.hsm.sessions import TokenSession
from keymgr.hsm.templates import KeyTemplate

__all__ = ["import_secret_key", "unwrap_with_session_key"]

#: AES key lengths; an unwrapped key of any other length is made a GENERIC_SECRET.
_AES_LENGTHS = frozenset({16, 24, 32})
#: What a token may answer when the unwrapped value cannot be a key of the type asked for.
_NOT_THIS_KEY_TYPE = (p11x.KeySizeRange, p11x.KeyTypeInconsistent, p11x.TemplateInconsistent,
                      p11x.AttributeValueInvalid, p11x.WrappedKeyLenRange)


def import_secret_key(ts: TokenSession, template: KeyTemplate, *, label: str, key_id: bytes, value: bytes) -> None:
    """Create a key object with the attributes of ``template`` and the known ``value`` (C_CreateObject).

    Tests only (module docstring): the value has been outside the token.
    """
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
    Tests and vectors only (module docstring).
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
