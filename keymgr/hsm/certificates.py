"""X.509 certificate objects on a token (CKO_CERTIFICATE), read by CKA_ID.

Smart cards and PIV keys usually carry the certificate of each key pair
beside it under the same CKA_ID (PKCS#11 v2.40 section 4.6); keymgr reads it
when it registers a custodian, so the register holds the certificate the
custodian's organisation issued rather than one keymgr made up.
"""

from __future__ import annotations

from typing import Any

import pkcs11.exceptions as p11x
from pkcs11 import Attribute, ObjectClass

from keymgr.hsm.sessions import TokenSession

__all__ = ["find_certificates"]


def find_certificates(ts: TokenSession, key_id: bytes) -> list[bytes]:
    """The DER value of every certificate object with this CKA_ID (usually zero or one)."""

    def call(session: Any) -> list[bytes]:
        found = []
        for cert in session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.ID: key_id}):
            try:
                value = cert[Attribute.VALUE]
            except (p11x.AttributeTypeInvalid, p11x.AttributeSensitive, KeyError):
                continue
            if value:
                found.append(bytes(value))
        return found

    return ts.run("read certificates", call)
