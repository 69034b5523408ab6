"""Public-key recipients: a data key for someone's RSA or EC key pair on a token.

Encrypting needs only the public key (a PEM, a DER ``SubjectPublicKeyInfo``
or a certificate): no token, no PIN, so a server can encrypt to a custodian's
USB key it has never seen. Decrypting uses the private key inside its token
through :mod:`keymgr.hsm.asym` (:class:`TokenPrivateKey`).

Two standard CMS recipient types (RFC 5652 section 6.2), chosen by key type:

* RSA: ``KeyTransRecipientInfo`` (version 2, ``rid`` the subject key
  identifier) with ``id-RSAES-OAEP`` (RFC 8017 section 7.1; parameters per
  RFC 4055 section 4.1: hash and MGF1 hash SHA-256 where the token can
  decrypt with it, SHA-1 where it can only do that (SoftHSM 2.6.1), empty
  label). PKCS#1 v1.5 is never written nor read (Bleichenbacher 1998).
* EC P-256 / P-384: ``KeyAgreeRecipientInfo`` (version 3) after RFC 5753
  section 3.1: ephemeral-static ECDH (a fresh host key pair per message, its
  public key in ``originatorKey``), ``dhSinglePass-stdDH-sha256kdf-scheme``
  (1.3.132.1.11.1) with ``id-aes256-wrap`` (RFC 3394) as the key-wrap
  algorithm, KEK = ANSI X9.63 KDF with SHA-256 over Z and the DER
  ``ECC-CMS-SharedInfo`` (keyInfo ``id-aes256-wrap`` with absent
  parameters, entityUInfo = ukm if any, suppPubInfo = 256 as 4 bytes).
  The originator's point is checked to lie on the curve before the token
  sees it (invalid-curve attacks).

A recipient is named by its subject key identifier (RFC 5280 section
4.2.1.2, method 1: SHA-1 of the public key bits), so the reader finds its
entry without trying every recipient, and OpenSSL's ``cms -decrypt -inkey``
reads both kinds. Recipients that are not ours return ``None``; a recipient
that is ours and fails is the one :class:`~keymgr.errors.IntegrityError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import BinaryIO, Protocol

from asn1crypto import cms, core, keys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from keymgr import errors
from keymgr.envelope._aead import DataKey
from keymgr.envelope.cms import open_message, seal_message
from keymgr.envelope.kek import Recipient
from keymgr.envelope.recipients import recipient_kind
from keymgr.envelope.stream import decrypt_stream, encrypt_stream
from keymgr.hsm import TokenSession, asym, probe

__all__ = [
    "OID_ECDH_SHA256KDF", "OID_RSAES_OAEP", "EcdhRecipient", "PublicKey", "RsaOaepRecipient", "TokenPrivateKey",
    "Unwrapper", "decrypt_stream_with", "decrypt_with", "encrypt_stream_to", "encrypt_to", "load_public_key",
    "parse_originator_key", "public_key_recipient", "subject_key_identifier",
]

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

OID_RSAES_OAEP = "1.2.840.113549.1.1.7"
OID_ECDH_SHA256KDF = "1.3.132.1.11.1"
OID_ECDH_SHA384KDF = "1.3.132.1.11.2"
OID_AES256_WRAP = "2.16.840.1.101.3.4.1.45"
OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"sha1": hashes.SHA1, "sha256": hashes.SHA256}
_KDF_HASHES: dict[str, type[hashes.HashAlgorithm]] = {OID_ECDH_SHA256KDF: hashes.SHA256,
                                                      OID_ECDH_SHA384KDF: hashes.SHA384}
_CURVES = {"secp256r1": "1.2.840.10045.3.1.7", "secp384r1": "1.3.132.0.34"}
_MIN_RSA_BITS = 2048
_NOT_AUTHENTIC = "the data key is not authentic"


class Unwrapper(Protocol):
    """The decrypt side of a recipient: the data key in ``ri`` if it is ours, else None."""

    def unwrap(self, ri: cms.RecipientInfo) -> DataKey | None: ...


def load_public_key(data: bytes) -> PublicKey:
    """An RSA or EC public key from a PEM / DER public key or X.509 certificate."""
    raw = bytes(data)
    loaders = ((serialization.load_pem_public_key, x509.load_pem_x509_certificate) if b"-----BEGIN" in raw
               else (serialization.load_der_public_key, x509.load_der_x509_certificate))
    for loader in loaders:
        try:
            loaded = loader(raw)
        except ValueError:
            continue
        key = loaded.public_key() if isinstance(loaded, x509.Certificate) else loaded
        if isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
            return key
        raise errors.ConfigurationError("only RSA and EC public keys can be recipients")
    raise errors.ConfigurationError("not a PEM or DER public key or certificate")


def subject_key_identifier(key: PublicKey) -> bytes:
    """RFC 5280 section 4.2.1.2 method 1: SHA-1 of the subjectPublicKey bits."""
    return x509.SubjectKeyIdentifier.from_public_key(key).digest


def _oaep_algorithm(oaep_hash: str) -> cms.KeyEncryptionAlgorithm:
    """``id-RSAES-OAEP`` with its parameters (RFC 4055 section 4.1): for SHA-1 all fields take
    their defaults, so the parameters are an empty SEQUENCE; for SHA-256 hash and MGF1 hash are named."""
    if oaep_hash == "sha1":
        return cms.KeyEncryptionAlgorithm.load(core.Sequence(contents=core.ObjectIdentifier(OID_RSAES_OAEP).dump()
                                                             + b"\x30\x00").dump())
    return cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_oaep", "parameters": {
        "hash_algorithm": {"algorithm": oaep_hash},
        "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": oaep_hash}},
    }})


class _PublicKeyRecipient:
    """What both recipient kinds share: the key, its subject key identifier, a name to show."""

    def __init__(self, public_key: PublicKey, name: str) -> None:
        self._ski = subject_key_identifier(public_key)
        self._name = name

    def _what(self) -> str:
        raise NotImplementedError

    @property
    def description(self) -> str:
        who = f"{self._name!r} " if self._name else ""
        kind, scheme = self._what().split("|")
        return f"{kind} key {who}(SKI {self._ski.hex()}, {scheme})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"


class RsaOaepRecipient(_PublicKeyRecipient):
    """An RSA public key as a recipient: RSAES-OAEP ``KeyTransRecipientInfo``."""

    def __init__(self, public_key: rsa.RSAPublicKey, *, oaep_hash: str = "sha256", name: str = "") -> None:
        if oaep_hash not in _HASHES:
            raise errors.ConfigurationError("OAEP hash must be sha1 or sha256")
        if public_key.key_size < _MIN_RSA_BITS:
            raise errors.PolicyError(f"RSA keys below {_MIN_RSA_BITS} bits are refused (NIST SP 800-131A)")
        super().__init__(public_key, name)
        self._key = public_key
        self._hash = oaep_hash

    def _what(self) -> str:
        return f"RSA-{self._key.key_size}|OAEP-{self._hash.upper()}"

    def wrap(self, dek: DataKey) -> cms.RecipientInfo:
        algorithm = _HASHES[self._hash]()
        encrypted = self._key.encrypt(dek.reveal(), padding.OAEP(padding.MGF1(algorithm), algorithm, None))
        return cms.RecipientInfo.load(cms.RecipientInfo(name="ktri", value=cms.KeyTransRecipientInfo({
            "version": "v2",
            "rid": cms.RecipientIdentifier(name="subject_key_identifier", value=self._ski),
            "key_encryption_algorithm": _oaep_algorithm(self._hash),
            "encrypted_key": encrypted,
        })).dump())


#: AlgorithmIdentifier { id-aes256-wrap } with absent parameters (RFC 3565 section 2.3.2)
_AES256_WRAP_ID = core.Sequence(contents=core.ObjectIdentifier(OID_AES256_WRAP).dump())


def _shared_info(ukm: bytes | None) -> bytes:
    """DER ``ECC-CMS-SharedInfo`` (RFC 5753 section 7.2) for a 256-bit AES key-wrap key."""
    info = core.Sequence()
    parts = [_AES256_WRAP_ID.dump()]
    if ukm is not None:
        parts.append(core.OctetString(ukm, explicit=0).dump())
    parts.append(core.OctetString((256).to_bytes(4, "big"), explicit=2).dump())
    info.contents = b"".join(parts)
    return info.dump()


def _kek(z: bytes | bytearray, kdf_oid: str, ukm: bytes | None) -> bytes:
    kdf = X963KDF(algorithm=_KDF_HASHES[kdf_oid](), length=32, sharedinfo=_shared_info(ukm))
    return kdf.derive(bytes(z))


class EcdhRecipient(_PublicKeyRecipient):
    """An EC P-256 / P-384 public key as a recipient: RFC 5753 ``KeyAgreeRecipientInfo``."""

    def __init__(self, public_key: ec.EllipticCurvePublicKey, *, name: str = "") -> None:
        if public_key.curve.name not in _CURVES:
            raise errors.ConfigurationError("EC recipients must be on P-256 or P-384")
        super().__init__(public_key, name)
        self._key = public_key

    def _what(self) -> str:
        return f"EC {self._key.curve.name}|ECDH"

    def wrap(self, dek: DataKey) -> cms.RecipientInfo:
        ephemeral = ec.generate_private_key(self._key.curve)
        z = ephemeral.exchange(ec.ECDH(), self._key)
        encrypted = aes_key_wrap(_kek(z, OID_ECDH_SHA256KDF, None), dek.reveal())
        point = ephemeral.public_key().public_bytes(serialization.Encoding.X962,
                                                    serialization.PublicFormat.UncompressedPoint)
        originator = keys.PublicKeyInfo({"algorithm": {"algorithm": "ec"}, "public_key": point})
        return cms.RecipientInfo.load(cms.RecipientInfo(name="kari", value=cms.KeyAgreeRecipientInfo({
            "version": "v3",
            "originator": cms.OriginatorIdentifierOrKey(name="originator_key", value=originator),
            "key_encryption_algorithm": {"algorithm": OID_ECDH_SHA256KDF,
                                         "parameters": _AES256_WRAP_ID},
            "recipient_encrypted_keys": [{
                "rid": cms.KeyAgreementRecipientIdentifier(name="r_key_id",
                                                           value={"subject_key_identifier": self._ski}),
                "encrypted_key": encrypted,
            }],
        })).dump())


def public_key_recipient(key: PublicKey | bytes, *, oaep_hash: str = "sha256", name: str = "") -> Recipient:
    """The recipient for a public key (object, PEM, DER or certificate): RSA-OAEP or ECDH by key type.

    ``oaep_hash``: "sha256" unless the recipient's token can only do SHA-1
    (``keymgr token keygen`` prints which); ignored for EC keys.
    """
    public = load_public_key(key) if isinstance(key, (bytes, bytearray)) else key
    if isinstance(public, rsa.RSAPublicKey):
        return RsaOaepRecipient(public, oaep_hash=oaep_hash, name=name)
    if isinstance(public, ec.EllipticCurvePublicKey):
        return EcdhRecipient(public, name=name)
    raise errors.ConfigurationError("only RSA and EC public keys can be recipients")


def parse_originator_key(originator: keys.PublicKeyInfo, curve: str) -> bytes:
    """The originator's uncompressed point, checked to be id-ecPublicKey on ``curve`` and on
    the curve (RFC 5753 section 3.1.1: parameters absent, NULL or the named curve)."""
    try:
        algorithm = originator["algorithm"]
        oid = algorithm["algorithm"].dotted
        params = algorithm["parameters"]
        point = bytes(originator["public_key"].contents[1:]) if originator["public_key"].contents else b""
        unused_bits = originator["public_key"].contents[:1]
    except (ValueError, TypeError, KeyError, AttributeError):
        raise errors.FormatError("KeyAgreeRecipientInfo: malformed originator key") from None
    if oid != OID_EC_PUBLIC_KEY or unused_bits != b"\x00":
        raise errors.FormatError("KeyAgreeRecipientInfo: the originator key is not an EC public key")
    named = params.chosen if isinstance(params, keys.ECDomainParameters) else params
    if not (isinstance(named, (core.Void, core.Null)) or
            (isinstance(named, core.ObjectIdentifier) and named.dotted == _CURVES[curve])):
        raise errors.FormatError("KeyAgreeRecipientInfo: the originator key is on another curve")
    asym.load_ec_point(curve, point)
    return point


class TokenPrivateKey:
    """A key pair on a token as the decrypt side of RSA-OAEP or ECDH recipients."""

    def __init__(self, ts: TokenSession, ref: asym.KeyPairRef) -> None:
        self._ts = ts
        self._ref = ref
        self._public = asym.public_key(ts, ref)
        self._ski = subject_key_identifier(self._public)

    @property
    def ref(self) -> asym.KeyPairRef:
        return self._ref

    @property
    def description(self) -> str:
        return f"{self._ref.kind} key pair {self._ref.label!r} on token {self._ts.label!r}"

    def __repr__(self) -> str:
        return f"TokenPrivateKey({self.description})"

    def recipient(self) -> Recipient:
        """The encrypt side, with the OAEP hash this token can decrypt (SHA-256 if it can)."""
        if isinstance(self._public, rsa.RSAPublicKey):
            oaep_hash = probe(self._ts).oaep_hash()
            if oaep_hash is None:
                raise errors.MechanismUnsupportedError(f"token {self._ts.label!r} cannot decrypt RSA-OAEP")
            return RsaOaepRecipient(self._public, oaep_hash=oaep_hash, name=self._ref.label)
        return EcdhRecipient(self._public, name=self._ref.label)

    def unwrap(self, ri: cms.RecipientInfo) -> DataKey | None:
        kind = recipient_kind(ri)
        if kind == "ktri" and self._ref.is_rsa:
            return self._unwrap_ktri(ri.chosen)
        if kind == "kari" and not self._ref.is_rsa:
            return self._unwrap_kari(ri.chosen)
        return None

    def _unwrap_ktri(self, ktri: cms.KeyTransRecipientInfo) -> DataKey | None:
        try:
            rid = ktri["rid"]
            if rid.name != "subject_key_identifier" or bytes(rid.chosen.native) != self._ski:
                return None
            algorithm = ktri["key_encryption_algorithm"]
            params = algorithm["parameters"]
            encrypted = bytes(ktri["encrypted_key"].native)
            oid = algorithm["algorithm"].dotted
            hash_name = params["hash_algorithm"]["algorithm"].native
            mgf = params["mask_gen_algorithm"]
            mgf_hash = mgf["parameters"]["algorithm"].native
            label = params["p_source_algorithm"]["parameters"].native
        except (ValueError, TypeError, KeyError, AttributeError):
            raise errors.FormatError("KeyTransRecipientInfo: malformed") from None
        if oid != OID_RSAES_OAEP or ktri["version"].native != "v2":
            raise errors.FormatError("KeyTransRecipientInfo: keymgr reads only RSAES-OAEP (RFC 4055), version 2")
        if hash_name not in _HASHES or mgf["algorithm"].native != "mgf1" or mgf_hash != hash_name or label:
            raise errors.FormatError("KeyTransRecipientInfo: unsupported OAEP parameters")
        raw = asym.rsa_oaep_decrypt(self._ts, self._ref, encrypted, hash=hash_name)
        return _data_key(raw)

    def _unwrap_kari(self, kari: cms.KeyAgreeRecipientInfo) -> DataKey | None:
        try:
            encrypted = None
            for rek in kari["recipient_encrypted_keys"]:
                rid = rek["rid"]
                if rid.name == "r_key_id" and bytes(rid.chosen["subject_key_identifier"].native) == self._ski:
                    encrypted = bytes(rek["encrypted_key"].native)
                    break
            if encrypted is None:
                return None
            originator = kari["originator"]
            algorithm = kari["key_encryption_algorithm"]
            kdf_oid = algorithm["algorithm"].dotted
            wrap = cms.KeyEncryptionAlgorithm.load(algorithm["parameters"].dump())
            wrap_oid, wrap_params = wrap["algorithm"].dotted, wrap["parameters"]
            ukm = kari["ukm"].native
        except (ValueError, TypeError, KeyError, AttributeError):
            raise errors.FormatError("KeyAgreeRecipientInfo: malformed") from None
        if kari["version"].native != "v3" or originator.name != "originator_key":
            raise errors.FormatError("KeyAgreeRecipientInfo: version 3 with an originator key is required (RFC 5753)")
        wrap_ok = wrap_oid == OID_AES256_WRAP and isinstance(wrap_params, (core.Void, core.Null))
        if kdf_oid not in _KDF_HASHES or not wrap_ok:
            raise errors.FormatError("KeyAgreeRecipientInfo: keymgr reads dhSinglePass-stdDH-sha256kdf/sha384kdf "
                                     "with id-aes256-wrap")
        if len(encrypted) != 40:
            raise errors.IntegrityError(_NOT_AUTHENTIC)
        point = parse_originator_key(originator.chosen, str(self._ref.curve))
        z = asym.ecdh_derive(self._ts, self._ref, point)
        try:
            kek = _kek(z, kdf_oid, None if ukm is None else bytes(ukm))
        finally:
            z[:] = bytes(len(z))
        try:
            raw = bytearray(aes_key_unwrap(kek, encrypted))
        except InvalidUnwrap:
            raise errors.IntegrityError(_NOT_AUTHENTIC) from None
        return _data_key(raw)


def _data_key(raw: bytearray) -> DataKey:
    try:
        if len(raw) != 32:
            raise errors.IntegrityError(_NOT_AUTHENTIC)
        return DataKey(raw)
    finally:
        raw[:] = bytes(len(raw))


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
