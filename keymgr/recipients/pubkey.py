"""Public-key recipients: a data key for someone's RSA or EC key pair on a token.

Encrypting needs only the public key (a PEM, a DER ``SubjectPublicKeyInfo``
or a certificate): no token, no PIN, so a server can encrypt to a custodian's
USB key it has never seen. Decrypting uses the private key inside its token
(:class:`~keymgr.recipients.token_keys.TokenPrivateKey`, re-exported here).

Two standard CMS recipient types (RFC 5652 section 6.2), chosen by key type:

* RSA: ``KeyTransRecipientInfo`` with ``id-RSAES-OAEP`` (RFC 8017 section 7.1;
  parameters per RFC 4055 section 4.1: hash and MGF1 hash SHA-256 by default, or the
  hash the recipient's token decrypts (SoftHSM 2.6.1: SHA-1 only), empty label).
  PKCS#1 v1.5 is never written, and refused on reading (Bleichenbacher 1998).
* EC P-256 / P-384: ``KeyAgreeRecipientInfo`` (version 3) after RFC 5753
  section 3.1: ephemeral-static ECDH (a fresh host key pair per message, its
  public key in ``originatorKey``), ``dhSinglePass-stdDH-sha256kdf-scheme``
  (1.3.132.1.11.1) with ``id-aes256-wrap`` (RFC 3394) as the key-wrap
  algorithm, KEK = ANSI X9.63 KDF with SHA-256 over Z and the DER
  ``ECC-CMS-SharedInfo`` (keyInfo ``id-aes256-wrap`` with absent
  parameters, entityUInfo = ukm if any, suppPubInfo = 256 as 4 bytes).
  The originator's point is checked to lie on the curve before the token
  sees it (invalid-curve attacks).

How the recipient is named (:mod:`keymgr.recipients.identities`): a bare public key by
its subject key identifier (RFC 5280 section 4.2.1.2, method 1; KeyTrans version 2,
``rKeyId``), a certificate by its issuer and serial number (KeyTrans version 0), as
``openssl cms -encrypt -recip`` and Bouncy Castle do, so that any CMS reader holding the
certificate finds its entry. What keymgr reads of others' messages is in
:mod:`keymgr.recipients._pk_algorithms`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import BinaryIO, Protocol

from asn1crypto import cms, keys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from keymgr import errors
from keymgr.envelope._aead import DataKey
from keymgr.envelope.cms import open_message, seal_message
from keymgr.envelope.stream import decrypt_stream, encrypt_stream
from keymgr.recipients._pk_algorithms import (
    AES256_WRAP_ID,
    CURVES,
    OAEP_HASHES,
    OID_ECDH_SHA256KDF,
    OID_RSAES_OAEP,
    PublicKey,
    derive_kek,
    load_public_key,
    oaep_algorithm,
    parse_originator_key,
    subject_key_identifier,
)
from keymgr.recipients.identities import find_certificate, issuer_and_serial
from keymgr.recipients.kek import Recipient
from keymgr.recipients.token_keys import TokenKeyPairs, TokenPrivateKey

__all__ = [
    "OAEP_HASHES", "OID_ECDH_SHA256KDF", "OID_RSAES_OAEP", "EcdhRecipient", "PublicKey", "RsaOaepRecipient",
    "TokenKeyPairs", "TokenPrivateKey", "Unwrapper", "decrypt_stream_with", "decrypt_with", "encrypt_stream_to",
    "encrypt_to", "load_public_key", "parse_originator_key", "public_key_recipient", "subject_key_identifier",
]

_MIN_RSA_BITS = 2048


class Unwrapper(Protocol):
    """The decrypt side of a recipient: the data key in ``ri`` if it is ours, else None."""

    def unwrap(self, ri: cms.RecipientInfo) -> DataKey | None: ...


class _PublicKeyRecipient:
    """What both recipient kinds share: the key, how the recipient is named, a name to show."""

    def __init__(self, public_key: PublicKey, name: str, certificate: bytes | None) -> None:
        self._ski = subject_key_identifier(public_key)
        self._name = name
        self._issuer_serial = None
        if certificate is not None:
            if load_public_key(certificate) != public_key:
                raise errors.ConfigurationError("the certificate is for another public key")
            self._issuer_serial = issuer_and_serial(certificate)

    def _what(self) -> str:
        raise NotImplementedError

    @property
    def description(self) -> str:
        who = f"{self._name!r} " if self._name else ""
        kind, scheme = self._what().split("|")
        named = f"serial {self._issuer_serial[1]:x} of {self._issuer_serial[0].human_friendly}" \
            if self._issuer_serial else f"SKI {self._ski.hex()}"
        return f"{kind} key {who}({named}, {scheme})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"

    def _issuer_and_serial(self) -> cms.IssuerAndSerialNumber | None:
        if self._issuer_serial is None:
            return None
        return cms.IssuerAndSerialNumber({"issuer": self._issuer_serial[0], "serial_number": self._issuer_serial[1]})


class RsaOaepRecipient(_PublicKeyRecipient):
    """An RSA public key as a recipient: RSAES-OAEP ``KeyTransRecipientInfo``; named by the
    certificate's issuer and serial number when one is given, else by subject key identifier."""

    def __init__(self, public_key: rsa.RSAPublicKey, *, oaep_hash: str = "sha256", name: str = "",
                 certificate: bytes | None = None) -> None:
        if oaep_hash not in OAEP_HASHES:
            raise errors.ConfigurationError(f"OAEP hash must be one of {', '.join(OAEP_HASHES)}")
        if public_key.key_size < _MIN_RSA_BITS:
            raise errors.PolicyError(f"RSA keys below {_MIN_RSA_BITS} bits are refused (NIST SP 800-131A)")
        super().__init__(public_key, name, certificate)
        self._key = public_key
        self._hash = oaep_hash

    @property
    def oaep_hash(self) -> str:
        return self._hash

    def _what(self) -> str:
        return f"RSA-{self._key.key_size}|OAEP-{self._hash.upper()}"

    def wrap(self, dek: DataKey) -> cms.RecipientInfo:
        algorithm = OAEP_HASHES[self._hash]()
        encrypted = self._key.encrypt(dek.reveal(), padding.OAEP(padding.MGF1(algorithm), algorithm, None))
        by_cert = self._issuer_and_serial()
        rid = (cms.RecipientIdentifier(name="issuer_and_serial_number", value=by_cert) if by_cert is not None
               else cms.RecipientIdentifier(name="subject_key_identifier", value=self._ski))
        return cms.RecipientInfo.load(cms.RecipientInfo(name="ktri", value=cms.KeyTransRecipientInfo({
            "version": "v0" if by_cert is not None else "v2",  # RFC 5652 section 6.2.1
            "rid": rid,
            "key_encryption_algorithm": oaep_algorithm(self._hash),
            "encrypted_key": encrypted,
        })).dump())


class EcdhRecipient(_PublicKeyRecipient):
    """An EC P-256 / P-384 public key as a recipient: RFC 5753 ``KeyAgreeRecipientInfo``."""

    def __init__(self, public_key: ec.EllipticCurvePublicKey, *, name: str = "",
                 certificate: bytes | None = None) -> None:
        if public_key.curve.name not in CURVES:
            raise errors.ConfigurationError("EC recipients must be on P-256 or P-384")
        super().__init__(public_key, name, certificate)
        self._key = public_key

    def _what(self) -> str:
        return f"EC {self._key.curve.name}|ECDH"

    def wrap(self, dek: DataKey) -> cms.RecipientInfo:
        ephemeral = ec.generate_private_key(self._key.curve)
        z = ephemeral.exchange(ec.ECDH(), self._key)
        encrypted = aes_key_wrap(derive_kek(z, "sha256", None), dek.reveal())
        point = ephemeral.public_key().public_bytes(serialization.Encoding.X962,
                                                    serialization.PublicFormat.UncompressedPoint)
        originator = keys.PublicKeyInfo({"algorithm": {"algorithm": "ec"}, "public_key": point})
        by_cert = self._issuer_and_serial()
        rid = (cms.KeyAgreementRecipientIdentifier(name="issuer_and_serial_number", value=by_cert)
               if by_cert is not None else
               cms.KeyAgreementRecipientIdentifier(name="r_key_id", value={"subject_key_identifier": self._ski}))
        return cms.RecipientInfo.load(cms.RecipientInfo(name="kari", value=cms.KeyAgreeRecipientInfo({
            "version": "v3",
            "originator": cms.OriginatorIdentifierOrKey(name="originator_key", value=originator),
            "key_encryption_algorithm": {"algorithm": OID_ECDH_SHA256KDF, "parameters": AES256_WRAP_ID},
            "recipient_encrypted_keys": [{"rid": rid, "encrypted_key": encrypted}],
        })).dump())


def public_key_recipient(key: PublicKey | bytes, *, oaep_hash: str = "sha256", name: str = "") -> Recipient:
    """The recipient for a public key (object, PEM, DER or certificate): RSA-OAEP or ECDH by key type.

    A certificate makes the recipient named by its issuer and serial number (what other CMS
    tools look up); a bare key, by its subject key identifier. ``oaep_hash``: "sha256" unless
    the recipient's token can only do another (``keymgr token pubkey --json`` says which);
    ignored for EC keys.
    """
    certificate = find_certificate(key) if isinstance(key, (bytes, bytearray)) else None
    public = load_public_key(key) if isinstance(key, (bytes, bytearray)) else key
    if isinstance(public, rsa.RSAPublicKey):
        return RsaOaepRecipient(public, oaep_hash=oaep_hash, name=name, certificate=certificate)
    if isinstance(public, ec.EllipticCurvePublicKey):
        return EcdhRecipient(public, name=name, certificate=certificate)
    raise errors.ConfigurationError("only RSA and EC public keys can be recipients")


def _wrap_all(recipients: Sequence[Recipient]) -> tuple[DataKey, list[cms.RecipientInfo]]:
    if not recipients:
        raise errors.ConfigurationError("name at least one recipient")
    dek = DataKey(os.urandom(32))
    try:
        return dek, [r.wrap(dek) for r in recipients]
    except BaseException:
        dek.wipe()
        raise


def _first(unwrappers: Sequence[Unwrapper]) -> Callable[[cms.RecipientInfo], DataKey | None]:
    def unwrap(ri: cms.RecipientInfo) -> DataKey | None:
        for unwrapper in unwrappers:
            found = unwrapper.unwrap(ri)
            if found is not None:
                return found
        return None
    return unwrap


def encrypt_to(plaintext: bytes, recipients: Sequence[Recipient], *, context: Mapping[str, str] | None = None,
               compat_openssl: bool = False) -> bytes:
    """A CMS message for public-key (or any) recipients, with no token of our own involved."""
    dek, ris = _wrap_all(recipients)
    try:
        return seal_message(bytes(plaintext), dek=dek, recipient_infos=ris, context=context,
                            compat_openssl=compat_openssl)
    finally:
        dek.wipe()


def decrypt_with(blob: bytes, keys_: Sequence[Unwrapper], *, context: Mapping[str, str] | None = None) -> bytes:
    """Decrypt a message with the first of ``keys_`` that is one of its recipients."""
    return open_message(bytes(blob), unwrap=_first(keys_), context=context)


def encrypt_stream_to(src: BinaryIO, dst: BinaryIO, recipients: Sequence[Recipient], *,
                      context: Mapping[str, str] | None = None) -> int:
    """The stream format for public-key (or any) recipients; returns plaintext bytes read."""
    dek, ris = _wrap_all(recipients)
    try:
        return encrypt_stream(src, dst, dek=dek, recipient_infos=ris, context=context)
    finally:
        dek.wipe()


def decrypt_stream_with(src: BinaryIO, dst: BinaryIO, keys_: Sequence[Unwrapper], *,
                        context: Mapping[str, str] | None = None) -> int:
    """Decrypt a stream with the first of ``keys_`` that is one of its recipients."""
    return decrypt_stream(src, dst, unwrap=_first(keys_), context=context)
