"""X.509 certificate objects on a token (CKO_CERTIFICATE), read and stored by CKA_ID.

Smart cards and PIV keys usually carry the certificate of each key pair
beside it under the same CKA_ID (PKCS#11 v2.40 section 4.6); keymgr reads it
when it registers a custodian, so the register holds the certificate the
custodian's organisation issued rather than one keymgr made up, and when a
message names its recipient by issuer and serial number
(:mod:`keymgr.recipients.identities`). ``keymgr token keygen --cert`` stores a
self-signed one there, as a PIV card holds its slot's certificate.
"""

from __future__ import annotations

from typing import Any

import pkcs11.exceptions as p11x
from asn1crypto import x509
from pkcs11 import Attribute, CertificateType, ObjectClass

from keymgr import errors
from keymgr.hsm.sessions import TokenSession

__all__ = ["find_certificates", "store_certificate"]


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


def store_certificate(ts: TokenSession, key_id: bytes, der: bytes, *, label: str) -> None:
    """Store ``der`` (an X.509 certificate) as a public token object under ``key_id``, the CKA_ID
    of its key pair, with the subject, issuer and serial attributes PKCS#11 section 4.6.3 lists
    for lookups. A certificate already there with the same value is left as it is."""
    try:
        tbs = x509.Certificate.load(bytes(der), strict=True)["tbs_certificate"]
        subject, issuer, serial = tbs["subject"].dump(), tbs["issuer"].dump(), tbs["serial_number"].dump()
    except (ValueError, TypeError, KeyError):
        raise errors.FormatError("not a DER X.509 certificate") from None
    if bytes(der) in find_certificates(ts, key_id):
        return
    template = {Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
                Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.LABEL: label, Attribute.ID: bytes(key_id),
                Attribute.SUBJECT: subject, Attribute.ISSUER: issuer, Attribute.SERIAL_NUMBER: serial,
                Attribute.VALUE: bytes(der)}
    ts.run("store certificate", lambda session: session.create_object(template) and None)
