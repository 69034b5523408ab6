"""Signature algorithms and self-signed certificates for keys that live on tokens.

A base helper (``cryptography`` only): custody signs with it, and
:mod:`keymgr.recipients.token_keys` certifies token key pairs with it.

A custodian's key signs approvals and transcripts; verification happens on
the host with ``cryptography``. Two algorithm families, fixed per key kind:

* EC P-256 / P-384: ECDSA with SHA-256 / SHA-384 (RFC 5758 section 3.2,
  the hash matched to the curve as NSA Suite B / RFC 5480 section 4 advise);
* RSA >= 2048: RSASSA-PSS with SHA-256, MGF1-SHA-256, 32-byte salt (RFC 4055,
  RFC 8017 section 8.1), never PKCS#1 v1.5 (Bleichenbacher-style forgeries
  against lax verifiers).

Why self-signed certificates: CMS SignedData (RFC 5652) names each signer by
issuer and serial number, and ``openssl cms -verify`` wants the signer's
certificate. A custodian whose token holds no certificate gets one made by
their own token key at ``keymgr custodian add`` (which doubles as proof that
the token holds the private key); it asserts nothing but "this key belongs to
the custodian registered under this name", and the register, MACed in the
HSM, is what keymgr trusts, not the certificate.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from asn1crypto import algos, keys, x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from keymgr import errors

__all__ = ["PublicKey", "kind_of", "load_spki", "self_signed_certificate", "signature_algorithm",
           "spki_der", "verify_signature", "certificate_public_key"]

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

_PSS_PARAMS = {"hash_algorithm": {"algorithm": "sha256"},
               "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
               "salt_length": 32, "trailer_field": "trailer_field_bc"}
#: RFC 5280 4.1.2.5: UTCTime through 2049, which 20 years from now stays within
_CERT_YEARS = 20


def kind_of(key: PublicKey) -> str:
    """keymgr's kind for a public key; :class:`~keymgr.errors.PolicyError` for keys too weak or unknown."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise errors.PolicyError(f"an RSA custodian key must have at least 2048 bits, not {key.key_size}")
        return f"rsa-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        name = {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(key.curve.name)
        if name:
            return name
    raise errors.PolicyError("a custodian key must be RSA (2048 bits or more) or EC P-256 / P-384")


def spki_der(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_spki(der: bytes) -> PublicKey:
    """A SubjectPublicKeyInfo keymgr accepts; :class:`~keymgr.errors.FormatError` otherwise."""
    try:
        key = serialization.load_der_public_key(bytes(der))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise errors.FormatError("not a DER SubjectPublicKeyInfo of a supported key") from None
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise errors.FormatError("not an RSA or EC public key")
    try:
        kind_of(key)
    except errors.PolicyError as exc:
        raise errors.FormatError(str(exc)) from None
    return key


def signature_algorithm(kind: str) -> dict[str, Any]:
    """The AlgorithmIdentifier (asn1crypto native form) of signatures by a key of ``kind``."""
    if kind.startswith("rsa-"):
        return {"algorithm": "rsassa_pss", "parameters": _PSS_PARAMS}
    return {"algorithm": "sha384_ecdsa" if kind == "ec-p384" else "sha256_ecdsa"}


def verify_signature(key: PublicKey, signature: bytes, data: bytes) -> bool:
    """True if ``signature`` is the kind-appropriate signature of ``data`` by ``key``."""
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(bytes(signature), bytes(data), padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
        else:
            digest = hashes.SHA384() if key.curve.name == "secp384r1" else hashes.SHA256()
            key.verify(bytes(signature), bytes(data), ec.ECDSA(digest))
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def certificate_public_key(der: bytes) -> PublicKey:
    """The subject public key of a DER X.509 certificate; FormatError if unreadable or unusable."""
    try:
        cert = x509.Certificate.load(bytes(der), strict=True)
        spki = cert["tbs_certificate"]["subject_public_key_info"].dump()
    except (ValueError, TypeError, KeyError):
        raise errors.FormatError("not a DER X.509 certificate") from None
    return load_spki(spki)


def self_signed_certificate(key: PublicKey, common_name: str, sign: Callable[[bytes], bytes], *,
                            now: datetime | None = None) -> bytes:
    """A v3 self-signed certificate for ``key``, signed by its own private half via ``sign``.

    The signature is checked before the certificate is returned, so a token that
    does not hold the private half of ``key`` is caught here.
    """
    kind = kind_of(key)
    start = (now or datetime.now(UTC)).replace(microsecond=0) - timedelta(hours=1)
    name = x509.Name.build({"common_name": common_name, "organization_name": "keymgr custodian"})
    spki = spki_der(key)
    key_usage = {"digital_signature", "key_encipherment"} if kind.startswith("rsa-") else \
        {"digital_signature", "key_agreement"}
    tbs = x509.TbsCertificate({
        "version": "v3",
        "serial_number": int.from_bytes(os.urandom(16), "big") >> 1,
        "signature": signature_algorithm(kind),
        "issuer": name,
        "validity": {"not_before": x509.Time({"utc_time": start}),
                     "not_after": x509.Time({"utc_time": start + timedelta(days=365 * _CERT_YEARS)})},
        "subject": name,
        "subject_public_key_info": keys.PublicKeyInfo.load(spki),
        "extensions": [
            {"extn_id": "basic_constraints", "critical": True, "extn_value": {"ca": False}},
            {"extn_id": "key_usage", "critical": True, "extn_value": key_usage},
            {"extn_id": "key_identifier", "critical": False, "extn_value": hashlib.sha1(spki).digest()},  # noqa: S324 - RFC 5280 4.2.1.2 method 1
        ],
    })
    data = tbs.dump()
    signature = sign(data)
    if not verify_signature(key, signature, data):
        raise errors.PolicyError("the token's signature does not verify with the public key it reported: "
                                 "the token does not hold this key pair's private half")
    cert = x509.Certificate({"tbs_certificate": tbs, "signature_algorithm": algos.SignedDigestAlgorithm(
        signature_algorithm(kind)), "signature_value": signature})
    return bytes(cert.dump())
