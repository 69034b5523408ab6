"""keymgr.envelope.inspect: what a blob or file is and which keys it names, without a token.

Format-level cases use a software KEK and public keys made by ``cryptography``
(wrapping needs only the public side); the last test reads messages and
streams a real token wrote and finds the key version's CKA_ID in them.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keymgr.envelope import DataKey, encrypt_stream, other_recipient_info, seal_message
from keymgr.envelope._attrs import OID_THRESHOLD_RECIPIENT
from keymgr.envelope.inspect import SNIFF_BYTES, inspect_envelope, inspect_file, message_length, sniff
from keymgr.errors import ConfigurationError, FormatError
from keymgr.recipients import pubkey
from tests._softkek import SoftKek

CTX = {"tenant": "acme"}


def _message(dek: bytes, *recipients: object, context: dict[str, str] | None = CTX) -> bytes:
    return seal_message(b"payload " * 10, dek=dek, recipient_infos=list(recipients), context=context)  # type: ignore[arg-type]


def _stream(dek: bytes, *recipients: object, size: int = 300) -> bytes:
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(os.urandom(size)), out, dek=dek, recipient_infos=list(recipients),  # type: ignore[arg-type]
                   context=CTX, segment_size=64)
    return out.getvalue()


def test_message_lists_every_recipient_kind() -> None:
    dek = os.urandom(32)
    one, two = SoftKek(b"v1-id"), SoftKek(b"dr-site")
    rsa_pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    ec_pub = ec.generate_private_key(ec.SECP256R1()).public_key()
    ori = other_recipient_info(OID_THRESHOLD_RECIPIENT, b"\x04\x02hi")
    blob = _message(dek, one.recipient(dek), two.recipient(dek, "aes256_wrap_pad"),
                    pubkey.public_key_recipient(rsa_pub).wrap(DataKey(dek)),
                    pubkey.public_key_recipient(ec_pub).wrap(DataKey(dek)), ori)
    info = inspect_envelope(blob)
    assert info.kind == "message" and info.size == len(blob)
    assert sorted(info.kek_ids) == [b"dr-site", b"v1-id"]  # a DER SET OF is sorted: encoded order
    by_kind = {r.kind: r for r in info.recipients}
    assert sorted(r.kind for r in info.recipients) == ["kari", "kekri", "kekri", "ktri", "ori"]
    kek = {r.key_id: r.detail for r in info.recipients if r.kind == "kekri"}
    assert kek == {b"v1-id": "aes256_wrap", b"dr-site": "aes256_wrap_pad"}
    assert by_kind["ktri"].detail == by_kind["kari"].detail == "ski"
    assert by_kind["ktri"].key_id == pubkey.subject_key_identifier(rsa_pub)
    assert by_kind["kari"].key_id == pubkey.subject_key_identifier(ec_pub)
    assert by_kind["ori"].is_threshold and not by_kind["kekri"].is_threshold
    assert info.context == CTX and info.has_commitment
    assert info.needs(b"dr-site") and not info.needs(b"v2-id")


def test_stream_header_is_enough() -> None:
    dek = os.urandom(32)
    blob = _stream(dek, SoftKek(b"stream-key").recipient(dek, "aes256_gcm"))
    assert sniff(blob) == "stream"
    info = inspect_envelope(blob)
    assert info.kind == "stream" and info.kek_ids == (b"stream-key",)
    assert info.recipients[0].detail == "aes256_gcm"
    assert info.size < len(blob)  # the header only
    assert inspect_envelope(blob[:info.size]) == info  # no segment needed


@pytest.mark.parametrize("data", [b"", b"hello world", b"\x30\x03\x02\x01\x00", b"\x89PNG\r\n\x1a\n" + bytes(20),
                                  bytes(100)])
def test_not_envelopes(data: bytes, tmp_path: Path) -> None:
    assert sniff(data) is None
    with pytest.raises(FormatError, match="not a keymgr envelope"):
        inspect_envelope(data)
    path = tmp_path / "plain"
    path.write_bytes(data)
    assert inspect_file(path) is None


def test_sniff_handles_every_length_form() -> None:
    dek = os.urandom(32)
    for size, form in ((0, 0x81), (1000, 0x82), (70_000, 0x83)):
        blob = seal_message(os.urandom(size), dek=dek, recipient_infos=[SoftKek().recipient(dek)], context=None)
        assert blob[1] == form
        assert sniff(blob) == "message" and message_length(blob[:SNIFF_BYTES]) == len(blob)
    short = b"\x30\x0f" + bytes.fromhex("060b2a864886f70d0109100117")
    assert sniff(short) == "message" and message_length(short) == 17


def test_file_message_size_is_checked(tmp_path: Path) -> None:
    dek = os.urandom(32)
    blob = _message(dek, SoftKek(b"k").recipient(dek))
    path = tmp_path / "m.cms"
    path.write_bytes(blob)
    info = inspect_file(path)
    assert info is not None and info.kek_ids == (b"k",)
    for damaged in (blob[:-1], blob + b"\x00"):
        path.write_bytes(damaged)
        with pytest.raises(FormatError, match="announces"):
            inspect_file(path)
    path.write_bytes(blob)
    with pytest.raises(ConfigurationError, match="limit"):
        inspect_file(path, max_message_bytes=len(blob) - 1)


def test_file_stream_reads_only_the_header(tmp_path: Path) -> None:
    dek = os.urandom(32)
    blob = _stream(dek, SoftKek(b"s").recipient(dek), size=10_000)
    path = tmp_path / "s.kms"
    path.write_bytes(blob)
    info = inspect_file(path)
    assert info is not None and info.kind == "stream" and info.kek_ids == (b"s",)
    path.write_bytes(blob[:info.size - 1])  # a torn header is damaged, not "not an envelope"
    with pytest.raises(FormatError):
        inspect_file(path)


def test_malformed_message_with_the_right_start(tmp_path: Path) -> None:
    dek = os.urandom(32)
    blob = bytearray(_message(dek, SoftKek(b"k").recipient(dek)))
    at = blob.index(b"\x02\x01\x00\x31")  # version 0, then the RecipientInfos SET
    blob[at + 3] = 0x32
    assert sniff(blob) == "message"
    with pytest.raises(FormatError, match="recipient_infos"):
        inspect_envelope(bytes(blob))
    with pytest.raises(ConfigurationError, match="cannot read"):
        inspect_file(Path("/nonexistent/inspect-me"))


def test_token_written_envelopes_name_the_primary(km: object, key_name: str, tmp_path: Path) -> None:
    from keymgr import KeyManager

    assert isinstance(km, KeyManager)
    record = km.create_key(key_name)
    primary = record.primary_version.key_id
    blob = km.encrypt(b"secret", key=key_name, context=CTX)
    out = io.BytesIO()
    km.encrypt_stream(io.BytesIO(b"x" * 5000), out, key=key_name)
    (tmp_path / "m").write_bytes(blob)
    (tmp_path / "s").write_bytes(out.getvalue())
    for name, kind in (("m", "message"), ("s", "stream")):
        info = inspect_file(tmp_path / name)
        assert info is not None and info.kind == kind
        assert info.kek_ids == (primary,) and info.needs(primary)
