"""RFC 5083 section 2.1 / 2.2, checked from scratch on messages the token made.

KeyManager seals a message under a KEK whose value the test knows (generated in the
token and wrapped out through the backup path: :func:`tests._known_keys.generated_known_key`,
as the OpenSSL interop tests do). Then,
without any keymgr code: asn1crypto locates the fields, ``cryptography``
unwraps the data key (RFC 3394 for ``kw``, AES-GCM for ``gcm``), the test
encodes the attribute set it expects with its own few lines of DER (X.690:
definite lengths, SET OF sorted by encoding), compares it byte for byte with
what the message carries under [1], re-tags it with the universal SET OF tag
(0x31) as section 2.2 says the AAD is formed, and opens the content with
``cryptography``'s AESGCM. The key commitment is recomputed with
``cryptography``'s HKDF.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from asn1crypto import cms, core
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap

import keymgr
from tests._known_keys import generated_known_key, imported_key
from tests.conftest import TokenUnderTest

#: From docs/format.md ("OIDs"), written out here rather than imported from keymgr.
ARC = "2.25.138982042016392611621762531081200071192"
OID_CONTEXT, OID_COMMITMENT = ARC + ".1.1", ARC + ".1.2"
OID_CONTENT_TYPE, OID_DATA = "1.2.840.113549.1.9.3", "1.2.840.113549.1.7.1"
COMMITMENT_INFO = b"keymgr key commitment v1"


def tlv(tag: int, body: bytes) -> bytes:
    """X.690 definite-length TLV."""
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def oid(dotted: str) -> bytes:
    return core.ObjectIdentifier(dotted).dump()


def set_of(items: list[bytes]) -> bytes:
    return tlv(0x31, b"".join(sorted(items)))  # X.690 11.6: DER sorts SET OF by encoding


def attribute(kind: str, value: bytes) -> bytes:
    return tlv(0x30, oid(kind) + set_of([value]))


def expected_attrs(context: dict[str, str], dek: bytes) -> bytes:
    commitment = HKDF(hashes.SHA256(), 32, salt=None, info=COMMITMENT_INFO).derive(dek)
    pairs = sorted((k.encode(), v.encode()) for k, v in context.items())
    context_value = tlv(0x30, b"".join(tlv(0x30, tlv(0x0C, k) + tlv(0x0C, v)) for k, v in pairs))
    return set_of([attribute(OID_CONTENT_TYPE, oid(OID_DATA)), attribute(OID_CONTEXT, context_value),
                   attribute(OID_COMMITMENT, tlv(0x04, commitment))])


@pytest.fixture
def km(softhsm: TokenUnderTest) -> Iterator[keymgr.KeyManager]:
    with keymgr.KeyManager(softhsm.uri()) as manager:
        yield manager


def gcm_nonce(params: bytes) -> bytes:
    """The nonce of RFC 5084 GCMParameters as keymgr must write them: a 12-byte nonce and the
    16-byte ICV length written out: SEQUENCE { OCTET STRING (12), INTEGER 16 }."""
    assert params[:4] == b"\x30\x11\x04\x0c" and params[16:] == b"\x02\x01\x10", params.hex()
    return params[4:16]


def data_key(ri: cms.RecipientInfo, kek: bytes, profile: str) -> bytes:
    kekri = ri.chosen
    algorithm = kekri["key_encryption_algorithm"]
    encrypted = kekri["encrypted_key"].native
    if profile == "kw":
        assert algorithm["algorithm"].dotted == "2.16.840.1.101.3.4.1.45"  # id-aes256-wrap
        return aes_key_unwrap(kek, encrypted)
    assert algorithm["algorithm"].dotted == "2.16.840.1.101.3.4.1.46"  # id-aes256-GCM
    return AESGCM(kek).decrypt(gcm_nonce(algorithm["parameters"].dump()), encrypted, None)


@pytest.mark.parametrize("profile", ["kw", "gcm"])
@pytest.mark.parametrize("context", [{"tenant": "acme", "purpose": "orders"},
                                     {"z": "last", "a": "first", "é": "ü", "long": "x" * 300}])
def test_aad_is_the_der_attribute_set_under_the_set_of_tag(km: keymgr.KeyManager, key_name: str, profile: str,
                                                           context: dict[str, str]) -> None:
    kek, record = generated_known_key(km, key_name, profile=profile)
    plaintext = os.urandom(1000)
    blob = km.encrypt(plaintext, key=key_name, context=context)

    info = cms.ContentInfo.load(blob, strict=True)
    assert info["content_type"].dotted == "1.2.840.113549.1.9.16.1.23"  # id-ct-authEnvelopedData
    aed = info["content"]
    (ri,) = aed["recipient_infos"]
    assert ri.name == "kekri" and ri.chosen["kekid"]["key_identifier"].native == record.primary_version.key_id
    dek = data_key(ri, kek, profile)

    carried = aed["auth_attrs"].dump()
    assert carried[0] == 0xA1  # [1] IMPLICIT inside AuthEnvelopedData (section 2.1)
    aad = b"\x31" + carried[1:]  # section 2.2: the AAD is the DER with the SET OF tag
    assert aad == expected_attrs(context, dek)

    eci = aed["auth_encrypted_content_info"]
    assert eci["content_type"].dotted == OID_DATA
    assert eci["content_encryption_algorithm"]["algorithm"].dotted == "2.16.840.1.101.3.4.1.46"
    nonce = gcm_nonce(eci["content_encryption_algorithm"]["parameters"].dump())
    sealed = eci["encrypted_content"].native + aed["mac"].native
    assert AESGCM(dek).decrypt(nonce, sealed, aad) == plaintext
    with pytest.raises(InvalidTag):  # the [1]-tagged bytes are not the AAD
        AESGCM(dek).decrypt(nonce, sealed, carried)
    assert km.decrypt(blob, context=context) == plaintext


def test_an_independently_built_message_is_read(km: keymgr.KeyManager, key_name: str) -> None:
    """The other direction: a message put together here (from-scratch attributes, asn1crypto
    for the rest, cryptography for the crypto) under the token's known KEK decrypts."""
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap

    kek = os.urandom(32)
    record = imported_key(km, key_name, kek, profile="kw")  # decrypting needs no provenance
    dek, nonce, context = os.urandom(32), os.urandom(12), {"tenant": "acme"}
    attrs = expected_attrs(context, dek)
    sealed = AESGCM(dek).encrypt(nonce, b"built elsewhere", attrs)
    kekri = cms.KEKRecipientInfo({
        "version": "v4", "kekid": {"key_identifier": record.primary_version.key_id},
        "key_encryption_algorithm": {"algorithm": "aes256_wrap"}, "encrypted_key": aes_key_wrap(kek, dek)})
    gcm_params = tlv(0x30, tlv(0x04, nonce) + tlv(0x02, b"\x10"))
    aed = tlv(0x30, b"".join([
        tlv(0x02, b"\x00"),
        tlv(0x31, cms.RecipientInfo(name="kekri", value=kekri).dump()),
        tlv(0x30, oid(OID_DATA) + tlv(0x30, oid("2.16.840.1.101.3.4.1.46") + gcm_params)
            + tlv(0x80, sealed[:-16])),
        b"\xa1" + attrs[1:],
        tlv(0x04, sealed[-16:]),
    ]))
    blob = tlv(0x30, oid("1.2.840.113549.1.9.16.1.23") + tlv(0xA0, aed))
    assert km.decrypt(blob, context=context) == b"built elsewhere"
    with pytest.raises(keymgr.IntegrityError):
        km.decrypt(blob, context={"tenant": "other"})
