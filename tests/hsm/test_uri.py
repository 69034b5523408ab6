"""Tests for keymgr.hsm.uri: RFC 7512's examples, canonical form, refusals, and PIN redaction.

The RFC examples are transcribed from RFC 7512 section 3 (checked against the
example lists of three independent RFC 7512 test suites, which agree). They are
inline rather than under tests/vectors/ because each carries its expected
decoded fields, which are assertions, not vector data.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keymgr.errors import UriError
from keymgr.hsm.uri import OBJECT_TYPES, Pkcs11Uri

PIN = "s3cr3t-PIN-4711"

# (URI exactly as in RFC 7512 section 3, the fields it decodes to)
RFC_EXAMPLES: list[tuple[str, dict[str, Any]]] = [
    ("pkcs11:", {}),
    ("pkcs11:object=my-pubkey;type=public", {"object": "my-pubkey", "type": "public"}),
    ("pkcs11:object=my-key;type=private?pin-source=file:/etc/token",
     {"object": "my-key", "type": "private", "pin_source": "file:/etc/token"}),
    ("pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;model=1.0;"
     "object=my-certificate;type=cert;id=%69%95%3E%5C%F4%BD%EC%91;serial=?pin-source=file:/etc/token_pin",
     {"token": "The Software PKCS#11 Softtoken", "manufacturer": "Snake Oil, Inc.", "model": "1.0",
      "object": "my-certificate", "type": "cert", "id": bytes.fromhex("69953e5cf4bdec91"), "serial": "",
      "pin_source": "file:/etc/token_pin"}),
    ("pkcs11:object=my-sign-key;type=private?module-name=mypkcs11",
     {"object": "my-sign-key", "type": "private", "module_name": "mypkcs11"}),
    ("pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1",
     {"object": "my-sign-key", "type": "private", "module_path": "/mnt/libmypkcs11.so.1"}),
    ("pkcs11:token=Software%20PKCS%2311%20softtoken;manufacturer=Snake%20Oil,%20Inc.?pin-value=the-pin",
     {"token": "Software PKCS#11 softtoken", "manufacturer": "Snake Oil, Inc.", "pin_value": "the-pin"}),
    ("pkcs11:slot-description=Sun%20Metaslot", {"slot_description": "Sun Metaslot"}),
    ("pkcs11:library-manufacturer=Snake%20Oil,%20Inc.;library-description=Soft%20Token%20Library;"
     "library-version=1.23",
     {"library_manufacturer": "Snake Oil, Inc.", "library_description": "Soft Token Library",
      "library_version": "1.23"}),
    ("pkcs11:token=My%20token%25%20created%20by%20Joe;library-version=3;id=%01%02%03%Ba%dd%Ca%fe%04%05%06",
     {"token": "My token% created by Joe", "library_version": "3", "id": bytes.fromhex("010203baddcafe040506")}),
    ("pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;object=my-certificate;type=cert",
     {"token": "A name with a substring %;", "object": "my-certificate", "type": "cert"}),
    ("pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1;object=my-certificate;type=cert",
     {"token": "Name with a small A with acute: \u00e1", "object": "my-certificate", "type": "cert"}),
    ("pkcs11:token=my-token;object=my-certificate;type=cert;vendor-aaa=value-a"
     "?pin-source=file:/etc/token_pin&vendor-bbb=value-b",
     {"token": "my-token", "object": "my-certificate", "type": "cert", "vendor_path": (("vendor-aaa", "value-a"),),
      "pin_source": "file:/etc/token_pin", "vendor_query": (("vendor-bbb", "value-b"),)}),
]

# Valid URIs in the style of section 3 that are not in the published RFC (variants seen elsewhere).
OTHER_VALID: list[tuple[str, dict[str, Any]]] = [
    ("pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;model=1.0;"
     "object=my-certificate;type=cert;id=%69%95%3E%5C%F4%BE%2D%C8%C5%30%26%00%EC%3C%E1%02%85%E6%B8%FE%21"
     "?pin-value=the-pin",
     {"token": "The Software PKCS#11 Softtoken", "manufacturer": "Snake Oil, Inc.", "model": "1.0",
      "object": "my-certificate", "type": "cert",
      "id": bytes.fromhex("69953e5cf4be2dc8c5302600ec3ce10285e6b8fe21"), "pin_value": "the-pin"}),
    ("pkcs11:token=Software%20PKCS%2311%20softtoken;manufacturer=Snake%20Oil,%20Inc.?pin-source=file:/etc/token",
     {"token": "Software PKCS#11 softtoken", "manufacturer": "Snake Oil, Inc.", "pin_source": "file:/etc/token"}),
    ("pkcs11:slot-manufacturer=Snake%20Oil,%20Inc.;slot-description=Sun%20Metaslot;slot-id=1",
     {"slot_manufacturer": "Snake Oil, Inc.", "slot_description": "Sun Metaslot", "slot_id": 1}),
    ("pkcs11:token=my-token;object=my-certificate;type=cert;vendor-aaa=value-a"
     "?pin-source=file:/etc/token&vendor-bbb=value-b",
     {"token": "my-token", "object": "my-certificate", "type": "cert", "vendor_path": (("vendor-aaa", "value-a"),),
      "pin_source": "file:/etc/token", "vendor_query": (("vendor-bbb", "value-b"),)}),
]

ALL_VALID = RFC_EXAMPLES + OTHER_VALID
NOT_CANONICAL = {RFC_EXAMPLES[3][0], RFC_EXAMPLES[9][0], OTHER_VALID[0][0]}  # attribute order, hex case, id


def _ids(cases: list[tuple[str, Any]]) -> list[str]:
    return [text[:60] for text, _ in cases]


@pytest.mark.parametrize(("text", "fields"), ALL_VALID, ids=_ids(ALL_VALID))
def test_examples_decode_to_their_fields(text: str, fields: dict[str, Any]) -> None:
    assert Pkcs11Uri.parse(text) == Pkcs11Uri(**fields)


@pytest.mark.parametrize(("text", "fields"), ALL_VALID, ids=_ids(ALL_VALID))
def test_examples_round_trip(text: str, fields: dict[str, Any]) -> None:
    uri = Pkcs11Uri.parse(text)
    canonical = uri.format(include_secrets=True)
    assert Pkcs11Uri.parse(canonical) == uri
    assert Pkcs11Uri.parse(canonical).format(include_secrets=True) == canonical
    if text not in NOT_CANONICAL:
        assert canonical == text


@pytest.mark.parametrize(("text", "canonical"), [
    (RFC_EXAMPLES[3][0],
     "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;serial=;model=1.0;"
     "object=my-certificate;type=cert;id=%69%95%3E%5C%F4%BD%EC%91?pin-source=file:/etc/token_pin"),
    (RFC_EXAMPLES[9][0],
     "pkcs11:token=My%20token%25%20created%20by%20Joe;library-version=3;id=%01%02%03%BA%DD%CA%FE%04%05%06"),
    ("PKCS11:token=%41bc%3a?module-name=%6d", "pkcs11:token=Abc:?module-name=m"),
    ("pkcs11:token=%c3%a1", "pkcs11:token=%C3%A1"),
    ("pkcs11:slot-id=007", "pkcs11:slot-id=7"),
    ("pkcs11:?", "pkcs11:"),
    ("pkcs11:x-b=2;x-a=1?x-q=1&x-q=2&pin-source=env:P",
     "pkcs11:x-b=2;x-a=1?pin-source=env:P&x-q=1&x-q=2"),
])
def test_canonical_form(text: str, canonical: str) -> None:
    assert Pkcs11Uri.parse(text).format(include_secrets=True) == canonical


@pytest.mark.parametrize("scheme", ["pkcs11:", "PKCS11:", "Pkcs11:", "pKcS11:"])
def test_scheme_is_case_insensitive(scheme: str) -> None:
    assert Pkcs11Uri.parse(scheme + "token=a") == Pkcs11Uri(token="a")


@pytest.mark.parametrize(("uri", "text"), [
    (Pkcs11Uri(token="a;b?c/d%e#f&g=h i"), "pkcs11:token=a%3Bb%3Fc%2Fd%25e%23f&g=h%20i"),
    (Pkcs11Uri(token=":[]@!$'()*+,=&-._~"), "pkcs11:token=:[]@!$'()*+,=&-._~"),
    (Pkcs11Uri(module_path="/a b/c&d?e|f;g"), "pkcs11:?module-path=/a%20b/c%26d?e|f%3Bg"),
    (Pkcs11Uri(pin_source=":[]@!$'()*+,=/?|-._~"), "pkcs11:?pin-source=:[]@!$'()*+,=/?|-._~"),
    (Pkcs11Uri(object="caf\u00e9 \u20ac\n\x00"), "pkcs11:object=caf%C3%A9%20%E2%82%AC%0A%00"),
    (Pkcs11Uri(id=b"abc\x00\xff"), "pkcs11:id=%61%62%63%00%FF"),
    (Pkcs11Uri(id=b""), "pkcs11:id="),
    (Pkcs11Uri(serial=""), "pkcs11:serial="),
    (Pkcs11Uri(vendor_path=(("x-p", "a&b;c"),), vendor_query=(("x-q", "a&b;c"),)),
     "pkcs11:x-p=a&b%3Bc?x-q=a%26b%3Bc"),
    (Pkcs11Uri(pin_value="p@ss w&rd;%"), "pkcs11:?pin-value=p@ss%20w%26rd%3B%25"),
])
def test_percent_encoding(uri: Pkcs11Uri, text: str) -> None:
    assert uri.format(include_secrets=True) == text
    assert Pkcs11Uri.parse(text) == uri


@pytest.mark.parametrize(("text", "match"), [
    ("", "start with 'pkcs11:'"),
    ("pkcs11", "start with 'pkcs11:'"),
    ("pkcs:token=a", "start with 'pkcs11:'"),
    ("https://example.com/", "start with 'pkcs11:'"),
    (" pkcs11:token=a", "start with 'pkcs11:'"),
    ("P\u212aCS11:token=a", "start with 'pkcs11:'"),  # KELVIN SIGN lowercases to "k"
    ("pkcs11:token=%G1", "percent-escape at offset 13 in the value of token"),
    ("pkcs11:token=%4", "percent-escape at offset 13"),
    ("pkcs11:token=ab%", "percent-escape at offset 15"),
    ("pkcs11:token=%4;object=a", "percent-escape at offset 13"),
    ("pkcs11:?module-path=%zz", "percent-escape at offset 20 in the value of module-path"),
    ("pkcs11:token=a;token=b", "'token' appears twice in the path, again at offset 15"),
    ("pkcs11:x-a=1;x-a=2", "'x-a' appears twice"),
    ("pkcs11:?pin-source=a&pin-source=b", "'pin-source' appears twice in the query"),
    ("pkcs11:slot-id=abc", "slot-id must be a decimal integer"),
    ("pkcs11:slot-id=-1", "slot-id"),
    ("pkcs11:slot-id=1.5", "slot-id"),
    ("pkcs11:slot-id=", "slot-id"),
    ("pkcs11:slot-id=%C2%B2", "slot-id"),  # SUPERSCRIPT TWO: str.isdigit() says yes
    ("pkcs11:slot-id=18446744073709551616", "slot-id must be a decimal integer from 0 to 2\\*\\*64-1"),
    ("pkcs11:slot-id=" + "9" * 5000, "slot-id"),  # beyond int()'s digit limit
    ("pkcs11:type=key", "type must be one of"),
    ("pkcs11:type=Private", "type must be one of"),
    ("pkcs11:type=", "type must be one of"),
    ("pkcs11:library-version=1.", "library-version"),
    ("pkcs11:library-version=a.b", "library-version"),
    ("pkcs11:library-version=1.2.3", "library-version"),
    ("pkcs11:library-version=", "library-version"),
    ("pkcs11:library-version=1.2%0A", "library-version"),
    ("pkcs11:library-version=256", "does not fit a CK_VERSION"),  # CK_VERSION's fields are bytes
    ("pkcs11:library-version=2.256", "does not fit a CK_VERSION"),
    ("pkcs11:=value", "empty attribute name at offset 7"),
    ("pkcs11:?=value", "empty attribute name at offset 8"),
    ("pkcs11:token", "has no '='"),
    ("pkcs11:token=a;", "empty path attribute at offset 15"),
    ("pkcs11:;token=a", "empty path attribute at offset 7"),
    ("pkcs11:token=a;;object=b", "empty path attribute"),
    ("pkcs11:?&pin-source=a", "empty query attribute at offset 8"),
    ("pkcs11:?pin-source=file:/x&pin-value=1234", "pin-source and pin-value"),
    ("pkcs11:pin-value=1234", "'pin-value' is a query attribute"),
    ("pkcs11:module-path=/lib.so", "'module-path' is a query attribute"),
    ("pkcs11:?token=a", "'token' is a path attribute"),
    ("pkcs11:Token=a", "only in case"),
    ("pkcs11:?PIN-VALUE=1234", "only in case"),
    ("pkcs11:tok%65n=a", "attribute name at offset 7"),
    ("pkcs11:tok en=a", "attribute name at offset 7"),
    ("pkcs11:token=a b", "' ' at offset 14 is not allowed"),
    ("pkcs11:token=a#frag", "'#' at offset 14"),
    ("pkcs11:token=\u00e9", "offset 13"),
    ("pkcs11:token=a/b", "'/' at offset 14"),
    ("pkcs11:?module-path=/a;b", "offset 22"),
    ("pkcs11:token=%FF", "not UTF-8"),
    ("pkcs11:x-v=%C3", "not UTF-8"),
])
def test_malformed_input_is_a_one_line_uri_error(text: str, match: str) -> None:
    with pytest.raises(UriError, match=match) as info:
        Pkcs11Uri.parse(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [b"pkcs11:", None, 7])
def test_non_text_is_a_uri_error(value: Any) -> None:
    with pytest.raises(UriError, match="must be str"):
        Pkcs11Uri.parse(value)


@pytest.mark.parametrize("text", [
    f"pkcs11:?pin-value={PIN}&pin-source=file:/x",
    f"pkcs11:?pin-source=file:/x&pin-value={PIN}",
    f"pkcs11:?pin-value={PIN}%20x%G1",
    f"pkcs11:?pin-value={PIN}%",
    f"pkcs11:?pin-value={PIN} x",
    f"pkcs11:?pin-value=x {PIN}",
    f"pkcs11:?pin-value={PIN};x",
    f"pkcs11:?pin-value={PIN}#x",
    f"pkcs11:?pin-value=%FF{PIN}",
    f"pkcs11:?pin-value={PIN}&pin-value={PIN}",
    f"pkcs11:?pin-value={PIN}&{PIN}",
    f"pkcs11:?{PIN}",
    f"pkcs11:pin-value={PIN}",
    f"pkcs11:?PIN-VALUE={PIN}",
    f"pkcs11:token=a b?pin-value={PIN}",
    f"pkcs11:type=bad?pin-value={PIN}",
    f"pkcs:?pin-value={PIN}",
])
def test_errors_never_echo_the_pin(text: str) -> None:
    with pytest.raises(UriError) as info:
        Pkcs11Uri.parse(text)
    for shown in (str(info.value), repr(info.value)):
        assert PIN not in shown and "s3cr3t" not in shown


def test_str_and_repr_never_show_the_pin() -> None:
    uri = Pkcs11Uri.parse(f"pkcs11:token=t?module-path=/lib.so&pin-value={PIN}")
    for shown in (str(uri), repr(uri), uri.redacted(), uri.format(), f"{uri}", format(uri), str([uri])):
        assert PIN not in shown
        assert "pin-value=***" in shown
    assert uri.pin_value == PIN
    assert f"pin-value={PIN}" in uri.format(include_secrets=True)
    assert repr(uri) == "Pkcs11Uri('pkcs11:token=t?module-path=/lib.so&pin-value=***')"


def test_construction_error_never_shows_the_pin() -> None:
    with pytest.raises(UriError) as info:
        Pkcs11Uri(pin_source="file:/x", pin_value=PIN)
    assert PIN not in str(info.value)


@pytest.mark.parametrize(("fields", "match"), [
    ({"slot_id": -1}, "slot-id"),
    ({"slot_id": 2**64}, "slot-id"),
    ({"slot_id": True}, "slot-id"),
    ({"slot_id": "1"}, "slot-id"),
    ({"type": "key"}, "type must be one of"),
    ({"id": "abc"}, "id must be bytes"),
    ({"token": b"abc"}, "token must be text"),
    ({"token": "\ud800"}, "UTF-8"),
    ({"library_version": "1.2\n"}, "library-version"),
    ({"library_version": "\u0661"}, "library-version"),  # ARABIC-INDIC DIGIT ONE matches \d
    ({"library_version": "300"}, "CK_VERSION"),
    ({"vendor_path": (("token", "x"),)}, "standard attribute"),
    ({"vendor_path": (("pin-value", "x"),)}, "query attribute"),
    ({"vendor_query": (("Pin-Value", "x"),)}, "only in case"),
    ({"vendor_path": (("bad name", "x"),)}, "letters, digits"),
    ({"vendor_path": (("x-a", "1"), ("x-a", "2"))}, "appears twice"),
    ({"vendor_path": (("x-a", 1),)}, "must be text"),
    ({"vendor_path": [("x-a", "1")]}, "tuple"),
    ({"vendor_query": (("x-a",),)}, "tuple"),
])
def test_construction_checks_the_same_rules(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(UriError, match=match):
        Pkcs11Uri(**fields)


def test_vendor_query_attributes_may_repeat() -> None:
    uri = Pkcs11Uri.parse("pkcs11:?x-a=1&x-a=2")
    assert uri.vendor_query == (("x-a", "1"), ("x-a", "2"))
    assert str(uri) == "pkcs11:?x-a=1&x-a=2"


def test_with_checks_and_token_only_drops_object_and_pin() -> None:
    uri = Pkcs11Uri.parse(f"pkcs11:token=t;object=k;type=secret-key;id=%01?module-name=softhsm2&pin-value={PIN}")
    assert uri.with_(pin_value=None).pin_value is None
    with pytest.raises(UriError):
        uri.with_(pin_source="file:/x")
    assert uri.token_only() == Pkcs11Uri(token="t", module_name="softhsm2")


@pytest.mark.parametrize(("text", "token", "expected"), [
    ("pkcs11:", ("any", "maker", "123", "m"), True),
    ("pkcs11:token=keymgr-A", ("keymgr-A" + " " * 24, "SoftHSM project", "9a1b", "SoftHSM v2"), True),
    ("pkcs11:token=keymgr-A;manufacturer=Other", ("keymgr-A", "SoftHSM project", "9a1b", "SoftHSM v2"), False),
    ("pkcs11:serial=", ("t", "m", "", "x"), True),
    ("pkcs11:serial=", ("t", "m", "1", "x"), False),
    ("pkcs11:token=t;model=x;object=k;type=private", ("t", "m", "1", "x"), True),
    ("pkcs11:token=t;tokn=t", ("t", "m", "1", "x"), False),  # RFC 7512 2.4: unknown path attribute
])
def test_matches_token(text: str, token: tuple[str, str, str, str], expected: bool) -> None:
    label, manufacturer, serial, model = token
    uri = Pkcs11Uri.parse(text)
    assert uri.matches_token(label=label, manufacturer=manufacturer, serial=serial, model=model) is expected


@pytest.mark.parametrize(("text", "expected"), [
    ("pkcs11:token=t", True),
    ("pkcs11:library-manufacturer=SoftHSM", True),
    ("pkcs11:library-manufacturer=Nobody", False),
    ("pkcs11:library-description=Implementation%20of%20PKCS11", True),
    ("pkcs11:library-description=Other", False),
    ("pkcs11:library-version=2.6", True),
    ("pkcs11:library-version=2.60", False),  # minor 60, not 6: CK_VERSION's fields are numbers, not decimals
    ("pkcs11:library-version=2", False),  # 2.0
    ("pkcs11:library-version=02.06;library-manufacturer=SoftHSM", True),
])
def test_matches_library(text: str, expected: bool) -> None:
    """RFC 7512 section 2.3: the library-* attributes compare with C_GetInfo's CK_INFO (SoftHSM 2.6.1's here)."""
    uri = Pkcs11Uri.parse(text)
    assert uri.matches_library(manufacturer="SoftHSM" + " " * 25, description="Implementation of PKCS11",
                               version=(2, 6)) is expected


def test_hashable_and_frozen() -> None:
    uri = Pkcs11Uri.parse(RFC_EXAMPLES[3][0])
    assert {uri: 1}[Pkcs11Uri.parse(uri.format())] == 1
    with pytest.raises(AttributeError):
        uri.token = "other"  # type: ignore[misc]


# -- properties ---------------------------------------------------------------

_STANDARD_NAMES = {
    "token", "manufacturer", "serial", "model", "library-manufacturer", "library-description", "library-version",
    "slot-manufacturer", "slot-description", "slot-id", "object", "type", "id",
    "module-name", "module-path", "pin-source", "pin-value",
}
_vendor_names = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True).filter(
    lambda name: name.lower() not in _STANDARD_NAMES)
_texts = st.none() | st.text(max_size=20)


@st.composite
def uris(draw: st.DrawFn) -> Pkcs11Uri:
    """Any valid Pkcs11Uri: random values in every field, vendor attributes included."""
    text_fields = ["token", "manufacturer", "serial", "model", "library_manufacturer", "library_description",
                   "slot_manufacturer", "slot_description", "object", "module_name", "module_path"]
    fields: dict[str, Any] = {name: draw(_texts) for name in text_fields}
    fields["library_version"] = draw(st.none() | st.from_regex(r"[0-9]{1,4}(\.[0-9]{1,4})?", fullmatch=True)
                                     .filter(lambda v: all(int(part) <= 255 for part in v.split("."))))
    fields["slot_id"] = draw(st.none() | st.integers(0, 2**64 - 1))
    fields["type"] = draw(st.none() | st.sampled_from(OBJECT_TYPES))
    fields["id"] = draw(st.none() | st.binary(max_size=20))
    pin = draw(st.sampled_from(["pin_source", "pin_value", None]))
    if pin:
        fields[pin] = draw(st.text(max_size=20))
    fields["vendor_path"] = tuple(draw(st.lists(st.tuples(_vendor_names, st.text(max_size=10)), max_size=3,
                                                unique_by=lambda pair: pair[0])))
    fields["vendor_query"] = tuple(draw(st.lists(st.tuples(_vendor_names, st.text(max_size=10)), max_size=3)))
    return Pkcs11Uri(**fields)


@pytest.mark.slow
@given(uris())
@settings(max_examples=300)
def test_format_then_parse_round_trips(uri: Pkcs11Uri) -> None:
    text = uri.format(include_secrets=True)
    assert Pkcs11Uri.parse(text) == uri
    redacted = Pkcs11Uri.parse(str(uri))
    assert redacted == (uri if uri.pin_value is None else uri.with_(pin_value="***"))


_FRAGMENTS = ["pkcs11:", "PKCS11:", "token", "slot-id", "id", "type", "library-version", "pin-value", "pin-source",
              "module-path", "x-v", "Token", "=", "=", ";", ";", "&", "&", "?", "%", "%4", "%41", "%FF", "%C3%A1",
              "%c3", "1", "1.2", "99999999999999999999999", "private", "a", " ", "\u00e9", "#", ":", "/", "|", "*"]


@given(st.text() | st.lists(st.sampled_from(_FRAGMENTS), max_size=12).map("".join)
       | st.lists(st.sampled_from(_FRAGMENTS), max_size=12).map(lambda parts: "pkcs11:" + "".join(parts)))
@settings(max_examples=500)
def test_parse_raises_only_uri_error_and_what_parses_round_trips(text: str) -> None:
    try:
        uri = Pkcs11Uri.parse(text)
    except UriError as error:
        assert "\n" not in str(error)
        return
    assert Pkcs11Uri.parse(uri.format(include_secrets=True)) == uri
