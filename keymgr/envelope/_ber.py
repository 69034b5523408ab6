"""BER in, DER out: other implementations' CMS messages, re-encoded as DER before they are read.

keymgr writes DER only, and its reader (:mod:`keymgr.envelope._der`) reads DER only:
one encoding per message is what makes a rewrap byte-exact. Other writers use BER's
freedoms, and the standards let them: Bouncy Castle builds ``AuthEnvelopedData`` as BER
sequences, ``openssl cms -encrypt -stream`` writes indefinite lengths and cuts the
ciphertext into a constructed OCTET STRING. A message that the strict reader refuses is
therefore re-encoded here and read again (:func:`keymgr.envelope.cms.parse_message`):

* indefinite lengths become definite, non-minimal lengths minimal (X.690 10.1);
* constructed strings (a universal OCTET STRING or character string, and the
  ``encryptedContent [0] IMPLICIT OCTET STRING`` of the content) become primitive
  (X.690 10.2): the segments' contents, concatenated;
* ``authAttrs`` and each attribute's value set are sorted (X.690 11.6): RFC 5083 section
  2.2 computes the AAD over the DER encoding of the attribute set, whatever encoding
  the message itself used.

Refused (:class:`~keymgr.errors.FormatError`): high tag numbers, an indefinite length on a
primitive element, constructed BIT STRINGs (no CMS field keymgr reads is one), nesting
deeper than 32, more than 65,536 elements other than string segments, and anything that
is not BER at all. Memory stays within a small multiple of the input: a string's segments
are appended to one buffer, never held as objects (a message of a million 1-byte segments
costs what its bytes cost). Streams and keymgr's own artefacts
(keyring records, audit logs, backups) are never passed through here: they stay DER-only.
"""

from __future__ import annotations

from keymgr.envelope import _der
from keymgr.errors import FormatError

__all__ = ["ber_to_der"]

_MAX_DEPTH = 32
_MAX_ELEMENTS = 1 << 16
_CONSTRUCTED = 0x20
#: universal string types that BER may split into segments: OCTET STRING and the character strings
_STRING_TAGS = frozenset({0x04, 0x0C, 0x12, 0x13, 0x14, 0x16, 0x1A, 0x1C, 0x1E})
_BIT_STRING = 0x03
#: the tags from the ContentInfo down to the EncryptedContentInfo whose third element,
#: ``encryptedContent [0] IMPLICIT OCTET STRING``, BER writers send in segments
_CONTENT_PATH = (_der.SEQUENCE, 0xA0, _der.SEQUENCE, _der.SEQUENCE)


class _Node:
    """One decoded element: ``tag`` is its identifier octet; ``value`` for primitive elements
    (strings flattened), ``children`` for constructed ones."""

    __slots__ = ("tag", "value", "children")

    def __init__(self, tag: int, value: bytes | bytearray | memoryview = b"",
                 children: list[_Node] | None = None) -> None:
        self.tag = tag
        self.value = value
        self.children = children

    def encode(self, out: list[bytes | bytearray | memoryview]) -> int:
        """Append the DER of this element to ``out``; returns its length."""
        if self.children is None:
            head = _der.header(self.tag, len(self.value))
            out.append(head)
            out.append(self.value)
            return len(head) + len(self.value)
        parts: list[bytes | bytearray | memoryview] = []
        size = sum(child.encode(parts) for child in self.children)
        head = _der.header(self.tag, size)
        out.append(head)
        out.extend(parts)
        return len(head) + size

    def der(self) -> bytes:
        out: list[bytes | bytearray | memoryview] = []
        self.encode(out)
        return b"".join(out)


class _Decoder:
    """One pass over a BER input, counting the elements it makes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.view = memoryview(data)
        self.elements = 0

    def _header(self, pos: int, end: int, depth: int) -> tuple[int, int | None, int]:
        """(tag, length or None for indefinite, position of the contents) of the element at ``pos``."""
        data = self.data
        if depth > _MAX_DEPTH:
            raise FormatError("BER: nested too deeply")
        if pos + 2 > end:
            raise FormatError("BER: truncated element")
        tag, first = data[pos], data[pos + 1]
        if tag & 0x1F == 0x1F:
            raise FormatError("BER: high tag numbers are not used in CMS messages keymgr reads")
        pos += 2
        if first < 0x80:
            length: int | None = first
        elif first == 0x80:
            if not tag & _CONSTRUCTED:
                raise FormatError("BER: indefinite length on a primitive element")
            length = None
        else:
            count = first & 0x7F
            if count > 8 or pos + count > end:
                raise FormatError("BER: malformed length")
            length = int.from_bytes(data[pos:pos + count], "big")
            pos += count
        if length is not None and length > end - pos:
            raise FormatError("BER: truncated element")
        return tag, length, pos

    def _at_eoc(self, pos: int, end: int) -> bool:
        return pos + 2 <= end and self.data[pos] == 0 and self.data[pos + 1] == 0

    def string(self, pos: int, end: int, depth: int, tag: int, out: bytearray) -> int:
        """Append the contents of the string at ``pos`` (``tag``, primitive or in segments that
        carry ``tag``: X.690 8.23.6) to ``out``; returns where it ends."""
        found, length, body = self._header(pos, end, depth)
        if found & ~_CONSTRUCTED != tag & ~_CONSTRUCTED:
            raise FormatError("BER: a constructed string holds an element of another type")
        if not found & _CONSTRUCTED:
            out += self.view[body:body + (length or 0)]
            return body + (length or 0)
        return self._segments(body, length, end, depth, tag & ~_CONSTRUCTED if tag & 0xC0 == 0 else
                              _der.OCTET_STRING, out)

    def _segments(self, body: int, length: int | None, end: int, depth: int, segment_tag: int,
                  out: bytearray) -> int:
        stop = end if length is None else body + length
        at = body
        while True:
            if length is None and self._at_eoc(at, stop):
                return at + 2
            if length is not None and at >= stop:
                return stop
            at = self.string(at, stop, depth + 1, segment_tag, out)

    def element(self, pos: int, end: int, depth: int, path: tuple[int, ...] = (), index: int = 0) -> tuple[_Node, int]:
        """The element at ``pos`` (any length form) and where it ends; ``path`` is its ancestors' tags."""
        self.elements += 1
        if self.elements > _MAX_ELEMENTS:
            raise FormatError("BER: too many elements for a CMS message")
        tag, length, body = self._header(pos, end, depth)
        if not tag & _CONSTRUCTED:  # a definite length: _header refuses an indefinite one here
            size = length or 0
            return _Node(tag, value=self.view[body:body + size]), body + size
        if tag == _BIT_STRING | _CONSTRUCTED:
            raise FormatError("BER: constructed BIT STRING")
        if tag & 0xC0 == 0 and (tag & 0x1F) in _STRING_TAGS:
            value = bytearray()
            stop = self._segments(body, length, end, depth, tag & 0x1F, value)
            return _Node(tag & 0x1F, value=value), stop
        if tag == 0xA0 and path == _CONTENT_PATH and index == 2:  # encryptedContent, in segments
            value = bytearray()
            stop = self._segments(body, length, end, depth, _der.OCTET_STRING, value)
            return _Node(0x80, value=value), stop
        children: list[_Node] = []
        stop = end if length is None else body + length
        at = body
        while not (self._at_eoc(at, stop) if length is None else at >= stop):
            child, at = self.element(at, stop, depth + 1, (*path, tag), len(children))
            children.append(child)
        return _Node(tag, children=children), at + 2 if length is None else stop


def _sorted_set(node: _Node) -> None:
    """Sort a SET OF's elements by their DER (X.690 11.6)."""
    if node.children is not None:
        node.children.sort(key=_Node.der)


def _sort_auth_attrs(root: _Node) -> None:
    """authAttrs and each attribute's values in DER order, so that the AAD is their DER."""
    kids = root.children or []
    if root.tag != _der.SEQUENCE or len(kids) != 2 or kids[1].tag != 0xA0 or not kids[1].children:
        return
    aed = kids[1].children[0]
    for fld in aed.children or ():
        if fld.tag == 0xA1 and fld.children is not None:  # authAttrs: SET OF Attribute
            for attribute in fld.children:
                if attribute.tag == _der.SEQUENCE and attribute.children and len(attribute.children) == 2:
                    _sorted_set(attribute.children[1])
            _sorted_set(fld)


def ber_to_der(data: bytes) -> bytes:
    """The DER re-encoding of one BER-encoded CMS ``ContentInfo`` (trailing bytes refused)."""
    decoder = _Decoder(bytes(data))
    root, end = decoder.element(0, len(decoder.data), 0)
    if end != len(decoder.data):
        raise FormatError("BER: trailing bytes after the message")
    _sort_auth_attrs(root)
    return root.der()
