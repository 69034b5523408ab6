"""CMS AuthEnvelopedData messages (keymgr.envelope.cms), checked against asn1crypto as an
independent RFC 5083 reader/writer. OpenSSL interop lives in test_envelope_openssl.py."""

from __future__ import annotations

import contextlib
import os
import pickle

import pytest
from asn1crypto import algos, cms, core, keys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keymgr.envelope import (
    OID_COMMITMENT,
    OID_CONTEXT,
    OID_THRESHOLD_RECIPIENT,
    DataKey,
    _der,
    open_message,
    other_recipient_info,
    parse_message,
    replace_recipients,
    seal_message,
)
from keymgr.envelope._aead import key_commitment
from keymgr.errors import (
    ConfigurationError,
    FormatError,
    IntegrityError,
    KeymgrError,
    KeyNotFoundError,
    UnsupportedAlgorithmError,
)
from tests._fixed_randomness import fixed_message_nonce
from tests._softkek import SoftKek

SECRET = b"SECRET-PLAINTEXT card 4111 1111 1111 1111"
CTX = {"tenant": "acme", "purpose": "orders"}


@pytest.fixture
def kek() -> SoftKek:
    return SoftKek()


@pytest.fixture
def dek() -> bytes:
    return os.urandom(32)


# --- an independent encoder: asn1crypto builds what RFC 5083 describes -------------------------

class GcmParameters(core.Sequence):
    _fields = [("aes_nonce", core.OctetString), ("aes_icvlen", core.Integer, {"default": 12})]


class ContextEntry(core.Sequence):
    _fields = [("key", core.UTF8String), ("value", core.UTF8String)]


class ContextValue(core.SequenceOf):
    _child_spec = ContextEntry


def context_attr(pairs: list[tuple[str, str]]) -> dict[str, object]:
    return {"type": OID_CONTEXT, "values": [ContextValue([{"key": k, "value": v} for k, v in pairs])]}


def commitment_attr(dek: bytes) -> dict[str, object]:
    return {"type": OID_COMMITMENT, "values": [core.OctetString(key_commitment(dek))]}


def asn1_message(plaintext: bytes, dek: bytes, recipients: list[cms.RecipientInfo],
                 attrs: list[dict[str, object]] | None, *,
                 nonce: bytes | None = None, algorithm: str = "aes256_gcm", icv: int = 16, version: str = "v0",
                 content_type: str = "data") -> bytes:
    """A message built by asn1crypto, with GCM done here: AAD = authAttrs under the SET OF tag."""
    nonce = os.urandom(12) if nonce is None else nonce
    attr_set = None if attrs is None else cms.CMSAttributes(attrs)
    aad = b"" if attr_set is None else attr_set.dump()
    sealed = AESGCM(dek).encrypt(nonce, plaintext, aad)
    ct, tag = sealed[:-16], sealed[-16:][:icv]
    params_type = algos.CcmParams if algorithm.endswith("ccm") else GcmParameters
    aed = {
        "version": version, "recipient_infos": recipients,
        "auth_encrypted_content_info": {
            "content_type": content_type,
            "content_encryption_algorithm": {"algorithm": algorithm,
                                             "parameters": params_type({"aes_nonce": nonce, "aes_icvlen": icv})},
            "encrypted_content": ct},
        "mac": tag,
    }
    if attr_set is not None:
        aed["auth_attrs"] = attr_set
    content = cms.AuthEnvelopedData(aed)
    return cms.ContentInfo({"content_type": "authenticated_enveloped_data", "content": content}).dump()


# --- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1024, 100_000])
@pytest.mark.parametrize("context", [None, CTX])
def test_round_trip(kek: SoftKek, dek: bytes, size: int, context: dict[str, str] | None) -> None:
    plaintext = os.urandom(size)
    blob = seal_message(plaintext, dek=dek, recipient_infos=[kek.recipient(dek)], context=context)
    assert open_message(blob, unwrap=kek.unwrap, context=context) == plaintext


@pytest.mark.parametrize("algorithm", ["aes256_wrap", "aes256_wrap_pad", "aes256_gcm"])
def test_each_kek_algorithm(kek: SoftKek, dek: bytes, algorithm: str) -> None:
    blob = seal_message(SECRET, dek=dek, recipient_infos=[kek.recipient(dek, algorithm)], context=CTX)  # type: ignore[arg-type]
    assert open_message(blob, unwrap=kek.unwrap, context=CTX) == SECRET


def test_asn1crypto_reads_our_message_and_agrees_on_the_aad(kek: SoftKek, dek: bytes) -> None:
    """Independent RFC 5083 check: asn1crypto parses it; GCM over its own re-encoding of
    authAttrs (universal SET OF tag, DER) with the DEK gives back the plaintext."""
    blob = seal_message(SECRET, dek=dek, recipient_infos=[kek.recipient(dek)], context=CTX)
    info = cms.ContentInfo.load(blob, strict=True)
    assert info["content_type"].native == "authenticated_enveloped_data"
    aed = info["content"]
    assert aed["version"].native == "v0"
    eci = aed["auth_encrypted_content_info"]
    assert eci["content_type"].native == "data"
    assert eci["content_encryption_algorithm"]["algorithm"].native == "aes256_gcm"
    params = eci["content_encryption_algorithm"]["parameters"].parse(GcmParameters)
    assert len(params["aes_nonce"].native) == 12 and params["aes_icvlen"].native == 16
    aad = aed["auth_attrs"].untag().dump(force=True)
    assert aad[0] == 0x31 and blob.count(b"\xa1" + aad[1:]) == 1
    sealed = eci["encrypted_content"].native + aed["mac"].native
    assert AESGCM(dek).decrypt(params["aes_nonce"].native, sealed, aad) == SECRET
    types = {a["type"].dotted for a in aed["auth_attrs"]}
    assert types == {OID_COMMITMENT, OID_CONTEXT, "1.2.840.113549.1.9.3"}
    assert info.dump(force=True) == blob  # what we wrote is DER, re-encoding changes nothing


def test_we_read_asn1crypto_messages(kek: SoftKek, dek: bytes) -> None:
    attrs: list[dict[str, object]] = [commitment_attr(dek), context_attr(sorted(CTX.items())),
                                      {"type": "content_type", "values": ["data"]}]
    blob = asn1_message(SECRET, dek, [kek.recipient(dek)], attrs)
    assert open_message(blob, unwrap=kek.unwrap, context=CTX) == SECRET


def test_context_is_canonical(kek: SoftKek, dek: bytes) -> None:
    ri = [kek.recipient(dek)]
    with fixed_message_nonce(os.urandom(12)):
        one = seal_message(SECRET, dek=dek, recipient_infos=ri, context={"a": "1", "b": "2", "é": "3"})
        two = seal_message(SECRET, dek=dek, recipient_infos=ri, context={"é": "3", "b": "2", "a": "1"})
    assert one == two


def test_return_context(kek: SoftKek, dek: bytes) -> None:
    blob = seal_message(SECRET, dek=dek, recipient_infos=[kek.recipient(dek)], context=CTX)
    assert open_message(blob, unwrap=kek.unwrap, context=None, return_context=True) == (SECRET, CTX)
    assert open_message(blob, unwrap=kek.unwrap, context=CTX, return_context=True) == (SECRET, CTX)
    with pytest.raises(IntegrityError):
        open_message(blob, unwrap=kek.unwrap, context={"tenant": "evil"}, return_context=True)


def test_data_key_object_and_hygiene(kek: SoftKek, dek: bytes) -> None:
    key = DataKey(dek)
    blob = seal_message(SECRET, dek=key, recipient_infos=[kek.recipient(dek)], context=None)
    assert open_message(blob, unwrap=lambda ri: key, context=None) == SECRET
    assert dek.hex() not in repr(key) and "AES-256" in repr(key)
    with pytest.raises(TypeError):
        pickle.dumps(key)
    key.wipe()
    assert "wiped" in repr(key)
    with pytest.raises(ConfigurationError):
        seal_message(SECRET, dek=key, recipient_infos=[kek.recipient(dek)], context=None)
    with pytest.raises(ConfigurationError):
        key.matches(key_commitment(dek))
    with pytest.raises(ConfigurationError):
        DataKey(dek[:16])


# --- context and commitment ------------------------------------------------------------------

def test_wrong_or_missing_context(kek: SoftKek, dek: bytes) -> None:
    blob = seal_message(SECRET, dek=dek, recipient_infos=[kek.recipient(dek)], context=CTX)
    for wrong in (None, {}, {"tenant": "acme"}, {**CTX, "x": "y"}, {"tenant": "acme", "purpose": "Orders"}):
        with pytest.raises(IntegrityError) as info:
            open_message(blob, unwrap=kek.unwrap, context=wrong)
        assert SECRET not in str(info.value).encode()
    plain = seal_message(SECRET, dek=dek, recipient_infos=[kek.recipient(dek)], context=None)
    with pytest.raises(IntegrityError):
        open_message(plain, unwrap=kek.unwrap, context=CTX)
    assert open_message(plain, unwrap=kek.unwrap, context={}) == SECRET


def test_wrong_context_fails_before_the_token_is_asked(kek: SoftKek, dek: bytes) -> None:
    blob = seal_message(SECRET, dek=dek, recipient_infos=[kek.recipient(dek)], context=CTX)
    with pytest.raises(IntegrityError):
        open_message(blob, unwrap=kek.unwrap, context={"tenant": "evil"})
    assert kek.calls == 0


def test_compat_message_has_no_attributes_and_refuses_context(kek: SoftKek, dek: bytes) -> None:
    with pytest.raises(ConfigurationError):
        seal_message(SECRET, dek=dek, recipient_infos=[kek.recipient(dek)], context=CTX, compat_openssl=True)
    blob = seal_message(SECRET, dek=dek, recipient_infos=[kek.recipient(dek)], context=None, compat_openssl=True)
    parsed = parse_message(blob)
    assert parsed.auth_attrs is None and parsed.aad == b"" and parsed.commitment is None
    assert open_message(blob, unwrap=kek.unwrap, context=None) == SECRET
    with pytest.raises(IntegrityError):
        open_message(blob, unwrap=kek.unwrap, context=CTX)  # a context was promised: no commitment, no context
    with pytest.raises(IntegrityError):
        open_message(blob, unwrap=kek.unwrap, context=None, require_commitment=True)


def test_commitment_mismatch_is_an_integrity_error(kek: SoftKek, dek: bytes) -> None:
    """Change only the commitment and re-tag GCM correctly: only the commitment check can object."""
    blob = seal_message(SECRET, dek=dek, recipient_infos=[kek.recipient(dek)], context=CTX)
    good = key_commitment(dek)
    forged = blob.replace(good, key_commitment(os.urandom(32)))
    parsed = parse_message(forged)
    tag = AESGCM(dek).encrypt(parsed.nonce, SECRET, parsed.aad)[-16:]
    forged = forged.replace(parsed.mac, tag)
    reparsed = parse_message(forged)
    assert AESGCM(dek).decrypt(reparsed.nonce, reparsed.encrypted_content + reparsed.mac, reparsed.aad) == SECRET
    with pytest.raises(IntegrityError):
        open_message(forged, unwrap=kek.unwrap, context=CTX)


def test_recipient_with_another_key_fails_the_commitment(dek: bytes) -> None:
    """Two recipients, two data keys (the multi-key attack's setting): the reader holding
    the second KEK gets the second key, which is not the committed one."""
    first, second = SoftKek(b"site-a"), SoftKek(b"site-b")
    blob = seal_message(SECRET, dek=dek, recipient_infos=[first.recipient(dek), second.recipient(os.urandom(32))],
                        context=None)
    assert open_message(blob, unwrap=first.unwrap, context=None) == SECRET
    with pytest.raises(IntegrityError):
        open_message(blob, unwrap=second.unwrap, context=None)


def test_context_without_commitment_is_refused(kek: SoftKek, dek: bytes) -> None:
    blob = asn1_message(SECRET, dek, [kek.recipient(dek)], [context_attr(sorted(CTX.items()))])
    assert parse_message(blob).context == CTX
    with pytest.raises(IntegrityError):
        open_message(blob, unwrap=kek.unwrap, context=CTX)
    with pytest.raises(IntegrityError):
        open_message(blob, unwrap=kek.unwrap, context=None, return_context=True)


def test_unknown_authenticated_attributes_are_kept_and_authenticated(kek: SoftKek, dek: bytes) -> None:
    extra: dict[str, object] = {"type": "1.2.3.4.5", "values": [core.OctetString(b"an attribute keymgr does not know")]}
    blob = asn1_message(SECRET, dek, [kek.recipient(dek)], [commitment_attr(dek), extra])
    parsed = parse_message(blob)
    assert [oid for oid, _ in parsed.auth_attrs.other] == ["1.2.3.4.5"]  # type: ignore[union-attr]
    assert open_message(blob, unwrap=kek.unwrap, context=None) == SECRET


@pytest.mark.parametrize("pairs", [[("b", "1"), ("a", "2")], [("a", "1"), ("a", "2")], [("", "1")]])
def test_non_canonical_context_is_a_format_error(kek: SoftKek, dek: bytes, pairs: list[tuple[str, str]]) -> None:
    blob = asn1_message(SECRET, dek, [kek.recipient(dek)], [commitment_attr(dek), context_attr(pairs)])
    with pytest.raises(FormatError):
        parse_message(blob)


@pytest.mark.parametrize("context", [{"k": 1}, {1: "v"}, {"": "v"}, {"k": "\ud800"},
                                     {f"k{i}": "v" for i in range(65)}, {"k": "v" * 20000}, [("k", "v")]])
def test_bad_context_is_a_configuration_error(kek: SoftKek, dek: bytes, context: object) -> None:
    with pytest.raises(ConfigurationError):
        seal_message(SECRET, dek=dek, recipient_infos=[kek.recipient(dek)], context=context)  # type: ignore[arg-type]


# --- recipients ------------------------------------------------------------------------------

def test_no_matching_recipient(dek: bytes) -> None:
    blob = seal_message(SECRET, dek=dek, recipient_infos=[SoftKek(b"a").recipient(dek)], context=None)
    with pytest.raises(KeyNotFoundError):
        open_message(blob, unwrap=SoftKek(b"b").unwrap, context=None)


def test_any_one_of_several_recipients_decrypts(dek: bytes) -> None:
    keks = [SoftKek(b"primary"), SoftKek(b"dr-site"), SoftKek(b"escrow")]
    blob = seal_message(SECRET, dek=dek, recipient_infos=[k.recipient(dek, "aes256_wrap_pad") for k in keks],
                        context=CTX)
    assert len(parse_message(blob).recipient_infos) == 3
    for k in keks:
        assert open_message(blob, unwrap=k.unwrap, context=CTX) == SECRET


def test_wrong_sized_key_from_unwrap_is_an_integrity_error(kek: SoftKek, dek: bytes) -> None:
    blob = seal_message(SECRET, dek=dek, recipient_infos=[kek.recipient(dek)], context=None)
    with pytest.raises(IntegrityError):
        open_message(blob, unwrap=lambda ri: dek[:16], context=None)


def _foreign_recipients() -> list[cms.RecipientInfo]:
    """A key-transport, a key-agreement and a threshold (other) recipient, built by asn1crypto."""
    rsa_oaep = {"algorithm": "rsaes_oaep", "parameters": algos.RSAESOAEPParams({
        "hash_algorithm": {"algorithm": "sha256"},
        "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}}})}
    ktri = cms.RecipientInfo({"ktri": {"version": "v2", "rid": {"subject_key_identifier": b"\x01" * 20},
                                       "key_encryption_algorithm": rsa_oaep, "encrypted_key": os.urandom(256)}})
    point = keys.ECPointBitString(b"\x04" + os.urandom(64))
    kari = cms.RecipientInfo({"kari": {
        "version": "v3",
        "originator": {"originator_key": {"algorithm": {"algorithm": "ec", "parameters": ("named", "secp256r1")},
                                          "public_key": point}},
        "key_encryption_algorithm": {"algorithm": "1.3.132.1.11.1",  # dhSinglePass-stdDH-sha256kdf
                                     "parameters": cms.KeyEncryptionAlgorithm({"algorithm": "aes256_wrap"})},
        "recipient_encrypted_keys": [{"rid": {"r_key_id": {"subject_key_identifier": b"\x02" * 20}},
                                      "encrypted_key": os.urandom(40)}]}})
    ori = other_recipient_info(OID_THRESHOLD_RECIPIENT, core.Sequence.load(b"\x30\x03\x02\x01\x02").dump())
    return [ktri, kari, ori]


def test_other_recipient_types_are_carried_and_skipped(kek: SoftKek, dek: bytes) -> None:
    foreign = _foreign_recipients()
    blob = seal_message(SECRET, dek=dek, recipient_infos=[*foreign, kek.recipient(dek)], context=CTX)
    parsed = parse_message(blob)
    assert sorted(ri.name for ri in parsed.recipient_infos) == ["kari", "kekri", "ktri", "ori"]
    assert open_message(blob, unwrap=kek.unwrap, context=CTX) == SECRET
    assert cms.ContentInfo.load(blob)["content"]["recipient_infos"].native  # asn1crypto reads them all


def test_replace_recipients_keeps_the_payload_bytes(dek: bytes) -> None:
    old, new = SoftKek(b"v1"), SoftKek(b"v2")
    blob = seal_message(SECRET, dek=dek, recipient_infos=[old.recipient(dek)], context=CTX)
    rewrapped = replace_recipients(blob, [new.recipient(dek, "aes256_wrap_pad")])
    before, after = parse_message(blob), parse_message(rewrapped)
    for name in ("version", "content", "auth_attrs", "mac"):
        assert before._fields[name] == after._fields[name]
    assert (before.encrypted_content, before.mac, before.aad) == (after.encrypted_content, after.mac, after.aad)
    assert open_message(rewrapped, unwrap=new.unwrap, context=CTX) == SECRET
    with pytest.raises(KeyNotFoundError):
        open_message(rewrapped, unwrap=old.unwrap, context=CTX)
    assert cms.ContentInfo.load(rewrapped).dump(force=True) == rewrapped


def test_recipient_limits(kek: SoftKek, dek: bytes) -> None:
    ri = kek.recipient(dek)
    with pytest.raises(ConfigurationError):
        seal_message(SECRET, dek=dek, recipient_infos=[], context=None)
    with pytest.raises(ConfigurationError):
        seal_message(SECRET, dek=dek, recipient_infos=[SoftKek(b"%d" % i).recipient(dek) for i in range(65)],
                     context=None)
    with pytest.raises(ConfigurationError):
        seal_message(SECRET, dek=dek, recipient_infos=ri, context=None)  # type: ignore[arg-type]
    many = asn1_message(SECRET, dek, [SoftKek(b"%d" % i).recipient(dek) for i in range(65)], None)
    with pytest.raises(FormatError):
        parse_message(many)


# --- malformed messages ----------------------------------------------------------------------

def test_structural_guard_rails(kek: SoftKek, dek: bytes) -> None:
    ri = [kek.recipient(dek)]
    attrs = [commitment_attr(dek)]
    assert open_message(asn1_message(SECRET, dek, ri, attrs), unwrap=kek.unwrap, context=None) == SECRET
    bad = {
        "version 2": asn1_message(SECRET, dek, ri, attrs, version="v2"),
        "AES-128-GCM": asn1_message(SECRET, dek[:16], ri, attrs, algorithm="aes128_gcm"),
        "AES-256-CCM": asn1_message(SECRET, dek, ri, attrs, algorithm="aes256_ccm"),
        "8-byte nonce": asn1_message(SECRET, dek, ri, attrs, nonce=os.urandom(8)),
        "16-byte nonce": asn1_message(SECRET, dek, ri, attrs, nonce=os.urandom(16)),
        "ICV 12 (the DEFAULT)": asn1_message(SECRET, dek, ri, attrs, icv=12),
        "ICV 14": asn1_message(SECRET, dek, ri, attrs, icv=14),
        "signed-data content": asn1_message(SECRET, dek, ri, attrs, content_type="signed_data"),
        "no recipients": asn1_message(SECRET, dek, [], attrs),
        "empty authAttrs": asn1_message(SECRET, dek, ri, []),
    }
    good = seal_message(SECRET, dek=dek, recipient_infos=ri, context=None)
    bad["trailing byte"] = good + b"\x00"
    header = 2 + (good[1] & 0x7F if good[1] & 0x80 else 0)
    assert good[header:header + 13] == _der.encode_oid("1.2.840.113549.1.9.16.1.23")
    bad["enveloped-data, not auth"] = _der.seq(_der.encode_oid("1.2.840.113549.1.7.3"), good[header + 13:])
    bad["empty"] = b""
    accepted = []
    for name, blob in bad.items():
        for call in (lambda b=blob: parse_message(b), lambda b=blob: open_message(b, unwrap=kek.unwrap, context=None)):
            try:
                call()
            except FormatError as exc:
                assert "SECRET" not in str(exc)
            else:
                accepted.append(name)
    assert accepted == []
    # the algorithm and content-type refusals name what the message asks for (public fields)
    for name, shown in (("AES-128-GCM", "aes-128-gcm"), ("AES-256-CCM", "aes-256-ccm"),
                        ("enveloped-data, not auth", "EnvelopedData")):
        with pytest.raises(UnsupportedAlgorithmError, match=shown):
            parse_message(bad[name])
    # BER is read (its DER re-encoding is): tests/envelope/test_envelope_ber.py
    ber = b"\x30\x80" + good[2 + (good[1] & 0x7F if good[1] & 0x80 else 0):] + b"\x00\x00"
    assert open_message(ber, unwrap=kek.unwrap, context=None) == SECRET


def test_every_single_byte_tamper_is_refused(kek: SoftKek, dek: bytes) -> None:
    ri = kek.recipient(dek)
    blob = seal_message(SECRET, dek=dek, recipient_infos=[ri], context=CTX)
    start = blob.index(ri.dump())
    recipient_span = range(start, start + len(ri.dump()))
    for i in range(len(blob)):
        for flip in (0x01, 0x80, 0xFF):
            tampered = bytearray(blob)
            tampered[i] ^= flip
            with pytest.raises(KeymgrError) as info:
                open_message(bytes(tampered), unwrap=kek.unwrap, context=CTX)
            assert isinstance(info.value, IntegrityError | FormatError | KeyNotFoundError), (i, info.value)
            if isinstance(info.value, KeyNotFoundError):
                assert i in recipient_span  # only an edited recipient can make the key unknown
            assert SECRET not in repr(info.value).encode() and dek.hex() not in repr(info.value)
    for cut in range(len(blob)):
        with pytest.raises(FormatError):
            open_message(blob[:cut], unwrap=kek.unwrap, context=CTX)


def test_parsed_message_repr_has_no_secret(kek: SoftKek, dek: bytes) -> None:
    parsed = parse_message(seal_message(SECRET, dek=dek, recipient_infos=[kek.recipient(dek)], context=CTX))
    assert dek.hex() not in repr(parsed) and repr(dek) not in repr(parsed)


# --- fuzz --------------------------------------------------------------------------------------

FIXED = SoftKek(b"fuzz", bytes(32))
FIXED_DEK = bytes(range(32))
FIXED_BLOB = seal_message(SECRET, dek=FIXED_DEK, recipient_infos=[FIXED.recipient(FIXED_DEK)], context=CTX)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_keymgr_errors(data: bytes) -> None:
    for call in (lambda: parse_message(data),
                 lambda: open_message(data, unwrap=FIXED.unwrap, context=CTX),
                 lambda: open_message(data, unwrap=lambda ri: FIXED_DEK, context=None, return_context=True)):
        with contextlib.suppress(KeymgrError):
            call()


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(FIXED_BLOB) - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_messages_raise_only_keymgr_errors(edits: list[tuple[int, int]]) -> None:
    data = bytearray(FIXED_BLOB)
    for pos, value in edits:
        data[pos] = value
    try:
        out = open_message(bytes(data), unwrap=FIXED.unwrap, context=CTX)
    except KeymgrError:
        return
    assert bytes(data) == FIXED_BLOB and out == SECRET
