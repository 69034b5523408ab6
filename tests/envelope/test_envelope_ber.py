"""BER in, DER out (keymgr.envelope._ber): messages from other writers are read through their DER
re-encoding; keymgr writes DER only; streams and keymgr's own artefacts stay DER-only.

The BER forms here are made from keymgr's own DER messages by a small re-encoder (every freedom
X.690 section 8 gives: indefinite lengths, non-minimal lengths, strings cut into segments), so
the expected plaintext is known; Bouncy Castle's and ``openssl cms -stream``'s real BER are read
in tests/test_interop_*.py.
"""

from __future__ import annotations

import io
import os

import pytest

from keymgr.envelope import _der, open_message, parse_message, replace_recipients, seal_message
from keymgr.envelope._aead import DataKey
from keymgr.envelope._ber import ber_to_der
from keymgr.envelope.stream import decrypt_stream, encrypt_stream
from keymgr.errors import FormatError, IntegrityError
from tests._ber import OneByteSegments, reencode, to_ber
from tests._softkek import SoftKek

CTX = {"tenant": "acme", "purpose": "ber"}
SECRET = os.urandom(3000)


@pytest.fixture
def kek() -> SoftKek:
    return SoftKek(b"ber-kek")


@pytest.mark.parametrize("seed", range(6))
def test_ber_forms_of_a_message_decrypt_and_parse_as_its_der(kek: SoftKek, seed: int) -> None:
    dek = os.urandom(32)
    der = seal_message(SECRET, dek=dek, recipient_infos=[kek.recipient(dek)], context=CTX)
    ber = to_ber(der, seed)
    assert ber != der and ber[:2] in (b"\x30\x80", b"\x30\x84")
    assert ber_to_der(ber) == der  # the re-encoding is the very DER keymgr wrote
    assert open_message(ber, unwrap=kek.unwrap, context=CTX) == SECRET
    assert parse_message(ber).aad == parse_message(der).aad
    with pytest.raises(IntegrityError):
        open_message(ber, unwrap=kek.unwrap, context={"tenant": "other"})
    # rewrap writes DER: every field copied from the DER re-encoding
    assert replace_recipients(ber, [kek.recipient(dek)]) == der


def test_aad_is_the_der_of_auth_attrs_in_any_order(kek: SoftKek) -> None:
    """RFC 5083 section 2.2: the AAD is authAttrs' DER (SET OF sorted), whatever order a BER
    writer put them in; a DER message is read as written (keymgr's are sorted)."""
    dek = os.urandom(32)
    der = seal_message(SECRET, dek=dek, recipient_infos=[kek.recipient(dek)], context=CTX)
    parsed = parse_message(der)
    attrs = parsed._fields["auth_attrs"]  # noqa: SLF001 - the [1] element as written
    element = _der.read_at(attrs, 0, len(attrs))
    items = [attrs[e.start:e.end] for e in _der.children(attrs, element, limit=8, what="t")]
    assert items == sorted(items) and len(items) == 3
    shuffled = _der.tlv(0xA1, b"".join(reversed(items)))
    at = der.index(attrs)
    unsorted_der = der[:at] + shuffled + der[at + len(attrs):]
    indefinite_outer = b"\x30\x80" + unsorted_der[len(_der.header(0x30, 0)) + (unsorted_der[1] & 0x7F if
                                                                                  unsorted_der[1] & 0x80 else 0):]
    ber = indefinite_outer + b"\x00\x00"
    assert open_message(ber, unwrap=kek.unwrap, context=CTX) == SECRET


@pytest.mark.parametrize(("name", "blob"), [
    ("no end-of-contents", b"\x30\x80\x02\x01\x00"),
    ("indefinite primitive", b"\x30\x80\x04\x80\x00\x00\x00\x00"),
    ("nested too deeply", b"\x30\x80" * 40 + b"\x00\x00" * 40),
    ("high tag number", b"\x30\x80\x1f\x81\x01\x00\x00\x00"),
    ("trailing bytes", b"\x30\x80\x00\x00\x00"),
    ("segment of another type", b"\x30\x80\x24\x80\x02\x01\x00\x00\x00\x00\x00"),
    ("constructed BIT STRING", b"\x30\x80\x23\x80\x03\x01\x00\x00\x00\x00\x00"),
    ("length beyond the input", b"\x30\x80\x04\x84\x7f\xff\xff\xff\x00"),
])
def test_malformed_ber_is_a_format_error(name: str, blob: bytes) -> None:
    with pytest.raises(FormatError):
        ber_to_der(blob)
    with pytest.raises(FormatError):
        parse_message(blob)


def test_streams_stay_der_only(kek: SoftKek) -> None:
    """A stream header is keymgr's own: only DER, as written (docs/format.md)."""
    dek = DataKey(os.urandom(32))
    sealed = io.BytesIO()
    encrypt_stream(io.BytesIO(b"s" * 100), sealed, dek=dek, recipient_infos=[kek.recipient(dek.reveal())],
                   context=None)
    raw = sealed.getvalue()
    header_length = int.from_bytes(raw[9:13], "big")
    header = raw[13:13 + header_length]
    ber_header = to_ber(header, 1)
    patched = raw[:9] + len(ber_header).to_bytes(4, "big") + ber_header + raw[13 + header_length:]
    with pytest.raises(FormatError):
        decrypt_stream(io.BytesIO(patched), io.BytesIO(), unwrap=kek.unwrap, context=None)


def test_segments_cost_their_bytes_and_elements_are_capped(kek: SoftKek) -> None:
    """A ciphertext in 1-byte segments is read (segments are appended to one buffer, not held as
    objects); more than 65,536 structural elements are refused."""
    dek = os.urandom(32)
    plaintext = os.urandom(100_000)
    der = seal_message(plaintext, dek=dek, recipient_infos=[kek.recipient(dek)], context=None)
    ber = reencode(der, OneByteSegments())
    assert ber.count(b"\x04\x01") >= len(plaintext)
    assert open_message(ber, unwrap=kek.unwrap, context=None) == plaintext
    crowded = b"\x30\x80" + b"\x02\x01\x00" * 70_000 + b"\x00\x00"
    with pytest.raises(FormatError, match="too many elements"):
        ber_to_der(crowded)
