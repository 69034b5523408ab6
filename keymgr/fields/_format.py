"""The field form: one encrypted database value, and the authenticated data that binds it.

::

    value = 0x01 || key_ref (8) || nonce (12) || AES-256-GCM ciphertext (len(plaintext)) || tag (16)
    AAD   = "keymgr-field" || 0x01 || LP(key name) || LP(table) || LP(column) || key_ref || LP(row)
            || LP(extra_1 name) || LP(extra_1 value) ...   (extras sorted by name; LP = 4-byte length || UTF-8)

So ``len(value) = len(plaintext) + 37``: a 19-byte card number takes 56 bytes.

Why this and not CMS: a CMS message carries its wrapped data key, the key-encryption
algorithm, the KEK's id, the content parameters and the key commitment in every value
(263 bytes for an empty string, docs/format.md). A table holds thousands of values per
data key, so the field form names its data key by an 8-byte reference (``key_ref``) into a
*data-key table* written once per data key (:mod:`keymgr.fields.keys`): the same
KEKRecipientInfo a CMS message carries, and the same key commitment, stored once. Rewrap
replaces that one row; no value is read or written.

The place of the value (key name, table, column, row identity, and any extra context such
as a tenant) is never stored in the value: the caller states it on both sides, and it goes
into the GCM tag only. A value copied to another row or column fails authentication.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from keymgr.envelope._aead import NONCE_SIZE, TAG_SIZE
from keymgr.errors import ConfigurationError, IntegrityError

__all__ = ["FORMAT_VERSION", "KEY_REF_SIZE", "OVERHEAD", "Place", "column_prefix", "field_aad", "header", "key_ref_of",
           "pack", "row_suffix", "unpack"]

FORMAT_VERSION = 1
KEY_REF_SIZE = 8
_HEADER = 1 + KEY_REF_SIZE + NONCE_SIZE
#: Bytes a value adds to its plaintext: version, key reference, nonce, tag.
OVERHEAD = _HEADER + TAG_SIZE
_AAD_LABEL = b"keymgr-field\x01"
MAX_PART = 4096
#: The one message of every failed field decryption (no oracle: format, key, place alike).
FIELD_INTEGRITY = "the field failed authentication: tampered, truncated, wrong key or moved to another place"


@dataclass(frozen=True)
class Place:
    """Where a value lives: bound into its tag, never stored in it.

    ``row`` is the row's identity as text (a client-generated UUID in the SQLAlchemy
    integration, so it is known before the insert). ``extra`` carries further context
    (a tenant), bound the same way."""

    table: str
    column: str
    row: str
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("table", "column", "row"):
            check_part(name, getattr(self, name))
        extra = dict(self.extra)
        check_extra(extra)
        object.__setattr__(self, "extra", MappingProxyType(extra))

    def __repr__(self) -> str:  # the row id may be sensitive in some schemas: show the column only
        return f"Place({self.table}.{self.column})"


def check_part(name: str, part: object) -> None:
    """A table, column or row identity: a non-empty string of at most 4096 UTF-8 bytes."""
    try:
        size = len(part.encode()) if isinstance(part, str) else -1
    except UnicodeEncodeError:  # a lone surrogate; the error would carry the whole text
        size = -1
    if not isinstance(part, str) or not part or len(part) > MAX_PART or not 0 < size <= MAX_PART:
        raise ConfigurationError(f"a field's {name} must be a non-empty string of valid Unicode, at most "
                                 f"{MAX_PART} bytes")


def check_extra(extra: Mapping[str, str]) -> None:
    if not all(isinstance(k, str) and k and isinstance(v, str) for k, v in extra.items()):
        raise ConfigurationError("a field's extra context maps non-empty strings to strings")


def _lp(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">I", len(raw)) + raw


@functools.lru_cache(maxsize=1024)
def column_prefix(key: str, table: str, column: str) -> bytes:
    """The AAD's leading part, the same for every value of one column under one key."""
    check_part("table", table)
    check_part("column", column)
    return _AAD_LABEL + _lp(key) + _lp(table) + _lp(column)


def row_suffix(row: str, extra: Mapping[str, str] | None = None) -> bytes:
    """The AAD's trailing part: the row identity and the extra context (checked by the caller)."""
    if not extra:
        return _lp(row)
    return _lp(row) + b"".join(_lp(name) + _lp(extra[name]) for name in sorted(extra))


def field_aad(key_ref: bytes, key: str, place: Place) -> bytes:
    """The authenticated data of a value: unambiguous (every part length-prefixed, the key_ref
    fixed-size), so no two places share an AAD."""
    return column_prefix(key, place.table, place.column) + key_ref + row_suffix(place.row, place.extra)


def header(key_ref: bytes) -> bytes:
    """What every value under one data key starts with: version || key_ref (the nonce follows)."""
    return bytes((FORMAT_VERSION,)) + key_ref


def pack(key_ref: bytes, nonce: bytes, sealed: bytes) -> bytes:
    """A value from its parts (``sealed`` is ciphertext || tag)."""
    return header(key_ref) + nonce + sealed


def unpack(value: bytes) -> tuple[bytes, bytes, bytes]:
    """(key_ref, nonce, sealed) of a value; :class:`IntegrityError` for anything not a v1 value."""
    if len(value) < OVERHEAD or value[0] != FORMAT_VERSION:
        raise IntegrityError(FIELD_INTEGRITY)
    return value[1:1 + KEY_REF_SIZE], value[1 + KEY_REF_SIZE:_HEADER], value[_HEADER:]


def key_ref_of(value: bytes) -> bytes:
    """The data key a value names (for a re-encryption pass that skips current values)."""
    return unpack(value)[0]
