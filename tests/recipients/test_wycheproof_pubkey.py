"""Wycheproof RSA-OAEP and ECDH P-256 vectors through keymgr's token paths.

The private keys are imported into SoftHSM as session objects (tests may use
pkcs11 directly to play the key's owner), then :mod:`keymgr.hsm.asym` and the
public-key parsing of :mod:`keymgr.recipients.pubkey` do what they do for a
real message. OAEP vectors with a non-empty label must fail: keymgr always
uses the empty label (RFC 4055 section 4.1 ``pSourceAlgorithm`` default).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from asn1crypto import keys
from cryptography.hazmat.primitives.serialization import load_der_private_key
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

import keymgr
from keymgr.hsm import TokenSession, asym, open_token
from keymgr.recipients import pubkey
from tests._vectors import wycheproof_cases
from tests.conftest import TokenUnderTest, requires

OAEP_FILES = {"sha1": "rsa_oaep_2048_sha1_mgf1sha1_test", "sha256": "rsa_oaep_2048_sha256_mgf1sha256_test"}


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _import(ts: TokenSession, attrs: dict[Attribute, object]) -> tuple[asym.KeyPairRef, object]:
    key_id = os.urandom(8)
    label = f"wp-{key_id.hex()}"
    obj = ts.run("import", lambda s: s.create_object({**attrs, Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                                                        Attribute.TOKEN: False, Attribute.ID: key_id,
                                                        Attribute.LABEL: label}))
    kind = "rsa-2048" if attrs[Attribute.KEY_TYPE] == KeyType.RSA else "ec-p256"
    return asym.KeyPairRef(ts.label, key_id, label, kind), obj


@pytest.fixture
def session(softhsm: TokenUnderTest) -> Iterator[TokenSession]:
    yield open_token(softhsm.uri())


@pytest.mark.parametrize("oaep_hash", sorted(OAEP_FILES))
def test_wycheproof_rsa_oaep(softhsm: TokenUnderTest, session: TokenSession, oaep_hash: str) -> None:
    requires(softhsm, f"rsa-oaep-{oaep_hash}")
    cases = wycheproof_cases(OAEP_FILES[oaep_hash])
    imported: dict[str, asym.KeyPairRef] = {}
    objects = []
    checked = 0
    try:
        for group, case in cases:
            pkcs8 = group["privateKeyPkcs8"]
            if pkcs8 not in imported:
                numbers = load_der_private_key(bytes.fromhex(pkcs8), None).private_numbers()  # type: ignore[union-attr]
                ref, obj = _import(session, {
                    Attribute.KEY_TYPE: KeyType.RSA, Attribute.DECRYPT: True, Attribute.SENSITIVE: True,
                    Attribute.MODULUS: _int_bytes(numbers.public_numbers.n),
                    Attribute.PUBLIC_EXPONENT: _int_bytes(numbers.public_numbers.e),
                    Attribute.PRIVATE_EXPONENT: _int_bytes(numbers.d), Attribute.PRIME_1: _int_bytes(numbers.p),
                    Attribute.PRIME_2: _int_bytes(numbers.q), Attribute.EXPONENT_1: _int_bytes(numbers.dmp1),
                    Attribute.EXPONENT_2: _int_bytes(numbers.dmq1), Attribute.COEFFICIENT: _int_bytes(numbers.iqmp)})
                imported[pkcs8], _ = ref, objects.append(obj)
            ref = imported[pkcs8]
            ciphertext = bytes.fromhex(case["ct"])
            where = f"tcId {case['tcId']} ({case['comment']})"
            if case["result"] == "valid" and not case["label"]:
                plaintext = asym.rsa_oaep_decrypt(session, ref, ciphertext, hash=oaep_hash)
                assert plaintext == bytes.fromhex(case["msg"]), where
            else:
                with pytest.raises(keymgr.IntegrityError):
                    asym.rsa_oaep_decrypt(session, ref, ciphertext, hash=oaep_hash)
            checked += 1
    finally:
        for obj in objects:
            session.run("destroy", lambda s, o=obj: o.destroy())  # type: ignore[misc]
    assert checked == len(cases) > 30


def _ecdh(session: TokenSession, private_hex: str, point: bytes) -> bytes:
    ref, obj = _import(session, {
        Attribute.KEY_TYPE: KeyType.EC, Attribute.DERIVE: True, Attribute.SENSITIVE: True,
        Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1"),
        Attribute.VALUE: int(private_hex, 16).to_bytes(32, "big")})
    try:
        return bytes(asym.ecdh_derive(session, ref, point))
    finally:
        session.run("destroy", lambda s: obj.destroy())  # type: ignore[attr-defined]


def _originator_point(spki_der: bytes) -> bytes:
    """The path a KeyAgreeRecipientInfo's originatorKey takes (loaded strictly, then checked)."""
    try:
        info = keys.PublicKeyInfo.load(spki_der, strict=True)
    except ValueError:
        raise keymgr.FormatError("malformed") from None
    return pubkey.parse_originator_key(info, "secp256r1")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ecdh_secp256r1_test", "ecdh_secp256r1_ecpoint_test"])
def test_wycheproof_ecdh_p256(softhsm: TokenUnderTest, session: TokenSession, name: str) -> None:
    requires(softhsm, "ecdh-p256")
    counts = {"valid": 0, "refused": 0}
    for group, case in wycheproof_cases(name):
        public = bytes.fromhex(case["public"])
        where = f"{name} tcId {case['tcId']} ({case['comment']}, {case['flags']})"
        try:
            point = public if group["encoding"] == "ecpoint" else _originator_point(public)
            shared = _ecdh(session, case["private"], point)
        except keymgr.FormatError:
            assert case["result"] != "valid", where
            counts["refused"] += 1
            continue
        assert case["result"] != "invalid", where
        assert shared == bytes.fromhex(case["shared"]), where
        counts["valid"] += 1
    # every valid vector derives the right secret (compressed / unnamed-curve "acceptable" ones are refused)
    assert counts["valid"] >= 330 if name == "ecdh_secp256r1_test" else counts["valid"] > 0
