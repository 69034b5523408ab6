"""A small, strict DER codec for the few fixed shapes keymgr reads and writes.

Why not asn1crypto on these paths: building one AuthEnvelopedData with
asn1crypto costs 0.6-1.1 ms and parsing one ~120-200 µs here, while issue 3
asks a cached-key 1 KiB message to keep up with Tink's KmsEnvelopeAead
(~10 µs); bench/cms_encoding.py measures both (docs/format.md, "Costs").
asn1crypto stays the type of a ``RecipientInfo`` (the currency the token
glue trades in) and the independent parser the tests check every message
against; this module only concatenates and splits TLVs.

Strict means X.690 DER: definite, minimal lengths (no BER indefinite form),
low tag numbers only, minimal INTEGERs. Every violation is a
:class:`~keymgr.errors.FormatError` that names the structure, never a byte
of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from keymgr.errors import FormatError

__all__ = [
    "SEQUENCE", "SET", "OCTET_STRING", "INTEGER", "OID", "UTF8_STRING",
    "Tlv", "check_der", "children", "encode_oid", "decode_oid", "header", "integer", "octets", "read_int",
    "read_at", "read_one", "seq", "set_of", "tlv",
]

INTEGER = 0x02
OCTET_STRING = 0x04
NULL = 0x05
OID = 0x06
UTF8_STRING = 0x0C
SEQUENCE = 0x30
SET = 0x31

_MAX_LENGTH_OCTETS = 4  # 4 GiB: larger than anything keymgr holds in memory


def header(tag: int, length: int) -> bytes:
    """The identifier and DER (minimal, definite) length octets of a TLV."""
    if length < 0x80:
        return bytes((tag, length))
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(octets))) + octets


def tlv(tag: int, content: bytes) -> bytes:
    """Encode one TLV."""
    return header(tag, len(content)) + content


def seq(*parts: bytes) -> bytes:
    return tlv(SEQUENCE, b"".join(parts))


def set_of(elements: Iterable[bytes]) -> bytes:
    """DER SET OF: element encodings in ascending byte order (X.690 11.6)."""
    return tlv(SET, b"".join(sorted(elements)))


def octets(value: bytes) -> bytes:
    return tlv(OCTET_STRING, bytes(value))


def integer(value: int) -> bytes:
    """A non-negative INTEGER in minimal two's-complement form."""
    if value < 0:
        raise ValueError("only non-negative integers are encoded here")
    return tlv(INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def encode_oid(dotted: str) -> bytes:
    """The full TLV of an OBJECT IDENTIFIER given in dotted form."""
    arcs = [int(a) for a in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] > 39):
        raise ValueError(f"not an OID: {dotted}")
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return tlv(OID, bytes(body))


def decode_oid(body: bytes) -> str:
    """Dotted form of OID content octets; minimal sub-identifiers only."""
    if not body or body[-1] & 0x80:
        raise FormatError("malformed OBJECT IDENTIFIER")
    arcs: list[int] = []
    value = 0
    fresh = True
    for byte in body:
        if fresh and byte == 0x80:
            raise FormatError("malformed OBJECT IDENTIFIER (non-minimal)")
        value = (value << 7) | (byte & 0x7F)
        fresh = not byte & 0x80
        if fresh:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


class Tlv(NamedTuple):
    """One element of ``data``: ``data[start:end]`` is the whole TLV, ``data[body:end]`` its contents."""

    tag: int
    start: int
    body: int
    end: int


_new_tlv = tuple.__new__  # NamedTuple's own __new__ is Python code: ~0.3 µs a call on the hot path


def read_at(data: bytes, pos: int, end: int) -> Tlv:
    """The element starting at ``data[pos]``, which must end by ``end``."""
    if pos + 2 > end:
        raise FormatError("truncated DER element")
    tag = data[pos]
    first = data[pos + 1]
    body = pos + 2
    if first & 0x80:
        count = first & 0x7F
        if count == 0:
            raise FormatError("indefinite length (BER) is not DER")
        if count > _MAX_LENGTH_OCTETS or body + count > end:
            raise FormatError("malformed DER length")
        first = int.from_bytes(data[body:body + count], "big")
        if data[body] == 0 or first < 0x80:
            raise FormatError("non-minimal DER length")
        body += count
    if tag & 0x1F == 0x1F:
        raise FormatError("DER high tag numbers are not used by keymgr")
    if first > end - body:
        raise FormatError("truncated DER element")
    return _new_tlv(Tlv, (tag, pos, body, body + first))


def read_one(data: bytes, start: int = 0, end: int | None = None, *, tag: int, what: str) -> Tlv:
    """The single element filling ``data[start:end]``; trailing bytes are an error."""
    stop = len(data) if end is None else end
    element = read_at(data, start, stop)
    if element.tag != tag:
        raise FormatError(f"{what}: unexpected ASN.1 tag")
    if element.end != stop:
        raise FormatError(f"{what}: trailing bytes")
    return element


def children(data: bytes, outer: Tlv, *, limit: int, what: str) -> list[Tlv]:
    """The elements inside a constructed ``outer``, at most ``limit`` of them."""
    if not outer.tag & 0x20:
        raise FormatError(f"{what}: expected a constructed element")
    items: list[Tlv] = []
    pos = outer.body
    while pos < outer.end:
        if len(items) == limit:
            raise FormatError(f"{what}: more than {limit} elements")
        element = read_at(data, pos, outer.end)
        items.append(element)
        pos = element.end
    return items


def read_int(data: bytes, element: Tlv, *, what: str) -> int:
    """A small non-negative DER INTEGER."""
    body = data[element.body:element.end]
    if element.tag != INTEGER or not body or len(body) > 8:
        raise FormatError(f"{what}: expected a small INTEGER")
    if body[0] & 0x80 or (len(body) > 1 and body[0] == 0 and not body[1] & 0x80):
        raise FormatError(f"{what}: negative or non-minimal INTEGER")
    return int.from_bytes(body, "big")


def check_der(data: bytes, element: Tlv, *, what: str, depth: int = 24) -> None:
    """Walk every constructed element below ``element``: all lengths DER, nesting bounded."""
    if not element.tag & 0x20:
        return
    if depth == 0:
        raise FormatError(f"{what}: nested too deeply")
    pos = element.body
    while pos < element.end:
        inner = read_at(data, pos, element.end)
        check_der(data, inner, what=what, depth=depth - 1)
        pos = inner.end
