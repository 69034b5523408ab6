"""Recipient builders and readers (keymgr.envelope.recipients), against asn1crypto."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest
from asn1crypto import cms, core

from keymgr.envelope import (
    OID_THRESHOLD_RECIPIENT,
    kek_recipient_info,
    other_recipient_info,
    read_kek_recipient,
    read_other_recipient,
    recipient_kind,
)
from keymgr.errors import ConfigurationError, FormatError


class GcmParameters(core.Sequence):
    _fields = [("aes_nonce", core.OctetString), ("aes_icvlen", core.Integer, {"default": 12})]


def asn1_kekri(algorithm: str, parameters: core.Asn1Value | None = None, *, version: str = "v4",
               encrypted_key: bytes | None = None, kekid: dict | None = None) -> cms.RecipientInfo:
    alg: dict[str, object] = {"algorithm": algorithm}
    if parameters is not None:
        alg["parameters"] = parameters
    return cms.RecipientInfo({"kekri": {
        "version": version, "kekid": kekid or {"key_identifier": b"id"},
        "key_encryption_algorithm": cms.KeyEncryptionAlgorithm(alg),
        "encrypted_key": os.urandom(40) if encrypted_key is None else encrypted_key}})


@pytest.mark.parametrize(("algorithm", "length", "oid"), [("aes256_wrap", 40, "2.16.840.1.101.3.4.1.45"),
                                                          ("aes256_wrap_pad", 40, "2.16.840.1.101.3.4.1.48"),
                                                          ("aes256_gcm", 48, "2.16.840.1.101.3.4.1.46")])
def test_kek_recipient_round_trip(algorithm: str, length: int, oid: str) -> None:
    key, nonce = os.urandom(length), os.urandom(12) if algorithm == "aes256_gcm" else None
    ri = kek_recipient_info(b"\x01key-id", key, algorithm, nonce)  # type: ignore[arg-type]
    assert recipient_kind(ri) == "kekri" and ri.name == "kekri"
    reloaded = cms.RecipientInfo.load(ri.dump(), strict=True)  # what asn1crypto makes of our bytes
    kekri = reloaded.chosen
    assert kekri["version"].native == "v4"
    assert kekri["kekid"]["key_identifier"].native == b"\x01key-id"
    assert kekri["key_encryption_algorithm"]["algorithm"].dotted == oid
    assert kekri["encrypted_key"].native == key
    params = kekri["key_encryption_algorithm"]["parameters"]
    if nonce is None:
        assert params.native is None
    else:
        parsed = params.parse(GcmParameters)
        assert (parsed["aes_nonce"].native, parsed["aes_icvlen"].native) == (nonce, 16)
    found = read_kek_recipient(reloaded)
    assert (found.kek_id, found.algorithm, found.encrypted_key, found.gcm_nonce) == (b"\x01key-id", algorithm, key,
                                                                                      nonce)
    assert key.hex() not in repr(found)


def test_reads_asn1crypto_built_recipients() -> None:
    assert read_kek_recipient(asn1_kekri("aes256_wrap")).algorithm == "aes256_wrap"
    assert read_kek_recipient(asn1_kekri("aes256_wrap_pad", core.Null())).algorithm == "aes256_wrap_pad"
    dated = asn1_kekri("aes256_wrap", kekid={"key_identifier": b"id", "date": datetime(2026, 1, 1, tzinfo=UTC)})
    assert read_kek_recipient(dated).kek_id == b"id"
    gcm = asn1_kekri("2.16.840.1.101.3.4.1.46", GcmParameters({"aes_nonce": bytes(12), "aes_icvlen": 16}),
                     encrypted_key=os.urandom(48))
    assert read_kek_recipient(gcm).gcm_nonce == bytes(12)


@pytest.mark.parametrize("ri", [
    asn1_kekri("aes128_wrap"),
    asn1_kekri("aes256_wrap", version="v2"),
    asn1_kekri("aes256_wrap", core.OctetString(b"x")),
    asn1_kekri("aes256_wrap", encrypted_key=os.urandom(36)),
    asn1_kekri("aes256_wrap", encrypted_key=os.urandom(2048)),
    asn1_kekri("aes256_wrap", kekid={"key_identifier": b""}),
    asn1_kekri("2.16.840.1.101.3.4.1.46", GcmParameters({"aes_nonce": bytes(12), "aes_icvlen": 12})),
    asn1_kekri("2.16.840.1.101.3.4.1.46", GcmParameters({"aes_nonce": bytes(16), "aes_icvlen": 16})),
    asn1_kekri("2.16.840.1.101.3.4.1.46"),
    other_recipient_info("1.2.3", b"\x05\x00"),
])
def test_bad_kek_recipients_are_format_errors(ri: cms.RecipientInfo) -> None:
    with pytest.raises(FormatError):
        read_kek_recipient(ri)


@pytest.mark.parametrize(("args", "why"), [
    ((b"", os.urandom(40), "aes256_wrap"), "empty id"),
    ((b"x" * 1025, os.urandom(40), "aes256_wrap"), "long id"),
    ((b"id", os.urandom(41), "aes256_wrap"), "not a multiple of 8"),
    ((b"id", os.urandom(16), "aes256_wrap"), "too short for KW"),
    ((b"id", os.urandom(1032), "aes256_wrap_pad"), "too long"),
    ((b"id", os.urandom(16), "aes256_gcm", os.urandom(12)), "no room for a tag"),
    ((b"id", os.urandom(48), "aes256_gcm"), "GCM without nonce"),
    ((b"id", os.urandom(48), "aes256_gcm", os.urandom(8)), "short nonce"),
    ((b"id", os.urandom(40), "aes256_wrap", os.urandom(12)), "nonce without GCM"),
    ((b"id", os.urandom(40), "aes128_wrap"), "unknown algorithm"),
])
def test_kek_recipient_info_refuses_bad_arguments(args: tuple, why: str) -> None:
    with pytest.raises(ConfigurationError):
        kek_recipient_info(*args)


def test_other_recipient_round_trip() -> None:
    value = core.Sequence.load(b"\x30\x06\x02\x01\x02\x02\x01\x03").dump()
    ri = other_recipient_info(OID_THRESHOLD_RECIPIENT, value)
    assert recipient_kind(ri) == "ori" and ri.name == "ori"
    assert cms.RecipientInfo.load(ri.dump()).chosen["ori_type"].dotted == OID_THRESHOLD_RECIPIENT
    assert read_other_recipient(ri) == (OID_THRESHOLD_RECIPIENT, value)
    for bad_type, bad_value in (("not.an.oid", value), (OID_THRESHOLD_RECIPIENT, value + b"\x00"),
                                (OID_THRESHOLD_RECIPIENT, b"\x30\x05")):
        with pytest.raises(ConfigurationError):
            other_recipient_info(bad_type, bad_value)
    with pytest.raises(FormatError):
        read_other_recipient(asn1_kekri("aes256_wrap"))
