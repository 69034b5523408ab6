"""Registering custodians: public key, certificate from the token or self-signed, proof of possession."""

from __future__ import annotations

import uuid

import pkcs11
import pytest
from cryptography import x509

from keymgr._certs import spki_der
from keymgr.custody.custodian_token import enroll_custodian
from keymgr.hsm import asym, open_token
from tests.conftest import softhsm_token

#: the enrolled key pairs stay on the shared tokens, each label with a random part
pytestmark = pytest.mark.leaves_objects("enrol-")


def _token_with_pair(kind: str) -> tuple[object, asym.KeyPairRef]:
    ts = open_token(softhsm_token("custodian-2").uri())
    return ts, asym.generate_keypair(ts, kind, label=f"enrol-{uuid.uuid4().hex[:8]}")


def test_without_a_certificate_the_token_signs_a_self_signed_one() -> None:
    ts, ref = _token_with_pair("ec-p256")
    custodian = enroll_custodian("erin", ts, key_label=ref.label)
    cert = x509.load_der_x509_certificate(custodian.certificate_der)
    assert custodian.self_signed and custodian.kind == "ec-p256"
    assert spki_der(cert.public_key()) == custodian.public_key_der == spki_der(asym.public_key(ts, ref))
    cert.verify_directly_issued_by(cert)  # the token's signature over it is valid
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "erin"


def test_a_certificate_on_the_token_is_kept() -> None:
    ts, ref = _token_with_pair("rsa-2048")
    issued = enroll_custodian("frank", ts, key_label=ref.label).certificate_der  # stands in for a CA's

    def store(session: pkcs11.Session) -> None:
        session.create_object({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.CERTIFICATE,
                               pkcs11.Attribute.CERTIFICATE_TYPE: pkcs11.CertificateType.X_509,
                               pkcs11.Attribute.TOKEN: True, pkcs11.Attribute.ID: ref.key_id,
                               pkcs11.Attribute.LABEL: ref.label, pkcs11.Attribute.VALUE: issued,
                               pkcs11.Attribute.SUBJECT: x509.load_der_x509_certificate(issued).subject.public_bytes()})

    ts.run("store certificate (test)", store)
    custodian = enroll_custodian("frank", ts, key_label=ref.label)
    assert not custodian.self_signed and custodian.certificate_der == issued
    assert custodian.oaep_hash in ("sha1", "sha256")
