"""Authenticated attributes: the encryption context, the key commitment, their OIDs.

keymgr's own OIDs hang under one arc minted from a UUID (ITU-T X.667,
arc 2.25): UUID ``688ef7b7-979e-4522-9261-ce215e93f218`` gives
``2.25.138982042016392611621762531081200071192`` (recorded in docs/format.md).

Attribute values (DER, one value per attribute):

- encryption context ``{arc}.1.1``: ``SEQUENCE OF SEQUENCE { key UTF8String, value UTF8String }``
  sorted by the key's UTF-8 bytes, keys unique and non-empty: one encoding per
  dict, so the bytes under the tag are a function of the context alone.
- key commitment ``{arc}.1.2``: ``OCTET STRING`` (32 bytes, see ``_aead.key_commitment``).
- content-type ``1.2.840.113549.1.9.3`` (RFC 5652 section 11.1): written in CMS
  messages. RFC 5083 section 2.1 does not require it (it requires authAttrs only
  for content other than id-data), but it is the one way the inner content type,
  which is not otherwise authenticated, gets under the tag.

The AAD is the DER of the whole attribute set with the universal SET OF tag
(0x31), not the [1] implicit tag it carries inside AuthEnvelopedData (RFC
5083 section 2.2).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

from keymgr.envelope import _der
from keymgr.envelope._aead import COMMITMENT_SIZE
from keymgr.errors import ConfigurationError, FormatError

KEYMGR_ARC = "2.25.138982042016392611621762531081200071192"
OID_CONTEXT = KEYMGR_ARC + ".1.1"
OID_COMMITMENT = KEYMGR_ARC + ".1.2"
OID_THRESHOLD_RECIPIENT = KEYMGR_ARC + ".2.1"
OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_DATA = "1.2.840.113549.1.7.1"

MAX_CONTEXT_ENTRIES = 64
MAX_CONTEXT_BYTES = 16 * 1024
MAX_ATTRIBUTES = 32
MAX_AUTH_ATTRS_BYTES = 64 * 1024

_CONTEXT_TLV = _der.encode_oid(OID_CONTEXT)
_COMMITMENT_TLV = _der.encode_oid(OID_COMMITMENT)
_CONTENT_TYPE_TLV = _der.encode_oid(OID_CONTENT_TYPE)
_DATA_TLV = _der.encode_oid(OID_DATA)
_CONTENT_TYPE_ATTR = _der.seq(_CONTENT_TYPE_TLV, _der.set_of([_DATA_TLV]))
#: the commitment attribute is fixed-size: its DER is this prefix and the 32 bytes
_COMMITMENT_PREFIX = _der.seq(_COMMITMENT_TLV, _der.set_of([_der.octets(bytes(COMMITMENT_SIZE))]))[:-COMMITMENT_SIZE]
_COMMITMENT_SIZE = len(_COMMITMENT_PREFIX) + COMMITMENT_SIZE
_KNOWN = {_CONTEXT_TLV: OID_CONTEXT, _COMMITMENT_TLV: OID_COMMITMENT, _CONTENT_TYPE_TLV: OID_CONTENT_TYPE}


def normalize_context(context: Mapping[str, str] | None) -> dict[str, str]:
    """The context as a plain dict ({} for None), checked; :class:`ConfigurationError` if unusable."""
    if context is None:
        return {}
    if type(context) is not dict and not isinstance(context, Mapping):
        raise ConfigurationError("an encryption context is a mapping of str to str")
    if len(context) > MAX_CONTEXT_ENTRIES:
        raise ConfigurationError(f"an encryption context has at most {MAX_CONTEXT_ENTRIES} entries")
    size = 0
    for key, value in context.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigurationError("encryption context keys and values must be str")
        if not key:
            raise ConfigurationError("encryption context keys must not be empty")
        try:
            size += len(key.encode("utf-8")) + len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise ConfigurationError("encryption context entries must be valid Unicode (no lone surrogates)") from None
    if size > MAX_CONTEXT_BYTES:
        raise ConfigurationError(f"an encryption context holds at most {MAX_CONTEXT_BYTES} bytes")
    return dict(context)


ContextItems = tuple[tuple[str, str], ...]
#: contexts checked before, by their entries in the caller's order: (the checked dict, its entries sorted)
_CHECKED: dict[ContextItems, tuple[dict[str, str], ContextItems]] = {}
_CHECKED_MAX = 256


def checked_context(context: Mapping[str, str] | None) -> tuple[dict[str, str], ContextItems]:
    """:func:`normalize_context`, and its entries sorted (the order DER and cache keys use).

    Remembered for a ``dict`` seen before (equal entries, equal order): a service seals
    message after message under a handful of contexts, and checking and sorting one
    each time was a tenth of a cached encrypt. The dict returned is shared: read it,
    never change it. A dict whose entries equal (``==``, same hash) a checked one's is
    taken for it: only ``str`` entries pass the check, and only a ``str`` (or an object
    that claims equality with one) equals a ``str``."""
    items: ContextItems | None = None
    if type(context) is dict:
        try:
            items = tuple(context.items())
            found = _CHECKED.get(items)
        except TypeError:  # an unhashable value: normalize_context says what is wrong with it
            items = found = None
        if found is not None:
            return found
    ctx = normalize_context(context)
    result = (ctx, tuple(sorted(ctx.items())))
    if items is not None:
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.clear()
        _CHECKED[items] = result
    return result


def _context_value(context: dict[str, str]) -> bytes:
    pairs = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in context.items())
    return _der.seq(*(_der.seq(_der.tlv(_der.UTF8_STRING, k), _der.tlv(_der.UTF8_STRING, v)) for k, v in pairs))


@functools.lru_cache(maxsize=256)
def _frame(context_items: tuple[tuple[str, str], ...], content_type: bool) -> tuple[bytes, bytes]:
    """(head, tail) with ``head + commitment attribute + tail`` the DER attribute set.

    Everything but the commitment's 32 bytes depends on the context alone, so it is
    encoded once per context. DER sorts a SET OF by encoding (X.690 11.6); every
    attribute's OID differs from the commitment's inside ``_COMMITMENT_PREFIX``,
    so the commitment's place in that order does not depend on its value.
    """
    others = [_der.seq(_CONTEXT_TLV, _der.set_of([_context_value(dict(context_items))]))] if context_items else []
    if content_type:
        others.append(_CONTENT_TYPE_ATTR)
    before = sorted(a for a in others if a < _COMMITMENT_PREFIX)
    after = sorted(a for a in others if a > _COMMITMENT_PREFIX)
    size = sum(map(len, others)) + _COMMITMENT_SIZE
    return _der.header(_der.SET, size) + b"".join(before), b"".join(after)


def build_auth_attrs(*, context: dict[str, str], commitment: bytes, content_type: bool,
                     sorted_items: ContextItems | None = None) -> bytes:
    """The DER of the attribute set with the SET OF tag: exactly the AAD (RFC 5083 section 2.2).
    ``sorted_items``: the context's entries sorted, where the caller has them (:func:`checked_context`)."""
    if len(commitment) != COMMITMENT_SIZE:
        raise ConfigurationError(f"a key commitment is {COMMITMENT_SIZE} bytes")
    head, tail = _frame(tuple(sorted(context.items())) if sorted_items is None else sorted_items, content_type)
    return head + _COMMITMENT_PREFIX + commitment + tail


@dataclass(frozen=True)
class AuthAttributes:
    """What keymgr reads from a set of authenticated attributes."""

    #: the AAD: the attribute set's DER under the universal SET OF tag
    aad: bytes = field(repr=False)
    context: dict[str, str] | None
    commitment: bytes | None
    content_type: str | None
    #: attributes keymgr does not interpret: (OID, whole Attribute DER)
    other: tuple[tuple[str, bytes], ...] = ()
    #: where the commitment's 32 bytes start in the bytes parsed (keymgr.envelope.cms's shape cache)
    commitment_at: int | None = field(default=None, repr=False, compare=False)


def _attribute(data: bytes, attr: _der.Tlv) -> tuple[str, _der.Tlv]:
    """(type OID, the one value) of an attribute keymgr reads, or (type OID, the attribute) of another."""
    if attr.end - attr.start == _COMMITMENT_SIZE and data.startswith(_COMMITMENT_PREFIX, attr.start):
        return OID_COMMITMENT, _der.read_at(data, attr.end - COMMITMENT_SIZE - 2, attr.end)  # fast path: ours
    if attr.end - attr.start == len(_CONTENT_TYPE_ATTR) and data.startswith(_CONTENT_TYPE_ATTR, attr.start):
        return OID_CONTENT_TYPE, _der.read_at(data, attr.end - len(_DATA_TLV), attr.end)  # fast path: id-data
    what = "authenticated attributes"
    head = _der.read_at(data, attr.body, attr.end) if attr.tag == _der.SEQUENCE else None
    if head is None or head.tag != _der.OID:
        raise FormatError(f"{what}: expected Attribute SEQUENCEs with a type OID")
    oid = _KNOWN.get(data[head.start:head.end]) or _der.decode_oid(data[head.body:head.end])
    if oid not in _KNOWN.values():
        return oid, attr
    values = _der.read_at(data, head.end, attr.end)
    if values.tag != _der.SET or values.end != attr.end:
        raise FormatError(f"{what}: malformed attribute")
    value = _der.read_at(data, values.body, values.end) if values.body < values.end else None
    if value is None or value.end != values.end:
        raise FormatError(f"{what}: exactly one value expected")
    return oid, value


def _decode_context(data: bytes, value: _der.Tlv) -> dict[str, str]:
    what = "encryption context"
    if value.tag != _der.SEQUENCE:
        raise FormatError(f"{what}: expected a SEQUENCE")
    context: dict[str, str] = {}
    previous = b""
    for entry in _der.children(data, value, limit=MAX_CONTEXT_ENTRIES, what=what):
        key = _der.read_at(data, entry.body, entry.end)
        item = _der.read_at(data, key.end, entry.end)
        if entry.tag != _der.SEQUENCE or key.tag != _der.UTF8_STRING or item.tag != _der.UTF8_STRING \
                or item.end != entry.end:
            raise FormatError(f"{what}: expected SEQUENCE {{ UTF8String, UTF8String }} pairs")
        key_bytes = data[key.body:key.end]
        if key_bytes <= previous:  # also refuses the empty key
            raise FormatError(f"{what}: keys not unique, empty or not in canonical order")
        previous = key_bytes
        try:
            context[key_bytes.decode("utf-8")] = data[item.body:item.end].decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{what}: invalid UTF-8") from None
    return context


@functools.lru_cache(maxsize=256)
def _context_items(value: bytes) -> tuple[tuple[str, str], ...]:
    """The context in one attribute value (its DER), decoded once per distinct context:
    services see the same few contexts over and over."""
    return tuple(_decode_context(value, _der.read_at(value, 0, len(value))).items())


#: Attribute sets read before, by their bytes with the commitment value cut out (see parse_auth_attrs).
_SEEN: dict[bytes, tuple[int, tuple[tuple[str, str], ...] | None, str | None, tuple[tuple[str, bytes], ...]]] = {}
_SEEN_MAX = 256


def parse_auth_attrs(data: bytes, element: _der.Tlv) -> AuthAttributes:
    """Read an attribute set (tagged SET OF or [1]) into :class:`AuthAttributes`; :class:`FormatError` if malformed.

    Messages under one key and context differ here only in the commitment's 32
    bytes, so an attribute set is remembered by its bytes with the commitment
    value cut out at the first place ``_COMMITMENT_PREFIX`` occurs, and only when
    the full parse found the commitment value exactly there. A later set equal
    outside those bytes has its prefix first at the same place (an earlier one
    would be in the remembered bytes too), so those bytes are the content of the
    same OCTET STRING: its structure, context and content type are the same.
    """
    if element.end - element.start > MAX_AUTH_ATTRS_BYTES:
        raise FormatError("authenticated attributes: too large")
    body = data[element.body:element.end]
    cut = body.find(_COMMITMENT_PREFIX) + len(_COMMITMENT_PREFIX)
    key = body[:cut] + body[cut + COMMITMENT_SIZE:] if cut >= len(_COMMITMENT_PREFIX) else None
    seen = _SEEN.get(key) if key is not None else None
    if seen is not None and seen[0] == cut:
        return AuthAttributes(aad=_der.header(_der.SET, len(body)) + body, context=None if seen[1] is None else
                              dict(seen[1]), commitment=body[cut:cut + COMMITMENT_SIZE], content_type=seen[2],
                              other=seen[3], commitment_at=element.body + cut)
    attrs, commitment_at = _parse_auth_attrs(data, element)
    if key is not None and commitment_at == element.body + cut:
        if len(_SEEN) >= _SEEN_MAX:
            _SEEN.clear()
        context = None if attrs.context is None else tuple(attrs.context.items())
        _SEEN[key] = (cut, context, attrs.content_type, attrs.other)
    return attrs


def _parse_auth_attrs(data: bytes, element: _der.Tlv) -> tuple[AuthAttributes, int | None]:
    """:func:`parse_auth_attrs` in full, and where in ``data`` the commitment value starts (None: absent)."""
    what = "authenticated attributes"
    items = _der.children(data, element, limit=MAX_ATTRIBUTES, what=what)
    if not items:
        raise FormatError(f"{what}: empty set (RFC 5652 requires SIZE 1..MAX)")
    encodings = [data[attr.start:attr.end] for attr in items]
    for earlier, later in zip(encodings, encodings[1:], strict=False):
        width = max(len(earlier), len(later))
        if earlier.ljust(width, b"\x00") > later.ljust(width, b"\x00"):
            # not DER (X.690 11.6): the AAD is the DER of the set, so a set out of order is read
            # through the BER path, which sorts it, never used as the AAD as it came
            raise FormatError(f"{what}: the SET OF is not in DER order")
    seen: set[str] = set()
    other: list[tuple[str, bytes]] = []
    context = commitment = content_type = None
    commitment_at = None
    for attr in items:
        oid, value = _attribute(data, attr)
        if oid in seen:
            raise FormatError(f"{what}: an attribute type appears twice")
        seen.add(oid)
        if oid == OID_COMMITMENT:
            if value.tag != _der.OCTET_STRING or value.end - value.body != COMMITMENT_SIZE:
                raise FormatError(f"key commitment: expected a {COMMITMENT_SIZE}-byte OCTET STRING")
            commitment, commitment_at = data[value.body:value.end], value.body
        elif oid == OID_CONTEXT:
            context = dict(_context_items(data[value.start:value.end]))
        elif oid == OID_CONTENT_TYPE:
            if value.tag != _der.OID:
                raise FormatError("content-type attribute: expected an OID")
            raw = data[value.start:value.end]
            content_type = OID_DATA if raw == _DATA_TLV else _der.decode_oid(data[value.body:value.end])
        else:
            other.append((oid, data[value.start:value.end]))
    aad = _der.header(_der.SET, element.end - element.body) + data[element.body:element.end]
    return AuthAttributes(aad=aad, context=context, commitment=commitment, content_type=content_type,
                          other=tuple(other), commitment_at=commitment_at), commitment_at
