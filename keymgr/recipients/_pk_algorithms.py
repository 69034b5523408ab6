"""The algorithms of public-key recipients, written and read: RSA-OAEP (RFC 4055) and ECDH with
the ANSI X9.63 KDF (RFC 5753), and the keys they are for.

What keymgr **writes**: RSAES-OAEP with SHA-256 (or the hash the recipient's token can do:
SoftHSM 2.6.1 decrypts only SHA-1, STACK-FACTS 7), MGF1 with the same hash, empty label;
ECDH ``dhSinglePass-stdDH-sha256kdf-scheme`` with ``id-aes256-wrap``.

What keymgr **reads**, because other implementations write it by default and it is sound:

* RSAES-OAEP with SHA-1, SHA-224, SHA-256, SHA-384 or SHA-512 (RFC 4055 section 2.1) and
  MGF1 with any of them, empty label; whether the token can do the hash is the token's
  answer (:class:`~keymgr.errors.MechanismUnsupportedError` names both sides).
  ``openssl cms -encrypt -keyopt rsa_padding_mode:oaep`` writes SHA-1 with empty
  parameters (every field at its DEFAULT).
* ECDH ``dhSinglePass-stdDH-shaXkdf-scheme`` for SHA-1 (OpenSSL's default, ANSI X9.63's
  OID 1.3.133.16.840.63.0.2), SHA-224, SHA-256, SHA-384, SHA-512 (SEC 1 / RFC 5753
  section 7.1.4), and their ``cofactorDH`` twins: P-256 and P-384 have cofactor 1, so
  cofactor ECDH computes the same Z. The key-wrap algorithm must be ``id-aes256-wrap``
  (what OpenSSL and Bouncy Castle pick for an AES-256 content key).

Refused with :class:`~keymgr.errors.UnsupportedAlgorithmError`, which names the algorithm:
RSA PKCS#1 v1.5 (``rsaEncryption``; Bleichenbacher 1998: a token that decrypts it for
anyone is a padding oracle), OAEP with a label or an unknown hash, MQV, other key wraps,
static-static ECDH (an originator named by certificate).
"""

from __future__ import annotations

from asn1crypto import algos, cms, core, keys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF

from keymgr import errors
from keymgr.envelope._names import describe
from keymgr.hsm.asym import load_ec_point

__all__ = [
    "CURVES", "OAEP_HASHES", "OID_AES256_WRAP", "OID_ECDH_SHA256KDF", "OID_ECDH_SHA384KDF", "OID_RSAES_OAEP",
    "OID_RSA_PKCS1", "PublicKey", "derive_kek", "load_public_key", "oaep_algorithm", "parse_originator_key",
    "read_kari_algorithm", "read_oaep_algorithm", "subject_key_identifier",
]

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

OID_RSA_PKCS1 = "1.2.840.113549.1.1.1"
OID_RSAES_OAEP = "1.2.840.113549.1.1.7"
OID_ECDH_SHA256KDF = "1.3.132.1.11.1"
OID_ECDH_SHA384KDF = "1.3.132.1.11.2"
OID_AES256_WRAP = "2.16.840.1.101.3.4.1.45"
OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"

#: RFC 4055 section 2.1's hashes, by asn1crypto's names
OAEP_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256, "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
#: dhSinglePass-{std,cofactor}DH-shaXkdf-scheme -> the KDF's hash (cofactor 1 on P-256 / P-384)
KDF_SCHEMES: dict[str, str] = {
    "1.3.133.16.840.63.0.2": "sha1", "1.3.132.1.11.0": "sha224", OID_ECDH_SHA256KDF: "sha256",
    OID_ECDH_SHA384KDF: "sha384", "1.3.132.1.11.3": "sha512",
    "1.3.133.16.840.63.0.3": "sha1", "1.3.132.1.14.0": "sha224", "1.3.132.1.14.1": "sha256",
    "1.3.132.1.14.2": "sha384", "1.3.132.1.14.3": "sha512",
}
CURVES = {"secp256r1": "1.2.840.10045.3.1.7", "secp384r1": "1.3.132.0.34"}
PKCS1_REFUSED = ("uses RSA PKCS#1 v1.5 key transport (rsaEncryption, 1.2.840.113549.1.1.1), which keymgr refuses "
                 "(Bleichenbacher's padding oracle); ask the sender for RSA-OAEP "
                 "(openssl cms -encrypt ... -keyopt rsa_padding_mode:oaep)")


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


def oaep_algorithm(oaep_hash: str) -> cms.KeyEncryptionAlgorithm:
    """``id-RSAES-OAEP`` with its parameters (RFC 4055 section 4.1). With SHA-1 every field is at
    its DEFAULT, so DER leaves them all out and the parameters are an empty SEQUENCE (``30 00``),
    as OpenSSL writes them; with another hash, hash and MGF1 hash are named, label left out."""
    if oaep_hash == "sha1":
        return cms.KeyEncryptionAlgorithm.load(core.Sequence(contents=core.ObjectIdentifier(OID_RSAES_OAEP).dump()
                                                             + b"\x30\x00").dump())
    return cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_oaep", "parameters": {
        "hash_algorithm": {"algorithm": oaep_hash},
        "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": oaep_hash}},
    }})


def _oid(algorithm: cms.KeyEncryptionAlgorithm) -> str:
    try:
        return str(algorithm["algorithm"].dotted)
    except (ValueError, TypeError, KeyError, AttributeError):
        raise errors.FormatError("malformed key-encryption algorithm") from None


def read_oaep_algorithm(algorithm: cms.KeyEncryptionAlgorithm, what: str) -> tuple[str, str]:
    """(hash, MGF1 hash) of a KeyTransRecipientInfo's algorithm; UnsupportedAlgorithmError for
    PKCS#1 v1.5 and anything else keymgr does not decrypt."""
    oid = _oid(algorithm)
    if oid == OID_RSA_PKCS1:
        raise errors.UnsupportedAlgorithmError(f"{what} {PKCS1_REFUSED}")
    if oid != OID_RSAES_OAEP:
        raise errors.UnsupportedAlgorithmError(f"{what} uses {describe(oid)}; keymgr reads RSA-OAEP (RFC 4055)")
    try:
        params = algorithm["parameters"]
        if isinstance(params, (core.Void, core.Null)):  # absent: RFC 4055 says "all defaults" is 30 00
            return "sha1", "sha1"
        hash_oid = params["hash_algorithm"]["algorithm"].dotted
        mgf = params["mask_gen_algorithm"]
        mgf_oid, mgf_hash_oid = mgf["algorithm"].dotted, mgf["parameters"]["algorithm"].dotted
        label = params["p_source_algorithm"]["parameters"].native
    except (ValueError, TypeError, KeyError, AttributeError):
        raise errors.FormatError(f"{what}: malformed RSAES-OAEP parameters") from None
    names = {algos.DigestAlgorithmId.unmap(name): name for name in OAEP_HASHES}
    for part, part_oid in (("hash", hash_oid), ("MGF1 hash", mgf_hash_oid)):
        if part_oid not in names:
            raise errors.UnsupportedAlgorithmError(f"{what} uses RSA-OAEP with {part} {describe(part_oid)}; "
                                                   "keymgr reads SHA-1, SHA-224, SHA-256, SHA-384, SHA-512")
    if mgf_oid != "1.2.840.113549.1.1.8":
        raise errors.UnsupportedAlgorithmError(f"{what} uses an OAEP mask generation function other than MGF1 "
                                               f"({describe(mgf_oid)})")
    if label:
        raise errors.UnsupportedAlgorithmError(f"{what} uses RSA-OAEP with a label; keymgr reads an empty label")
    return names[hash_oid], names[mgf_hash_oid]


def read_kari_algorithm(algorithm: cms.KeyEncryptionAlgorithm, what: str) -> tuple[str, bytes]:
    """(the KDF's hash, the key-wrap AlgorithmIdentifier's DER) of a KeyAgreeRecipientInfo."""
    oid = _oid(algorithm)
    if oid not in KDF_SCHEMES:
        raise errors.UnsupportedAlgorithmError(f"{what} uses {describe(oid)}; keymgr reads ECDH "
                                               "(dhSinglePass-stdDH-shaXkdf-scheme, RFC 5753)")
    try:
        wrap = cms.KeyEncryptionAlgorithm.load(algorithm["parameters"].dump())
        wrap_oid, wrap_params = wrap["algorithm"].dotted, wrap["parameters"]
    except (ValueError, TypeError, KeyError, AttributeError):
        raise errors.FormatError(f"{what}: malformed key-wrap algorithm") from None
    if wrap_oid != OID_AES256_WRAP:
        raise errors.UnsupportedAlgorithmError(f"{what} wraps the key with {describe(wrap_oid)}; keymgr reads "
                                               "id-aes256-wrap (RFC 3394), the wrap for an AES-256 content key")
    if not isinstance(wrap_params, (core.Void, core.Null)):
        raise errors.FormatError(f"{what}: id-aes256-wrap takes no parameters (RFC 3565 section 2.3.2)")
    return KDF_SCHEMES[oid], wrap.dump()


#: AlgorithmIdentifier { id-aes256-wrap } with absent parameters (RFC 3565 section 2.3.2)
AES256_WRAP_ID = core.Sequence(contents=core.ObjectIdentifier(OID_AES256_WRAP).dump())


def _shared_info(key_info: bytes, ukm: bytes | None) -> bytes:
    """DER ``ECC-CMS-SharedInfo`` (RFC 5753 section 7.2) for a 256-bit key-wrap key: keyInfo is the
    message's own key-wrap AlgorithmIdentifier (as OpenSSL and Bouncy Castle use it)."""
    info = core.Sequence()
    parts = [key_info]
    if ukm is not None:
        parts.append(core.OctetString(ukm, explicit=0).dump())
    parts.append(core.OctetString((256).to_bytes(4, "big"), explicit=2).dump())
    info.contents = b"".join(parts)
    return bytes(info.dump())


def derive_kek(z: bytes | bytearray, kdf_hash: str, ukm: bytes | None,
               key_info: bytes = AES256_WRAP_ID.dump()) -> bytes:
    """The 256-bit key-wrap key: ANSI X9.63 KDF with ``kdf_hash`` over Z and the shared info."""
    kdf = X963KDF(algorithm=OAEP_HASHES[kdf_hash](), length=32, sharedinfo=_shared_info(key_info, ukm))
    return kdf.derive(bytes(z))


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
            (isinstance(named, core.ObjectIdentifier) and named.dotted == CURVES[curve])):
        raise errors.FormatError("KeyAgreeRecipientInfo: the originator key is on another curve")
    load_ec_point(curve, point)
    return point
