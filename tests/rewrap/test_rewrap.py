"""KeyManager.rewrap / rewrap_stream (keymgr.rewrap.message): recipients move to the primary, nothing else changes.

Every data key is unwrapped and wrapped by SoftHSM itself; "untouched" is checked
byte for byte on the parsed fields (encryptedContent, nonce, authAttrs, mac) and on
everything after a stream's header.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import pytest

import keymgr
from keymgr.envelope import parse_message, read_kek_recipient, read_stream_header, replace_recipients
from keymgr.errors import FormatError, IntegrityError, KeyNotFoundError, PolicyError
from keymgr.manager import INTEGRITY_MESSAGE
from tests.conftest import TokenUnderTest

CTX = {"tenant": "acme"}
PROFILES = ("kw", "gcm")


@pytest.fixture
def km(softhsm: TokenUnderTest) -> Iterator[keymgr.KeyManager]:
    with keymgr.KeyManager(softhsm.uri()) as manager:
        yield manager


def _kek_ids(blob: bytes) -> list[bytes]:
    return [read_kek_recipient(d).kek_id for d in parse_message(blob).recipient_infos.der if d[0] == 0xA2]


def _untouched(before: bytes, after: bytes) -> None:
    old, new = parse_message(before), parse_message(after)
    assert new.encrypted_content == old.encrypted_content and new.nonce == old.nonce
    assert new.aad == old.aad and new.mac == old.mac and new.commitment == old.commitment
    assert new.context == old.context


def _stream(km: keymgr.KeyManager, data: bytes, key: str, **kwargs: object) -> bytes:
    out = io.BytesIO()
    km.encrypt_stream(io.BytesIO(data), out, key=key, context=CTX, **kwargs)  # type: ignore[arg-type]
    return out.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("profile", PROFILES)
def test_v1_message_moves_to_v3_payload_untouched_then_retire(km: keymgr.KeyManager, key_name: str,
                                                             profile: str) -> None:
    km.create_key(key_name, profile=profile)
    v1_blob = km.encrypt(b"written under v1", key=key_name, context=CTX)
    km.rotate(key_name)
    km.rotate(key_name)
    record = km.describe_key(key_name)
    assert record.primary == 3
    v1_id, v3_id = record.version(1).key_id, record.version(3).key_id
    assert _kek_ids(v1_blob) == [v1_id]

    result = km.rewrapper().message(v1_blob)
    assert [(m.key, m.source, m.target, m.dropped) for m in result.moves] == [(key_name, 1, 3, False)]
    assert not result.current
    moved = result.data
    assert moved != v1_blob and _kek_ids(moved) == [v3_id]
    _untouched(v1_blob, moved)
    assert km.rewrap(v1_blob) != v1_blob  # the thin method does the same

    km.retire(key_name, below=3, immediately=True)
    assert km.decrypt(moved, context=CTX) == b"written under v1"
    with pytest.raises(PolicyError, match="retired"):
        km.decrypt(v1_blob, context=CTX)
    with pytest.raises(PolicyError, match="retired"):  # a retired version cannot be rewrapped away from
        km.rewrap(v1_blob)


@pytest.mark.slow
@pytest.mark.parametrize("profile", PROFILES)
def test_stream_header_only_segments_untouched(km: keymgr.KeyManager, key_name: str, profile: str) -> None:
    km.create_key(key_name, profile=profile)
    data = os.urandom(3 * 1024 * 1024 + 17)  # four segments of the default 1 MiB
    sealed = _stream(km, data, key_name)
    old_header = read_stream_header(io.BytesIO(sealed))
    km.rotate(key_name)
    km.rotate(key_name)
    out = io.BytesIO()
    result = km.rewrap_stream(io.BytesIO(sealed), out)
    assert [(m.source, m.target) for m in result.moves] == [(1, 3)]
    moved = out.getvalue()
    new_header = read_stream_header(io.BytesIO(moved))
    assert moved[len(new_header.raw):] == sealed[len(old_header.raw):]  # every segment byte
    assert new_header.header_hash == old_header.header_hash and new_header.salt == old_header.salt
    assert new_header.context == CTX and new_header.commitment == old_header.commitment
    v3 = km.describe_key(key_name).version(3).key_id
    assert [read_kek_recipient(d).kek_id for d in new_header.recipient_infos.der] == [v3]
    km.retire(key_name, below=3, immediately=True)
    plain = io.BytesIO()
    km.decrypt_stream(io.BytesIO(moved), plain, context=CTX)
    assert plain.getvalue() == data
    with pytest.raises(PolicyError):
        km.decrypt_stream(io.BytesIO(sealed), io.BytesIO(), context=CTX)


def test_idempotent_same_bytes(km: keymgr.KeyManager, key_name: str) -> None:
    km.create_key(key_name)
    blob = km.encrypt(b"x", key=key_name)
    current = km.rewrapper().message(blob)
    assert current.current and current.data == blob and current.kept == ((key_name, 1),)
    km.rotate(key_name)
    once = km.rewrap(blob)
    assert km.rewrap(once) == once and km.rewrapper().message(once).current
    sealed = _stream(km, b"y" * 100, key_name)
    out = io.BytesIO()
    assert km.rewrap_stream(io.BytesIO(sealed), out).current and out.getvalue() == sealed


@pytest.mark.slow
@pytest.mark.parametrize("profile", PROFILES)
def test_other_recipients_stay(km: keymgr.KeyManager, km_b: keymgr.KeyManager, key_name: str, profile: str) -> None:
    km.create_key(key_name, profile=profile)
    km_b.create_key(key_name + "-dr", profile=profile)
    blob = km.encrypt(b"to both", key=key_name, context=CTX, also_to=[km_b.recipient(key_name + "-dr")])
    dr_der = [d for d in parse_message(blob).recipient_infos.der
              if read_kek_recipient(d).kek_id == km_b.describe_key(key_name + "-dr").primary_version.key_id]
    km.rotate(key_name)
    moved = km.rewrap(blob)
    _untouched(blob, moved)
    after = parse_message(moved).recipient_infos.der
    assert len(after) == 2 and dr_der[0] in after  # the DR site's recipient, byte for byte
    assert km.describe_key(key_name).version(2).key_id in _kek_ids(moved)
    assert km.decrypt(moved, context=CTX) == km_b.decrypt(moved, context=CTX) == b"to both"
    assert km_b.rewrapper().message(moved).current  # the DR site sees its own recipient current
    with pytest.raises(KeyNotFoundError, match="none of the 1 recipients"):
        km_b.rewrap(km.encrypt(b"only here", key=key_name))


def test_stale_duplicate_is_dropped(km: keymgr.KeyManager, key_name: str) -> None:
    km.create_key(key_name)
    blob = km.encrypt(b"dup", key=key_name)
    km.rotate(key_name)
    v2_recipient = parse_message(km.rewrap(blob)).recipient_infos.der[0]
    both = replace_recipients(blob, [parse_message(blob).recipient_infos.der[0], v2_recipient])
    result = km.rewrapper().message(both)
    assert [(m.source, m.target, m.dropped) for m in result.moves] == [(1, 2, True)]
    assert parse_message(result.data).recipient_infos.der == (v2_recipient,)
    assert km.decrypt(result.data) == b"dup"


def test_spliced_recipient_is_not_laundered(km: keymgr.KeyManager, key_name: str) -> None:
    km.create_key(key_name)
    victim = km.encrypt(b"victim", key=key_name, context=CTX)
    other = km.encrypt(b"other", key=key_name, context=CTX)
    spliced = replace_recipients(victim, parse_message(other).recipient_infos.der)
    km.rotate(key_name)
    with pytest.raises(IntegrityError) as caught:
        km.rewrap(spliced)
    assert str(caught.value) == INTEGRITY_MESSAGE


def test_compat_message_and_not_an_envelope(km: keymgr.KeyManager, key_name: str) -> None:
    km.create_key(key_name)
    blob = km.encrypt(b"compat", key=key_name, compat_openssl=True)
    km.rotate(key_name)
    moved = km.rewrap(blob)
    _untouched(blob, moved)
    assert parse_message(moved).auth_attrs is None and km.decrypt(moved) == b"compat"
    with pytest.raises(FormatError):
        km.rewrap(b"not a message")


@pytest.mark.slow
def test_public_key_and_threshold_like_recipients_stay(km: keymgr.KeyManager, key_name: str) -> None:
    """Recipients keymgr cannot wrap for (RSA-OAEP, ECDH, an OtherRecipientInfo) are carried over byte for byte."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from keymgr.envelope import OID_THRESHOLD_RECIPIENT, other_recipient_info
    from keymgr.recipients import pubkey

    km.create_key(key_name)
    also = [pubkey.public_key_recipient(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()),
            pubkey.public_key_recipient(ec.generate_private_key(ec.SECP256R1()).public_key())]
    blob = km.encrypt(b"many recipients", key=key_name, also_to=also)
    ori = other_recipient_info(OID_THRESHOLD_RECIPIENT, b"\x04\x01x").dump()
    blob = replace_recipients(blob, [*parse_message(blob).recipient_infos.der, ori])
    foreign = [d for d in parse_message(blob).recipient_infos.der if d[0] != 0xA2]
    assert len(foreign) == 3
    km.rotate(key_name)
    moved = km.rewrap(blob)
    _untouched(blob, moved)
    after = parse_message(moved).recipient_infos.der
    assert len(after) == 4 and all(d in after for d in foreign)
    assert _kek_ids(moved) == [km.describe_key(key_name).version(2).key_id]
    assert km.decrypt(moved) == b"many recipients"
