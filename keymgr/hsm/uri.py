"""RFC 7512 ``pkcs11:`` URIs: parse, format, and never show a PIN.

Grammar (RFC 7512 section 2.3)::

    pk11-URI   = "pkcs11:" pk11-path [ "?" pk11-query ]
    pk11-path  = [ pk11-pattr *(";" pk11-pattr) ]
    pk11-query = [ pk11-qattr *("&" pk11-qattr) ]

Values are percent-encoded UTF-8; ``id`` is raw bytes. Attribute names are
case-sensitive (section 2.3: "pk11-... attribute names are case-sensitive"),
the scheme is not. Each attribute may appear once (section 2.3: "An attribute
can appear at most once in a PKCS #11 URI"). Vendor attributes (names with
a ``-`` not defined by the RFC, section 2.3 ``pk11-v-attr-nm-char``) are kept
as they are; unknown names without the vendor form are refused, so a typo such
as ``tokn=`` is an error instead of a URI that matches every token.

``pin-source`` and ``pin-value`` together are refused (section 2.3: they
"MUST NOT" both be present). ``str()`` and ``repr()`` hide ``pin-value``;
:meth:`Pkcs11Uri.format` with ``include_secrets=True`` is the one way to get it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Any

from keymgr.errors import UriError

__all__ = ["Pkcs11Uri", "OBJECT_TYPES"]

OBJECT_TYPES = ("cert", "data", "private", "public", "secret-key")

# RFC 7512 2.3: characters that need no encoding (unreserved / pk11-res-avail sets).
_UNRESERVED = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~"
_PATH_SAFE = _UNRESERVED + ":[]@!$'()*+,=&"
_QUERY_SAFE = _UNRESERVED + ":[]@!$'()*+,=/?|"

# (uri name, field name) in the canonical order of RFC 7512 section 2.3
_PATH_ATTRS = (
    ("token", "token"), ("manufacturer", "manufacturer"), ("serial", "serial"), ("model", "model"),
    ("library-manufacturer", "library_manufacturer"), ("library-description", "library_description"),
    ("library-version", "library_version"), ("slot-manufacturer", "slot_manufacturer"),
    ("slot-description", "slot_description"), ("slot-id", "slot_id"),
    ("object", "object"), ("type", "type"), ("id", "id"),
)
_QUERY_ATTRS = (("module-name", "module_name"), ("module-path", "module_path"),
                ("pin-source", "pin_source"), ("pin-value", "pin_value"))
_PATH_NAMES = dict(_PATH_ATTRS)
_QUERY_NAMES = dict(_QUERY_ATTRS)
_VENDOR_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)+$", re.IGNORECASE)
_VERSION = re.compile(r"^\d+(\.\d+)?$")
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _decode(raw: str, *, name: str) -> bytes:
    """Percent-decode ``raw`` into bytes, refusing malformed escapes."""
    bad = _ESCAPE.search(raw)
    if bad:
        raise UriError(f"bad percent-escape in {name!r} at offset {bad.start()}")
    out = bytearray()
    i = 0
    while i < len(raw):
        char = raw[i]
        if char == "%":
            out.append(int(raw[i + 1:i + 3], 16))
            i += 3
        else:
            out.extend(char.encode("utf-8"))
            i += 1
    return bytes(out)


def _text(raw: str, *, name: str) -> str:
    try:
        return _decode(raw, name=name).decode("utf-8")
    except UnicodeDecodeError:
        raise UriError(f"attribute {name!r} is not valid UTF-8 after percent-decoding") from None


def _encode(value: str | bytes, safe: str, *, all_bytes: bool = False) -> str:
    data = value if isinstance(value, bytes) else value.encode("utf-8")
    if all_bytes:
        return "".join(f"%{b:02X}" for b in data)
    return "".join(chr(b) if chr(b) in safe else f"%{b:02X}" for b in data)


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed RFC 7512 URI. Every field is optional; absent means "any"."""

    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    library_manufacturer: str | None = None
    library_description: str | None = None
    library_version: str | None = None
    slot_manufacturer: str | None = None
    slot_description: str | None = None
    slot_id: int | None = None
    object: str | None = None
    type: str | None = None
    id: bytes | None = None
    module_name: str | None = None
    module_path: str | None = None
    pin_source: str | None = None
    pin_value: str | None = None
    vendor_path: tuple[tuple[str, str], ...] = ()
    vendor_query: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.pin_source is not None and self.pin_value is not None:
            raise UriError("a URI may carry pin-source or pin-value, not both (RFC 7512 2.3)")
        if self.type is not None and self.type not in OBJECT_TYPES:
            raise UriError(f"type must be one of {', '.join(OBJECT_TYPES)}, not {self.type!r}")
        if self.library_version is not None and not _VERSION.match(self.library_version):
            raise UriError(f"library-version must be M or M.N, not {self.library_version!r}")
        if self.slot_id is not None and (not isinstance(self.slot_id, int) or self.slot_id < 0):
            raise UriError("slot-id must be a non-negative decimal integer")

    # -- parsing ----------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        """Parse a ``pkcs11:`` URI; :class:`~keymgr.errors.UriError` says what is wrong."""
        if not isinstance(text, str):
            raise UriError("a PKCS#11 URI must be text")
        if text[:7].lower() != "pkcs11:":
            raise UriError("a PKCS#11 URI starts with 'pkcs11:'")
        if any(ch.isspace() for ch in text):
            raise UriError("a PKCS#11 URI contains no white space (percent-encode it as %20)")
        path, _, query = text[7:].partition("?")
        values: dict[str, Any] = {}
        vendor_path: list[tuple[str, str]] = []
        vendor_query: list[tuple[str, str]] = []
        seen: set[str] = set()
        for part, separator, known, vendor in ((path, ";", _PATH_NAMES, vendor_path),
                                               (query, "&", _QUERY_NAMES, vendor_query)):
            if not part:
                continue
            for item in part.split(separator):
                name, eq, raw = item.partition("=")
                where = "path" if separator == ";" else "query"
                if not eq or not name:
                    raise UriError(f"malformed {where} attribute {name or item!r}: expected name=value")
                if name in seen:
                    raise UriError(f"attribute {name!r} appears twice (RFC 7512 2.3)")
                seen.add(name)
                if name in known:
                    values[known[name]] = cls._convert(name, raw)
                elif name in _PATH_NAMES or name in _QUERY_NAMES:
                    raise UriError(f"attribute {name!r} belongs in the {'query' if where == 'path' else 'path'}")
                elif _VENDOR_NAME.match(name):
                    vendor.append((name, _text(raw, name=name)))
                else:
                    raise UriError(f"unknown {where} attribute {name!r}")
        return cls(**values, vendor_path=tuple(vendor_path), vendor_query=tuple(vendor_query))

    @staticmethod
    def _convert(name: str, raw: str) -> Any:
        if name == "id":
            return _decode(raw, name=name)
        value = _text(raw, name=name)
        if name == "slot-id":
            if not value.isdigit() or not value.isascii():
                raise UriError(f"slot-id must be a decimal integer, not {value!r}")
            return int(value)
        if name == "pin-value":
            return value
        return value

    # -- formatting -------------------------------------------------------------

    def format(self, *, include_secrets: bool = False) -> str:
        """The canonical text of this URI. ``pin-value`` shows as ``***`` unless asked for."""
        path: list[str] = []
        for uri_name, field_name in _PATH_ATTRS:
            value = getattr(self, field_name)
            if value is None:
                continue
            if field_name == "id":
                path.append(f"id={_encode(value, '', all_bytes=True)}")
            else:
                path.append(f"{uri_name}={_encode(str(value), _PATH_SAFE)}")
        path += [f"{name}={_encode(value, _PATH_SAFE)}" for name, value in self.vendor_path]
        query: list[str] = []
        for uri_name, field_name in _QUERY_ATTRS:
            value = getattr(self, field_name)
            if value is None:
                continue
            if field_name == "pin_value" and not include_secrets:
                query.append("pin-value=***")
            else:
                query.append(f"{uri_name}={_encode(value, _QUERY_SAFE)}")
        query += [f"{name}={_encode(value, _QUERY_SAFE)}" for name, value in self.vendor_query]
        text = "pkcs11:" + ";".join(path)
        return text + ("?" + "&".join(query) if query else "")

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return f"Pkcs11Uri({self.format()!r})"

    def redacted(self) -> str:
        return self.format()

    def with_(self, **changes: Any) -> Pkcs11Uri:
        """A copy with some fields changed (``uri.with_(pin_value=None)``)."""
        return replace(self, **changes)

    def token_only(self) -> Pkcs11Uri:
        """The same URI without object attributes and secrets: names just the token."""
        return replace(self, object=None, type=None, id=None, pin_value=None, pin_source=None)

    def matches_token(self, *, label: str, manufacturer: str, serial: str, model: str) -> bool:
        checks = ((self.token, label), (self.manufacturer, manufacturer), (self.serial, serial), (self.model, model))
        return all(wanted is None or wanted == actual for wanted, actual in checks)


assert {f.name for f in fields(Pkcs11Uri)} >= set(_PATH_NAMES.values()) | set(_QUERY_NAMES.values())
