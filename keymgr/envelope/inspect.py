"""What a blob or file is, and which keys it needs, without any token.

Rotation work asks this of many files: rewrap ("is it ours, and is it under
the current primary?"), ``key destroy --paths`` ("how many envelopes still
need version N?"). The answer comes from the recipients alone, which are not
secret and not authenticated (they sit outside the AAD), so it needs no
key, reads no payload and proves nothing about integrity.

- :func:`sniff` looks at the first bytes only: ``"message"`` (a DER
  ``ContentInfo`` of type id-ct-authEnvelopedData), ``"stream"`` (the stream
  magic) or None.
- :func:`inspect_envelope` parses a whole message, or a stream's header at
  the front of the bytes given, into an :class:`EnvelopeInfo`.
- :func:`inspect_file` does the same for a path, reading a stream's header
  only and a message whole: a message's recipients come before its payload,
  but the parse that vouches for them checks the whole structure, and its
  outer DER length must equal the file size (a truncated or padded file is a
  :class:`~keymgr.errors.FormatError`, not a message).
- :func:`read_message` reads one message from a file or pipe in bounded
  memory: the outer DER length first, checked against the input's size and a
  cap, then exactly that many bytes (``keymgr decrypt``).

Key ids: a ``KEKRecipientInfo``'s ``kekid`` is the CKA_ID of a token key
version (:attr:`RecipientSummary.key_id`); RSA-OAEP (``ktri``) and ECDH
(``kari``) recipients name a key pair by subjectKeyIdentifier (its bytes) or
by issuer and serial (no key id); ``ori`` recipients carry their type OID
(the threshold recipient's is ``OID_THRESHOLD_RECIPIENT``).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from asn1crypto import cms

from keymgr.envelope import _der
from keymgr.envelope._attrs import OID_THRESHOLD_RECIPIENT
from keymgr.envelope.cms import OID_AUTH_ENVELOPED_DATA, parse_message
from keymgr.envelope.recipients import (
    ParsedRecipients,
    RecipientKind,
    read_kek_recipient,
    read_other_recipient,
    recipient_kind,
)
from keymgr.envelope.stream import MAGIC, StreamHeader, read_stream_header
from keymgr.errors import ConfigurationError, FormatError

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "EnvelopeInfo", "EnvelopeKind", "RecipientSummary", "SNIFF_BYTES",
           "inspect_envelope", "inspect_file", "message_length", "outer_length", "read_message", "sniff"]

EnvelopeKind = Literal["message", "stream"]

_AUTH_ENVELOPED_TLV = _der.encode_oid(OID_AUTH_ENVELOPED_DATA)
#: enough bytes for :func:`sniff`: SEQUENCE header (at most 6) + the OID TLV, or the stream magic
SNIFF_BYTES = 6 + len(_AUTH_ENVELOPED_TLV)
#: :func:`inspect_file` and :func:`read_message` refuse larger messages (they are read whole);
#: streams have no limit
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class RecipientSummary:
    """One recipient as far as it names a key: its kind, the key id (if it has one), a detail.

    ``detail`` is the key-encryption algorithm for ``kekri`` (``aes256_wrap`` ...), the
    identifier form for ``ktri`` / ``kari`` (``"ski"`` or ``"issuer_serial"``), the oriType OID
    for ``ori`` and "" for ``pwri``. A ``kari`` with several recipient keys yields one
    summary per key.
    """

    kind: RecipientKind
    key_id: bytes | None
    detail: str

    @property
    def is_threshold(self) -> bool:
        return self.kind == "ori" and self.detail == OID_THRESHOLD_RECIPIENT


@dataclass(frozen=True)
class EnvelopeInfo:
    """What :func:`inspect_envelope` found. ``size`` is the message's length, or the stream header's."""

    kind: EnvelopeKind
    recipients: tuple[RecipientSummary, ...]
    context: dict[str, str] | None
    has_commitment: bool
    size: int

    @property
    def kek_ids(self) -> tuple[bytes, ...]:
        """The CKA_IDs of the token key versions that can unwrap the data key, in recipient order."""
        return tuple(r.key_id for r in self.recipients if r.kind == "kekri" and r.key_id is not None)

    def needs(self, key_id: bytes) -> bool:
        """True if a ``KEKRecipientInfo`` names ``key_id`` (destroying it would cost this recipient)."""
        return bytes(key_id) in self.kek_ids


def sniff(head: bytes | bytearray | memoryview) -> EnvelopeKind | None:
    """``"message"``, ``"stream"`` or None, from the first :data:`SNIFF_BYTES` (or fewer) bytes."""
    data = bytes(head[:SNIFF_BYTES])
    if data.startswith(MAGIC):
        return "stream"
    if len(data) < 2 or data[0] != _der.SEQUENCE:
        return None
    first = data[1]
    skip = 2 + (first & 0x7F if first & 0x80 else 0)
    return "message" if data.startswith(_AUTH_ENVELOPED_TLV, skip) else None


def message_length(head: bytes | bytearray | memoryview) -> int:
    """The total length a message announces in its outer DER header; FormatError if it announces none."""
    if sniff(head) != "message":
        raise FormatError("not a keymgr message")
    return outer_length(head)


def outer_length(head: bytes | bytearray | memoryview) -> int:
    """The total length (header included) a DER SEQUENCE announces in its first (at most 6) bytes;
    FormatError if they announce none (not a SEQUENCE, indefinite BER length, over 4 GiB)."""
    data = bytes(head[:6])
    if len(data) < 2 or data[0] != _der.SEQUENCE:
        raise FormatError("not a keymgr message")
    first = data[1]
    if not first & 0x80:
        return 2 + first
    count = first & 0x7F
    if count == 0 or count > 4 or len(data) < 2 + count:
        raise FormatError("not a keymgr message: malformed DER length")
    return 2 + count + int.from_bytes(data[2:2 + count], "big")


def read_message(src: BinaryIO | io.RawIOBase, *, size: int | None, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 name: str = "the input") -> bytes:
    """One DER message from ``src``, read in memory bounded by ``max_bytes``.

    The outer length is read first and checked, before anything else is read, against
    ``max_bytes`` and then ``size`` (the bytes left in the input when it is a regular file);
    then exactly that many bytes are read, and one more to see that nothing follows. So a
    huge file or an endless pipe is refused at once, and at most ``max_bytes + 1`` bytes are
    ever read. :class:`FormatError` when the framing is no message's (a malformed length, a
    length other than ``size``, an input that ends early or goes on): nothing about the
    content is checked here. :class:`ConfigurationError` when the message is larger than
    ``max_bytes``.

    A message from another implementation may be BER with an indefinite outer length
    (``openssl cms -stream``, Bouncy Castle): nothing announces its size, so it is read to
    the end of the input, still never beyond ``max_bytes`` (docs/format.md, "BER in, DER out").
    """
    head = _read_up_to(src, 6)
    if head[:2] == b"\x30\x80":
        return _read_to_end(src, head, size=size, max_bytes=max_bytes, name=name)
    if len(head) >= 2 and head[0] == 0x30 and 0x85 <= head[1] <= 0x88:  # 5 to 8 length octets: > 4 GiB
        raise ConfigurationError(f"{name}: the message announces more than 4 GiB, more than the {max_bytes}-byte "
                                 "limit for messages held in memory (--max-message-size)")
    length = outer_length(head)
    if length > max_bytes:  # first: over the limit is what to say, whatever else is wrong (as for 30 80)
        raise ConfigurationError(f"{name}: the message announces {length} bytes, more than the {max_bytes}-byte "
                                 "limit for messages held in memory (--max-message-size)")
    if size is not None and length != size:
        raise FormatError(f"{name}: the message announces {length} bytes but the input holds {size}")
    if length < len(head):
        raise FormatError(f"{name}: bytes follow the {length}-byte message")
    out = bytearray(head)
    while len(out) < length:
        chunk = src.read(min(_READ_CHUNK, length - len(out)))
        if not chunk:
            raise FormatError(f"{name}: the input ends after {len(out)} of the {length} bytes the message announces")
        out += chunk
    if src.read(1):
        raise FormatError(f"{name}: bytes follow the {length}-byte message")
    return bytes(out)


def _read_to_end(src: BinaryIO | io.RawIOBase, head: bytes, *, size: int | None, max_bytes: int,
                 name: str) -> bytes:
    """The rest of an input whose length nothing announces, refused once it passes ``max_bytes``."""
    def too_large(what: str) -> ConfigurationError:
        return ConfigurationError(f"{name}: the BER message {what}, more than the {max_bytes}-byte limit for "
                                  "messages held in memory (--max-message-size)")

    if size is not None and size > max_bytes:
        raise too_large(f"holds {size} bytes")
    out = bytearray(head)
    while chunk := src.read(_READ_CHUNK):
        out += chunk
        if len(out) > max_bytes:
            raise too_large(f"holds more than {max_bytes} bytes")
    return bytes(out)


def _read_up_to(src: BinaryIO | io.RawIOBase, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = src.read(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _summaries(recipients: ParsedRecipients) -> tuple[RecipientSummary, ...]:
    found: list[RecipientSummary] = []
    for index, der in enumerate(recipients.der):
        kind = recipient_kind(der)
        if kind == "kekri":
            kek = read_kek_recipient(der)
            found.append(RecipientSummary("kekri", kek.kek_id, kek.algorithm))
        elif kind == "ori":
            found.append(RecipientSummary("ori", None, read_other_recipient(der)[0]))
        elif kind == "ktri":
            found.append(_by_rid("ktri", recipients[index].chosen["rid"]))
        elif kind == "kari":
            keys = recipients[index].chosen["recipient_encrypted_keys"]
            found.extend(_by_rid("kari", k["rid"]) for k in keys)
        else:
            found.append(RecipientSummary(kind, None, ""))
    return tuple(found)


def _by_rid(kind: RecipientKind,
            rid: cms.RecipientIdentifier | cms.KeyAgreementRecipientIdentifier) -> RecipientSummary:
    """A ktri's ``rid`` or a kari key's ``rid``: subjectKeyIdentifier bytes, or issuer and serial."""
    try:
        if rid.name == "issuer_and_serial_number":
            return RecipientSummary(kind, None, "issuer_serial")
        chosen = rid.chosen
        ski = chosen["subject_key_identifier"] if rid.name == "r_key_id" else chosen
        return RecipientSummary(kind, bytes(ski.native), "ski")
    except (ValueError, TypeError, KeyError, AttributeError):
        raise FormatError(f"{kind} recipient: malformed recipient identifier") from None


def _stream_info(header: StreamHeader) -> EnvelopeInfo:
    return EnvelopeInfo("stream", _summaries(header.recipient_infos), header.context,
                        header.commitment is not None, len(header.raw))


def inspect_envelope(data: bytes) -> EnvelopeInfo:
    """Parse a whole message, or a stream header at the front of ``data`` (segments may follow).

    :class:`FormatError` if ``data`` is not a keymgr envelope or is malformed.
    """
    blob = bytes(data)
    kind = sniff(blob)
    if kind == "message":
        message = parse_message(blob)
        return EnvelopeInfo("message", _summaries(message.recipient_infos), message.context,
                            message.commitment is not None, len(blob))
    if kind == "stream":
        return _stream_info(read_stream_header(io.BytesIO(blob)))
    raise FormatError("not a keymgr envelope (neither a CMS AuthEnvelopedData message nor a keymgr stream)")


def inspect_file(path: str | os.PathLike[str], *,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> EnvelopeInfo | None:
    """:func:`inspect_envelope` for a file: None if it does not even start like an envelope.

    A stream is read up to the end of its header; a message is read whole
    after its announced length was checked against the file size and
    ``max_message_bytes``. A file that starts like an envelope but is not a
    valid one (truncated, padded, malformed) is a :class:`FormatError`;
    unreadable files are :class:`ConfigurationError`.
    """
    target = Path(path)
    try:
        with target.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(SNIFF_BYTES)
            kind = sniff(head)
            if kind is None:
                return None
            if kind == "stream":
                handle.seek(0)
                return _stream_info(read_stream_header(handle))
            length = message_length(head)
            if length != size:
                raise FormatError(f"{target}: the message announces {length} bytes but the file holds {size}")
            if length > max_message_bytes:
                raise ConfigurationError(f"{target}: a {length}-byte message is larger than the "
                                         f"{max_message_bytes}-byte limit for reading messages whole")
            return inspect_envelope(head + handle.read(length - len(head)))
    except OSError as exc:
        raise ConfigurationError(f"cannot read {target}: {exc.strerror or type(exc).__name__}") from None
