"""Streams: inputs of any size in constant memory, sealed in the STREAM construction.

STREAM (Hoang, Reyhanitabar, Rogaway, Vizár, "Online Authenticated-Encryption
and its Nonce-Reuse Misuse-Resistance", CRYPTO 2015) cuts the plaintext
into segments and seals each with a nonce holding its index and a flag
marking the last one, so a reader that authenticates segment by segment
notices reordering (index), truncation at any boundary (no last flag) and
appended data (a segment after the last). Layout::

    magic   8 bytes  89 4B 4D 47 0D 0A 1A 0A   ("\\x89KMG\\r\\n\\x1a\\n", PNG-style: catches
                                               7-bit and newline-mangling channels)
    version 1 byte   1
    length  4 bytes  big-endian length of the DER header that follows
    header  DER      StreamHeader ::= SEQUENCE {
                       recipientInfos  SET OF RecipientInfo,      -- NOT authenticated: rewrap edits it
                       params SEQUENCE {                           -- authenticated, via header_hash
                         segmentSize INTEGER, salt OCTET STRING (32),
                         noncePrefix OCTET STRING (7),
                         authAttrs [1] IMPLICIT SET OF Attribute } }  -- commitment, context
    segments         segmentSize bytes of ciphertext + 16-byte tag each; the last one
                     holds 0 .. segmentSize-1 bytes, so it is always short (an input
                     that is a whole number of segments ends with an empty last segment)

    header_hash   = SHA-256(magic || version || DER(params))
    segment key   = HKDF-SHA256(DEK, salt, "keymgr stream v1 segment key" || header_hash)
    nonce(i)      = noncePrefix (7) || i as 4 bytes big-endian || 0x01 if last else 0x00
    AAD           = header_hash

A changed parameter changes the segment key and the AAD, so every segment
fails; a segment from another stream (other salt, so other key) fails even
under the same DEK. The recipients stay outside so :func:`replace_stream_recipients`
can rewrap without touching a segment; a swapped-in recipient carrying
another key fails the key commitment.

On failure ``dst`` holds exactly the plaintext of the segments verified
before the failing one; callers that must leave nothing (the CLI) write to a
temporary file and delete it on error.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from keymgr._memory import zero
from keymgr.envelope import _der
from keymgr.envelope._aead import TAG_SIZE, DataKey
from keymgr.envelope._attrs import AuthAttributes, build_auth_attrs, normalize_context, parse_auth_attrs
from keymgr.envelope.cms import Unwrap, UnwrapDer, check_context, find_data_key
from keymgr.envelope.recipients import ParsedRecipients, RecipientLike, encode_recipient_infos, parse_recipient_infos
from keymgr.errors import ConfigurationError, FormatError, IntegrityError

__all__ = [
    "DEFAULT_SEGMENT_SIZE", "StreamHeader", "decrypt_stream", "encrypt_stream", "read_stream_header",
    "replace_stream_recipients",
]

MAGIC = b"\x89KMG\r\n\x1a\n"
VERSION = 1
SALT_SIZE = 32
PREFIX_SIZE = 7
#: chosen by bench/segment_size.py (docs/format.md, "Segment size")
DEFAULT_SEGMENT_SIZE = 1024 * 1024
MIN_SEGMENT_SIZE = 16
MAX_SEGMENT_SIZE = 64 * 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024
MAX_SEGMENTS = 2**32

STREAM_FAILED = "the stream failed authentication: tampered, truncated, reordered, spliced, wrong key or wrong context"
_PRELUDE = struct.Struct(">8sBI")
_KEY_INFO = b"keymgr stream v1 segment key"


@dataclass(frozen=True)
class StreamHeader:
    """A stream's header as read from the front of the stream, before any key is involved."""

    recipient_infos: ParsedRecipients
    segment_size: int
    salt: bytes
    nonce_prefix: bytes
    auth_attrs: AuthAttributes
    #: the header exactly as read (prelude and DER): what :func:`replace_stream_recipients` takes
    raw: bytes = field(repr=False)
    header_hash: bytes = field(repr=False)
    _params: bytes = field(repr=False, compare=False)

    @property
    def context(self) -> dict[str, str] | None:
        return self.auth_attrs.context

    @property
    def commitment(self) -> bytes | None:
        return self.auth_attrs.commitment


def _header_hash(params: bytes) -> bytes:
    return hashlib.sha256(MAGIC + bytes((VERSION,)) + params).digest()


def _header(recipients: bytes, params: bytes) -> bytes:
    der = _der.seq(recipients, params)
    if len(der) > MAX_HEADER_BYTES:
        raise ConfigurationError(f"a stream header holds at most {MAX_HEADER_BYTES} bytes of recipients and context")
    return _PRELUDE.pack(MAGIC, VERSION, len(der)) + der


def _check_prelude(raw: bytes) -> int:
    """The header length announced by the prelude (magic, version, length)."""
    if len(raw) < _PRELUDE.size:
        raise FormatError("not a keymgr stream: truncated header")
    magic, version, length = _PRELUDE.unpack_from(raw)
    if magic != MAGIC:
        raise FormatError("not a keymgr stream")
    if version != VERSION:
        raise FormatError(f"keymgr stream version {version} is not supported (this keymgr reads {VERSION})")
    if length > MAX_HEADER_BYTES:
        raise FormatError("keymgr stream: header too large")
    return int(length)


def _parse_header(raw: bytes) -> StreamHeader:
    if len(raw) != _PRELUDE.size + _check_prelude(raw):
        raise FormatError("keymgr stream: header length does not match")
    what = "stream header"
    outer = _der.read_one(raw, _PRELUDE.size, tag=_der.SEQUENCE, what=what)
    parts = _der.children(raw, outer, limit=2, what=what)
    if len(parts) != 2 or parts[1].tag != _der.SEQUENCE:
        raise FormatError(f"{what}: malformed")
    recipients = parse_recipient_infos(raw, parts[0])
    params = _der.children(raw, parts[1], limit=4, what=what)
    if [p.tag for p in params] != [_der.INTEGER, _der.OCTET_STRING, _der.OCTET_STRING, 0xA1]:
        raise FormatError(f"{what}: malformed parameters")
    segment_size = _der.read_int(raw, params[0], what=what)
    salt, prefix = (raw[p.body:p.end] for p in params[1:3])
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE or len(salt) != SALT_SIZE or len(prefix) != PREFIX_SIZE:
        raise FormatError(f"{what}: segment size, salt or nonce prefix out of range")
    attrs = parse_auth_attrs(raw, params[3])
    if attrs.commitment is None:
        raise FormatError(f"{what}: the key commitment is missing")
    param_bytes = raw[parts[1].start:parts[1].end]
    return StreamHeader(recipient_infos=recipients, segment_size=segment_size, salt=salt, nonce_prefix=prefix,
                        auth_attrs=attrs, raw=bytes(raw), header_hash=_header_hash(param_bytes),
                        _params=param_bytes)


def _read_full(src: BinaryIO, view: memoryview) -> int:
    """Fill ``view`` from ``src`` unless it ends first; the count read (short reads are retried).

    A source that has nothing *yet* (non-blocking, ``None``) is refused rather
    than taken for the end: an encrypted stream must not end early by accident.
    """
    readinto = getattr(src, "readinto", None)
    got = 0
    while got < len(view):
        if readinto is not None:
            n = readinto(view[got:])
        else:
            chunk = src.read(len(view) - got)
            n = None if chunk is None else len(chunk)
            if n:
                view[got:got + n] = chunk
        if n is None:
            raise ConfigurationError("the source has no data yet (non-blocking?); streams need a blocking source")
        if not n:
            break
        got += n
    return got


def _write_all(dst: BinaryIO, view: memoryview) -> None:
    while view:
        n = dst.write(view)
        if n is None or n >= len(view):
            return
        view = view[n:]


def read_stream_header(src: BinaryIO) -> StreamHeader:
    """Read and check the header at the front of ``src``, leaving ``src`` at the first segment."""
    prelude = bytearray(_PRELUDE.size)
    if _read_full(src, memoryview(prelude)) != len(prelude):
        raise FormatError("not a keymgr stream: truncated header")
    raw = prelude + bytearray(_check_prelude(bytes(prelude)))
    if _read_full(src, memoryview(raw)[_PRELUDE.size:]) != len(raw) - _PRELUDE.size:
        raise FormatError("keymgr stream: truncated header")
    return _parse_header(bytes(raw))


def replace_stream_recipients(header_bytes: bytes, new_recipient_infos: Sequence[RecipientLike]) -> bytes:
    """A new header for the same stream with other recipients (rewrap); the segments that
    follow the old header stay valid after the new one, byte for byte."""
    header = _parse_header(bytes(header_bytes))
    return _header(encode_recipient_infos(new_recipient_infos), header._params)  # noqa: SLF001


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def _segments(src: BinaryIO, view: memoryview) -> Iterator[tuple[int, int, bool]]:
    """(index, length, last) of each segment read into ``view`` from ``src``: the first one that
    does not fill ``view`` (perhaps empty) is the last, so encrypting and decrypting agree on
    which segment carries the last-segment nonce."""
    index = 0
    while True:
        n = _read_full(src, view)
        yield index, n, n < len(view)
        if n < len(view):
            return
        index += 1


def encrypt_stream(src: BinaryIO, dst: BinaryIO, *, dek: DataKey | bytes | bytearray,
                   recipient_infos: Sequence[RecipientLike], context: Mapping[str, str] | None,
                   segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """Encrypt all of ``src`` into ``dst``; returns the number of plaintext bytes.

    Memory: two buffers of about ``segment_size``, reused for every segment.
    The salt and the nonce prefix are random, and no caller can choose them
    (a chosen prefix under a reused data key would repeat nonces).
    """
    ctx = normalize_context(context)
    if isinstance(segment_size, bool) or not isinstance(segment_size, int) or \
            not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise ConfigurationError(f"segment_size must be {MIN_SEGMENT_SIZE} to {MAX_SEGMENT_SIZE} bytes")
    salt, prefix = os.urandom(SALT_SIZE), os.urandom(PREFIX_SIZE)
    key = DataKey.coerce(dek)
    try:
        attrs = build_auth_attrs(context=ctx, commitment=key.commitment, content_type=False)
        params = _der.seq(_der.integer(segment_size), _der.octets(salt), _der.octets(prefix), b"\xa1" + attrs[1:])
        header = _header(encode_recipient_infos(recipient_infos), params)
        aad = _header_hash(params)
        segment_key = key.derive(salt=salt, info=_KEY_INFO + aad)
    finally:
        if key is not dek:
            key.wipe()
    plain = bytearray(segment_size)
    sealed = bytearray(segment_size + TAG_SIZE)
    plain_view, sealed_view = memoryview(plain), memoryview(sealed)
    total = 0
    try:
        _write_all(dst, memoryview(header))
        for index, n, last in _segments(src, plain_view):
            if index >= MAX_SEGMENTS:
                raise ConfigurationError("a stream holds at most 2^32 segments; use a larger segment_size")
            segment_key.seal_into(_nonce(prefix, index, last), plain_view[:n], aad, sealed_view[:n + TAG_SIZE])
            _write_all(dst, sealed_view[:n + TAG_SIZE])
            total += n
        return total
    finally:
        zero(plain)
        segment_key.wipe()


def decrypt_stream(src: BinaryIO, dst: BinaryIO, *, unwrap: Unwrap | None = None, context: Mapping[str, str] | None,
                   header: StreamHeader | None = None, unwrap_der: UnwrapDer | None = None) -> int:
    """Decrypt ``src`` into ``dst`` segment by segment; returns the number of plaintext bytes.

    ``unwrap`` / ``unwrap_der``: as for :func:`~keymgr.envelope.cms.open_message` (one of them).

    Pass ``header`` when :func:`read_stream_header` already read it from
    ``src`` (to look at recipients or context first). Only verified plaintext
    is written; a failure raises :class:`IntegrityError` with ``dst`` holding
    the segments verified before it.
    """
    if header is None:
        header = read_stream_header(src)
    check_context(header.context, header.commitment, context=context, return_context=False,
                  require_commitment=True, failure=STREAM_FAILED)
    key, owned = find_data_key(header.recipient_infos, unwrap, header.commitment, failure=STREAM_FAILED,
                               unwrap_der=unwrap_der)
    segment_key = key.derive(salt=header.salt, info=_KEY_INFO + header.header_hash)
    if owned:
        key.wipe()
    size, aad, prefix = header.segment_size, header.header_hash, header.nonce_prefix
    sealed = bytearray(size + TAG_SIZE)
    plain = bytearray(size)
    sealed_view, plain_view = memoryview(sealed), memoryview(plain)
    total = 0
    try:
        for index, n, last in _segments(src, sealed_view):
            if n < TAG_SIZE or index >= MAX_SEGMENTS:
                raise IntegrityError(STREAM_FAILED)
            try:
                segment_key.open_into(_nonce(prefix, index, last), sealed_view[:n], aad, plain_view[:n - TAG_SIZE])
            except IntegrityError:
                raise IntegrityError(STREAM_FAILED) from None
            _write_all(dst, plain_view[:n - TAG_SIZE])
            total += n - TAG_SIZE
        return total
    finally:
        zero(plain)
        segment_key.wipe()
