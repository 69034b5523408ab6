"""RFC 7512 ``pkcs11:`` URIs: parse, format, and never show a PIN.

Exports :class:`Pkcs11Uri`, :data:`ObjectType` and :data:`OBJECT_TYPES`.

Grammar (RFC 7512 section 2.3)::

    pk11-URI   = "pkcs11:" pk11-path [ "?" pk11-query ]
    pk11-path  = [ pk11-pattr *(";" pk11-pattr) ]
    pk11-query = [ pk11-qattr *("&" pk11-qattr) ]
    pk11-pchar = unreserved / pk11-res-avail / "&" / pct-encoded
    pk11-qchar = unreserved / pk11-res-avail / "/" / "?" / "|" / pct-encoded
    pk11-res-avail = ":" / "[" / "]" / "@" / "!" / "$" / "'" / "(" / ")" / "*" / "+" / "," / "="

What the parser accepts, and why:

* The scheme is matched case-insensitively over ASCII (RFC 3986 section 3.1) and
  written in lowercase. ``P\\u212aCS11:`` (a Kelvin sign) is not ``pkcs11:``.
* Values are percent-decoded UTF-8 (RFC 7512 sections 2.3 and 5), except ``id``,
  which is CKA_ID's raw bytes. Characters outside pk11-pchar / pk11-qchar must be
  percent-encoded: a raw space, non-ASCII letter or ``#`` is an error, not a guess,
  and so is a ``%`` not followed by two hex digits.
* ``slot-id`` is decimal and fits a CK_SLOT_ID (an unsigned long, up to 2**64-1);
  ``library-version`` is ``M`` or ``M.N`` in decimal digits that fit a CK_VERSION
  (each a byte, 0-255), kept as text so that ``1.23`` is written back as it was read
  (it means major 1, minor 23; ``M`` alone means minor 0, as in p11-kit);
  ``type`` is one of :data:`OBJECT_TYPES`.
* Path attributes appear at most once (section 2.3), and so do the four standard
  query attributes. Section 2.3 lets vendor query attributes repeat, so they are an
  ordered tuple of pairs, as are vendor path attributes.
* ``pin-source`` with ``pin-value`` is refused (section 2.3: such a URI "SHOULD be
  refused as invalid"): choosing one would be a guess about a secret.
* Unknown attributes. The grammar makes every name of letters, digits, ``-`` and
  ``_`` that the RFC does not define a vendor attribute (``pk11-v-pattr`` /
  ``pk11-v-qattr``; no ``x-`` prefix is required, and section 3's own example is
  ``vendor-aaa``), so such names are kept in ``vendor_path`` / ``vendor_query`` and
  written back unchanged. Refused: a standard name in the wrong component
  (``pkcs11:pin-value=...``: a PIN kept as a vendor path attribute would escape
  redaction) and a name that differs from a standard one only in case (``Token=``,
  ``PIN-VALUE=``), on which readers disagree. A typo such as ``tokn=`` parses, but
  section 2.4 says an unrecognised path attribute SHOULD match nothing, and
  :meth:`Pkcs11Uri.matches_token` obeys: the typo finds no token, not every token.

Canonical form (:meth:`Pkcs11Uri.format`): lowercase scheme; standard attributes in
the order of the dataclass fields, then vendor ones in their order; only what
pk11-pchar / pk11-qchar forbid is percent-encoded, in uppercase hex (RFC 3986
section 2.1), except ``id``, which is percent-encoded entirely, as RFC 7512
recommends for this binary value (see section 3's examples). Parsing the canonical
form gives back an equal :class:`Pkcs11Uri`.

Secrets: ``str()``, ``repr()`` and :meth:`Pkcs11Uri.redacted` show ``pin-value=***``;
only ``format(include_secrets=True)`` writes the PIN. Every malformed input raises
:class:`~keymgr.errors.UriError` with a one-line message naming the attribute and
the offset (characters from the start of the text, from 0); messages never quote a
query value, where PINs live.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

from keymgr.errors import UriError

__all__ = ["OBJECT_TYPES", "ObjectType", "Pkcs11Uri"]

#: Values of the ``type`` attribute (RFC 7512 section 2.3): CKO_CERTIFICATE, CKO_DATA,
#: CKO_PRIVATE_KEY, CKO_PUBLIC_KEY and CKO_SECRET_KEY objects.
ObjectType = Literal["cert", "data", "private", "public", "secret-key"]
OBJECT_TYPES: tuple[str, ...] = get_args(ObjectType)

_SCHEME = "pkcs11:"
_UNRESERVED = string.ascii_letters + string.digits + "-._~"
_RES_AVAIL = ":[]@!$'()*+,="
_ALLOWED = {
    "path": frozenset(_UNRESERVED + _RES_AVAIL + "&"),  # pk11-pchar
    "query": frozenset(_UNRESERVED + _RES_AVAIL + "/?|"),  # pk11-qchar
}
_SEPARATOR = {"path": ";", "query": "&"}
_HEX = frozenset(string.hexdigits)
_NAME = re.compile(r"[A-Za-z0-9_-]+")  # 1*pk11-v-attr-nm-char
_DIGITS = re.compile(r"[0-9]+")
_VERSION = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_SLOT_ID_MAX = 2**64 - 1

# (name in the URI, dataclass field), in canonical order.
_PATH_ATTRS = (
    ("token", "token"), ("manufacturer", "manufacturer"), ("serial", "serial"), ("model", "model"),
    ("library-manufacturer", "library_manufacturer"), ("library-description", "library_description"),
    ("library-version", "library_version"), ("slot-manufacturer", "slot_manufacturer"),
    ("slot-description", "slot_description"), ("slot-id", "slot_id"),
    ("object", "object"), ("type", "type"), ("id", "id"),
)
_QUERY_ATTRS = (("module-name", "module_name"), ("module-path", "module_path"),
                ("pin-source", "pin_source"), ("pin-value", "pin_value"))
_FIELDS = {"path": dict(_PATH_ATTRS), "query": dict(_QUERY_ATTRS)}
_STANDARD = {**_FIELDS["path"], **_FIELDS["query"]}


def _show(value: str) -> str:
    """A short one-line quotation of a non-secret value, for an error message."""
    return repr(value if len(value) <= 40 else value[:40] + "...")


def _value_problem(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the attribute ``name``, or None.

    One check serves :meth:`Pkcs11Uri.parse` (which adds the offset) and direct
    construction, so a URI built in code obeys the rules of a parsed one. Only
    ``type``, ``slot-id`` and ``library-version`` values are quoted: none is secret.
    """
    if name == "id":
        return None if isinstance(value, bytes) else "id must be bytes"
    if name == "slot-id":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _SLOT_ID_MAX:
            return "slot-id must be a decimal integer from 0 to 2**64-1 (a CK_SLOT_ID)"
        return None
    if not isinstance(value, str):
        return f"{name} must be text"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"{name} is not encodable as UTF-8 (RFC 7512 section 5)"
    if name == "library-version":
        if not _VERSION.fullmatch(value):
            return f"library-version must be M or M.N in decimal digits, not {_show(value)}"
        if any(int(part) > 255 for part in value.split(".")):
            return (f"library-version {_show(value)} does not fit a CK_VERSION (major and minor are bytes, "
                    "0 to 255: RFC 7512 section 2.3)")
    if name == "type" and value not in OBJECT_TYPES:
        return f"type must be one of {', '.join(OBJECT_TYPES)}, not {_show(value)}"
    return None


def _vendor_name_problem(name: Any, component: str) -> str | None:
    """Why ``name`` cannot be a vendor attribute of ``component`` ("path"/"query"), or None."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        return f"a {component} attribute name must be letters, digits, '-' or '_' (RFC 7512 section 2.3)"
    standard = name.lower()
    if standard not in _STANDARD:
        return None
    if standard != name:
        return f"attribute {name!r} differs from the standard {standard!r} only in case"
    if name in _FIELDS[component]:
        return f"{name!r} is a standard attribute, not a vendor one"
    other = "query" if component == "path" else "path"
    return f"{name!r} is a {other} attribute and cannot appear in the {component} (RFC 7512 section 2.3)"


def _attributes(text: str, start: int, end: int, component: str) -> Iterator[tuple[str, int, int, int]]:
    """(name, offset of the name, start and end of the raw value) of each attribute in text[start:end]."""
    if start >= end:
        return
    separator = _SEPARATOR[component]
    offset = start
    while True:
        stop = text.find(separator, offset, end)
        stop = end if stop < 0 else stop
        if offset == stop:
            raise UriError(f"empty {component} attribute at offset {offset} (a stray {separator!r}?)")
        equals = text.find("=", offset, stop)
        if equals < 0:
            raise UriError(f"the {component} attribute at offset {offset} has no '=' (expected name=value)")
        if equals == offset:
            raise UriError(f"empty attribute name at offset {offset} in the {component}")
        name = text[offset:equals]
        if not _NAME.fullmatch(name):
            raise UriError(f"the {component} attribute name at offset {offset} is not letters, digits, "
                           "'-' or '_' (RFC 7512 section 2.3)")
        yield name, offset, equals + 1, stop
        if stop == end:
            return
        offset = stop + 1


def _decode(text: str, start: int, end: int, component: str, name: str) -> bytes:
    """Percent-decode text[start:end], a value of ``component``, refusing what its grammar forbids."""
    allowed = _ALLOWED[component]
    out = bytearray()
    i = start
    while i < end:
        char = text[i]
        if char == "%":
            if i + 2 >= end or text[i + 1] not in _HEX or text[i + 2] not in _HEX:
                raise UriError(f"bad percent-escape at offset {i} in the value of {name}: "
                               "'%' must be followed by two hex digits")
            out.append(int(text[i + 1:i + 3], 16))
            i += 3
        elif char in allowed:
            out.append(ord(char))
            i += 1
        elif component == "path":
            raise UriError(f"character {char!r} at offset {i} is not allowed in the value of {name}; "
                           "percent-encode it (RFC 7512 section 2.3)")
        else:
            raise UriError(f"a character at offset {i} is not allowed in the value of {name}; "
                           "percent-encode it (RFC 7512 section 2.3)")
    return bytes(out)


def _utf8(raw: bytes, name: str, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UriError(f"the value of {name} at offset {offset} is not UTF-8 once percent-decoded "
                       "(RFC 7512 section 5)") from None


def _convert(name: str, raw: bytes, offset: int) -> str | bytes | int:
    """The typed value of the standard attribute ``name`` from its decoded bytes."""
    if name == "id":
        return raw
    text = _utf8(raw, name, offset)
    value: str | int = text
    if name == "slot-id":
        if not _DIGITS.fullmatch(text):
            raise UriError(f"slot-id must be a decimal integer, not {_show(text)}, at offset {offset}")
        digits = text.lstrip("0") or "0"
        value = int(digits) if len(digits) <= 20 else _SLOT_ID_MAX + 1
    problem = _value_problem(name, value)
    if problem:
        raise UriError(f"{problem}, at offset {offset}")
    return value


def _encode(value: str | bytes | int, allowed: frozenset[str]) -> str:
    if isinstance(value, int):
        return str(value)
    if isinstance(value, bytes):
        return "".join(f"%{b:02X}" for b in value)
    return "".join(chr(b) if chr(b) in allowed else f"%{b:02X}" for b in value.encode("utf-8"))


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed RFC 7512 URI. Every field is optional; ``None`` means "any".

    Path fields select a library, slot, token or object (RFC 7512 section 2.3);
    query fields say how to load the module and get the PIN. An empty string is a
    value, not an absence: ``serial=`` matches only an empty serial (section 3).
    Construct directly or with :meth:`parse`; both check the same rules.
    """

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
    type: ObjectType | None = None
    id: bytes | None = None
    module_name: str | None = None
    module_path: str | None = None
    pin_source: str | None = None
    pin_value: str | None = None
    vendor_path: tuple[tuple[str, str], ...] = ()
    vendor_query: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for name, field in _STANDARD.items():
            value = getattr(self, field)
            if value is not None and (problem := _value_problem(name, value)):
                raise UriError(problem)
        for component in ("path", "query"):
            pairs = getattr(self, f"vendor_{component}")
            if not isinstance(pairs, tuple) or not all(isinstance(p, tuple) and len(p) == 2 for p in pairs):
                raise UriError(f"vendor_{component} must be a tuple of (name, value) pairs")
            for index, (name, value) in enumerate(pairs):
                problem = _vendor_name_problem(name, component) or _value_problem(f"vendor_{component} value", value)
                if problem:
                    raise UriError(problem)
                if component == "path" and any(name == earlier for earlier, _ in pairs[:index]):
                    raise UriError(f"vendor path attribute {name!r} appears twice (RFC 7512 section 2.3)")
        if self.pin_source is not None and self.pin_value is not None:
            raise UriError("pin-source and pin-value cannot both be given (RFC 7512 section 2.3)")

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        """Parse a ``pkcs11:`` URI; :class:`~keymgr.errors.UriError` says what is wrong and where."""
        if not isinstance(text, str):
            raise UriError(f"a PKCS#11 URI must be str, not {type(text).__name__}")
        if not (text[:7].isascii() and text[:7].lower() == _SCHEME):
            raise UriError("not a PKCS#11 URI: it must start with 'pkcs11:' at offset 0 (RFC 7512 section 2.1)")
        query_at = text.find("?", 7)
        path_end = len(text) if query_at < 0 else query_at
        found: dict[str, Any] = {}
        vendor: dict[str, list[tuple[str, str]]] = {"path": [], "query": []}
        for component, start, end in (("path", 7, path_end), ("query", path_end + 1, len(text))):
            standard = _FIELDS[component]
            seen: set[str] = set()
            for name, offset, value_start, value_end in _attributes(text, start, end, component):
                if name in standard or component == "path":
                    if name in seen:
                        raise UriError(f"attribute {name!r} appears twice in the {component}, "
                                       f"again at offset {offset} (RFC 7512 section 2.3)")
                    seen.add(name)
                if name not in standard and (problem := _vendor_name_problem(name, component)):
                    raise UriError(f"{problem}, at offset {offset}")
                raw = _decode(text, value_start, value_end, component, name)
                if name in standard:
                    found[standard[name]] = _convert(name, raw, value_start)
                else:
                    vendor[component].append((name, _utf8(raw, name, value_start)))
        return cls(**found, vendor_path=tuple(vendor["path"]), vendor_query=tuple(vendor["query"]))

    def format(self, *, include_secrets: bool = False) -> str:
        """The canonical text of this URI; ``pin-value`` shows as ``***`` unless ``include_secrets``.

        The PIN is written only when asked for by name, so it reaches a log or an
        error message only through code that visibly chose to put it there.
        """
        path = self._component(_PATH_ATTRS, self.vendor_path, "path", include_secrets)
        query = self._component(_QUERY_ATTRS, self.vendor_query, "query", include_secrets)
        return _SCHEME + ";".join(path) + ("?" + "&".join(query) if query else "")

    def _component(self, attrs: tuple[tuple[str, str], ...], vendor: tuple[tuple[str, str], ...],
                   component: str, include_secrets: bool) -> list[str]:
        allowed = _ALLOWED[component]
        out: list[str] = []
        for name, field in attrs:
            value = getattr(self, field)
            if value is None:
                continue
            shown = "***" if field == "pin_value" and not include_secrets else _encode(value, allowed)
            out.append(f"{name}={shown}")
        return out + [f"{name}={_encode(value, allowed)}" for name, value in vendor]

    def redacted(self) -> str:
        """The canonical text with ``pin-value=***``: safe for logs and error messages."""
        return self.format()

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return f"Pkcs11Uri({self.format()!r})"

    def with_(self, **changes: Any) -> Pkcs11Uri:
        """A copy with some fields changed (``uri.with_(pin_value=None)``), checked like any other."""
        return replace(self, **changes)

    def token_only(self) -> Pkcs11Uri:
        """The same URI without object attributes and PIN: it names just the token."""
        return replace(self, object=None, type=None, id=None, pin_value=None, pin_source=None)

    def matches_library(self, *, manufacturer: str, description: str, version: tuple[int, int]) -> bool:
        """Whether a module whose C_GetInfo reports these CK_INFO fields matches this URI's
        ``library-manufacturer``, ``library-description`` and ``library-version`` (RFC 7512
        section 2.3). Blank padding is ignored as for token fields; ``library-version=M``
        means M.0, ``M.N`` major M and minor N (``1.5`` is minor 5, not 50)."""
        texts = ((self.library_manufacturer, manufacturer), (self.library_description, description))
        if any(wanted is not None and wanted.rstrip(" ") != actual.rstrip(" ") for wanted, actual in texts):
            return False
        if self.library_version is None:
            return True
        major, _, minor = self.library_version.partition(".")
        return (int(major), int(minor or 0)) == tuple(version)

    def matches_token(self, *, label: str, manufacturer: str, serial: str, model: str) -> bool:
        """Whether a token with these CK_TOKEN_INFO fields matches this URI (RFC 7512 section 2.4).

        An absent attribute matches anything; a present one must equal the token's
        value (an empty ``serial=`` matches only an empty serial). CK_TOKEN_INFO
        pads these fields with blanks, so trailing blanks are ignored on both sides.
        Any vendor path attribute makes the URI match nothing, as section 2.4 says
        unrecognised path attributes SHOULD: keymgr cannot honour a constraint it
        does not understand, so a misspelt ``tokn=`` selects no token, not all.
        Slot and library attributes are not token fields; the caller checks them.
        """
        if self.vendor_path:
            return False
        checks = ((self.token, label), (self.manufacturer, manufacturer), (self.serial, serial), (self.model, model))
        return all(wanted is None or wanted.rstrip(" ") == actual.rstrip(" ") for wanted, actual in checks)
