"""The per-message fast paths of the envelope format give exactly what the plain code gives.

Each fast path (docs/performance.md, "Where the time went") replaces general
code with precomputed pieces or reads by position; these tests hold each one
to the general form it replaces, on every shape and on mutated input.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keymgr.envelope import _der
from keymgr.envelope import recipients as r
from keymgr.envelope._aead import COMMITMENT_INFO, encode_gcm_parameters, hkdf_sha256, key_commitment
from keymgr.envelope._attrs import (
    _COMMITMENT_PREFIX,
    _CONTENT_TYPE_ATTR,
    _CONTEXT_TLV,
    _context_value,
    build_auth_attrs,
)
from keymgr.errors import FormatError

SHAPES = [("aes256_wrap", 40), ("aes256_wrap_pad", 16), ("aes256_wrap_pad", 48), ("aes256_gcm", 48), ("aes256_gcm", 17)]


@given(st.binary(min_size=32, max_size=32))
def test_commitment_is_hkdf_sha256(key: bytes) -> None:
    assert key_commitment(key) == hkdf_sha256(key, salt=None, info=COMMITMENT_INFO, length=32)


def _reference_kekri(kek_id: bytes, encrypted: bytes, algorithm: str, nonce: bytes | None) -> bytes:
    params = encode_gcm_parameters(nonce) if nonce is not None else b""
    return _der.tlv(0xA2, _der.integer(4) + _der.seq(_der.octets(kek_id)) + _der.seq(r._KEK_OID_TLV[algorithm], params)
                    + _der.octets(encrypted))


@pytest.mark.parametrize(("algorithm", "length"), SHAPES)
@pytest.mark.parametrize("id_length", [1, 16, 125, 126, 300])
def test_kek_recipient_der_matches_plain_encoding(algorithm: str, length: int, id_length: int) -> None:
    kek_id, encrypted = os.urandom(id_length), os.urandom(length)
    nonce = os.urandom(12) if algorithm == "aes256_gcm" else None
    assert r.kek_recipient_der(kek_id, encrypted, algorithm, nonce) == _reference_kekri(  # type: ignore[arg-type]
        kek_id, encrypted, algorithm, nonce)


class _AsObject:
    """Hands DER to read_kek_recipient as an object, which takes the general reader."""

    def __init__(self, der: bytes) -> None:
        self._der = der

    def dump(self) -> bytes:
        return self._der


def _outcome(ri: object) -> object:
    try:
        return r.read_kek_recipient(ri)  # type: ignore[arg-type]
    except FormatError:
        return FormatError


@pytest.mark.parametrize(("algorithm", "length"), SHAPES)
@pytest.mark.parametrize("id_length", [1, 16, 126, 130])
def test_kek_reader_fast_path_agrees_with_general_reader(algorithm: str, length: int, id_length: int) -> None:
    der = r.kek_recipient_der(os.urandom(id_length), os.urandom(length), algorithm,  # type: ignore[arg-type]
                              os.urandom(12) if algorithm == "aes256_gcm" else None)
    variants = [der, der[:-1] + b"", der + b"\x00"]
    for i in range(len(der)):
        for flip in (0x01, 0x80, 0xFF):
            mutated = bytearray(der)
            mutated[i] ^= flip
            variants.append(bytes(mutated))
        variants += [der[:i], der[:i] + der[i + 1:]]
    null_params = der.replace(r._KEK_OID_TLV["aes256_wrap"], r._KEK_OID_TLV["aes256_wrap"] + b"\x05\x00")
    variants.append(null_params)
    for variant in variants:
        assert _outcome(variant) == _outcome(_AsObject(variant)), variant.hex()


@settings(max_examples=200)
@given(st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=4), st.booleans())
def test_attribute_frame_matches_plain_set_of(context: dict[str, str], content_type: bool) -> None:
    commitment = os.urandom(32)
    attrs = [_COMMITMENT_PREFIX + commitment]
    if context:
        attrs.append(_der.seq(_CONTEXT_TLV, _der.set_of([_context_value(context)])))
    if content_type:
        attrs.append(_CONTENT_TYPE_ATTR)
    assert build_auth_attrs(context=context, commitment=commitment, content_type=content_type) == _der.set_of(attrs)


def _attrs_element(der: bytes) -> _der.Tlv:
    return _der.read_one(der, tag=_der.SET, what="test")


def test_attribute_cache_gives_what_a_full_parse_gives() -> None:
    """Sets that differ only in the commitment value reuse the cached parse; sets where the
    commitment prefix also appears elsewhere (inside another attribute) never do."""
    from keymgr.envelope._attrs import _parse_auth_attrs, parse_auth_attrs

    context = {"tenant": "acme", "purpose": "cache"}
    for _ in range(3):
        der = build_auth_attrs(context=context, commitment=os.urandom(32), content_type=True)
        assert parse_auth_attrs(der, _attrs_element(der)) == _parse_auth_attrs(der, _attrs_element(der))[0]
    decoy_oid = _der.encode_oid("1.2.3.4")
    for first in (True, False):
        seen = set()
        for _ in range(3):
            decoy = _der.seq(decoy_oid, _der.set_of([_der.octets(_COMMITMENT_PREFIX + os.urandom(32))]))
            real = _COMMITMENT_PREFIX + os.urandom(32)
            body = decoy + real if first else real + decoy
            der = _der.tlv(_der.SET, body)
            pair = (decoy, real) if first else (real, decoy)
            width = max(map(len, pair))
            if pair[0].ljust(width, b"\x00") > pair[1].ljust(width, b"\x00"):  # not DER order: refused
                with pytest.raises(FormatError, match="DER order"):
                    parse_auth_attrs(der, _attrs_element(der))
                continue
            parsed = parse_auth_attrs(der, _attrs_element(der))
            assert parsed == _parse_auth_attrs(der, _attrs_element(der))[0]
            assert parsed.commitment == real[-32:] and parsed.other[0][1] not in seen
            seen.add(parsed.other[0][1])


# -- message shapes (keymgr.envelope.cms._Shape) ---------------------------------------------


def _as_tuple(parsed: object) -> tuple[object, ...]:
    """Everything a parse gives, the lazily cut fields included."""
    from keymgr.envelope.cms import ParsedMessage

    assert isinstance(parsed, ParsedMessage)
    return (parsed.recipient_infos.der, parsed.content_type, parsed.nonce, parsed.icv_length, parsed.auth_attrs,
            parsed.encrypted_content, parsed.mac, parsed.aad, parsed._fields)


def _parse_both(blob: bytes) -> tuple[object, object]:
    """(parse_message, the full parse) of ``blob``: each a result tuple or the FormatError's text.
    The full parse is the strict one, then that of the DER re-encoding if ``blob`` is BER
    (an edited length byte can make valid BER of a DER message)."""
    from keymgr.envelope.cms import _parse_lenient, parse_message

    out = []
    for parse in (parse_message, _parse_lenient):
        try:
            out.append(_as_tuple(parse(blob)))
        except FormatError as exc:
            out.append(str(exc))
    return out[0], out[1]


def _message(size: int, context: dict[str, str] | None, kinds: list[tuple[str, int]], compat: bool = False) -> bytes:
    from keymgr.envelope import seal_message

    recipients = [r.kek_recipient_der(os.urandom(16), os.urandom(length), algorithm,  # type: ignore[arg-type]
                                      os.urandom(12) if algorithm == "aes256_gcm" else None)
                  for algorithm, length in kinds]
    return seal_message(os.urandom(size), dek=os.urandom(32), recipient_infos=recipients, context=context,
                        compat_openssl=compat)


@settings(max_examples=60, deadline=None)
@given(size=st.sampled_from([0, 1, 100, 1024, 200_000]),
       context=st.none() | st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=20), max_size=3),
       kinds=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3), compat=st.booleans())
def test_message_shape_gives_what_a_full_parse_gives(size: int, context: dict[str, str] | None,
                                                     kinds: list[tuple[str, int]], compat: bool) -> None:
    """A second message of the same shape (new key ids, wrapped keys, nonce, ciphertext,
    commitment and tag) is read from the first one's shape: exactly the full parse."""
    from keymgr.envelope import cms

    if compat:
        context = None
    first = _message(size, context, kinds, compat)
    cms._SHAPES.clear()
    cms.parse_message(first)
    assert len(first) in cms._SHAPES
    second = _message(size, context, kinds, compat)
    assert len(second) == len(first) and cms._SHAPES[len(first)].read(second) is not None
    fast, full = _parse_both(second)
    assert fast == full


def test_every_edit_of_a_shaped_message_parses_as_the_full_parse_does() -> None:
    """Exhaustive over a small message: with its shape remembered, every single-byte edit
    (a kept byte: the shape no longer applies; a cut one: read from the shape) gives what
    the full parse gives, the same error included."""
    from keymgr.envelope import cms

    blob = _message(40, {"tenant": "acme"}, [("aes256_gcm", 48), ("aes256_wrap", 40)])
    for i in range(len(blob)):
        for flip in (0x01, 0x80):
            cms._SHAPES.clear()
            cms.parse_message(blob)
            tampered = bytearray(blob)
            tampered[i] ^= flip
            fast, full = _parse_both(bytes(tampered))
            assert fast == full, i


def _open_outcome(blob: bytes, dek: bytes, ours: bytes, shaped_from: bytes | None,
                  context: dict[str, str] | None) -> tuple[object, ...]:
    """open_message of ``blob`` with the shape of ``shaped_from`` remembered (or none): the
    plaintext and context it returns, or the class and text of the error it raises."""
    from keymgr.envelope import cms

    cms._SHAPES.clear()
    if shaped_from is not None:
        cms.parse_message(shaped_from)
    try:
        return ("ok", *cms.open_message(blob, unwrap_der=lambda der: dek if der.startswith(ours) else None,
                                        context=context, return_context=True))
    except Exception as exc:  # noqa: BLE001 - the outcome compared is whatever happens
        return (type(exc).__name__, str(exc))


@pytest.mark.parametrize("context", [{"tenant": "acme"}, None])
def test_every_edit_of_a_shaped_message_opens_as_the_full_parse_does(context: dict[str, str] | None) -> None:
    """open_message reads a message of a remembered shape by position (MessageShape.parts):
    for the message and every single-byte edit of it, the outcome (plaintext and context,
    or the error and its text) is the one of open_message with no shape remembered."""
    from keymgr.envelope import seal_message

    dek = os.urandom(32)
    ours = r.kek_recipient_der(os.urandom(16), os.urandom(40), "aes256_wrap")
    other = r.kek_recipient_der(os.urandom(16), os.urandom(48), "aes256_gcm", os.urandom(12))
    blob = seal_message(b"a shaped secret", dek=dek, recipient_infos=[other, ours], context={"tenant": "acme"})
    shaped = seal_message(b"another secret!", dek=os.urandom(32), recipient_infos=[
        r.kek_recipient_der(os.urandom(16), os.urandom(48), "aes256_gcm", os.urandom(12)),
        r.kek_recipient_der(os.urandom(16), os.urandom(40), "aes256_wrap")], context={"tenant": "acme"})
    assert len(shaped) == len(blob)
    prefix = ours[:-40]  # our recipient up to its wrapped key: an edit there makes it another's
    assert _open_outcome(blob, dek, prefix, shaped, context) == ("ok", b"a shaped secret", {"tenant": "acme"})
    outcomes, opened = set(), set()
    for i in range(len(blob)):
        for flip in (0x01, 0x80):
            tampered = bytearray(blob)
            tampered[i] ^= flip
            fast = _open_outcome(bytes(tampered), dek, prefix, shaped, context)
            assert fast == _open_outcome(bytes(tampered), dek, prefix, None, context), i
            outcomes.add(fast[0])
            if fast[0] == "ok":
                opened.add(i)
    assert {"IntegrityError", "FormatError", "RecipientNotFoundError"} <= outcomes
    # the edits that still open: inside the other recipient (recipients are outside the AAD, so
    # that a rewrap leaves the payload alone; that key is not ours), and inside our wrapped key,
    # which this unwrapper (unlike a token) does not read
    other_at, ours_at = blob.index(other), blob.index(ours)
    ignored = set(range(other_at, other_at + len(other))) | set(range(ours_at + len(ours) - 40, ours_at + len(ours)))
    assert opened and opened <= ignored


def test_a_decoy_commitment_before_the_real_one_is_not_taken_for_it() -> None:
    """The commitment's place comes from the attribute parser, not a search: an unknown
    attribute before the real commitment, holding the commitment attribute's own bytes,
    stays an unknown attribute, and its bytes are compared (kept), not cut."""
    from keymgr.envelope import cms

    decoy_oid = _der.encode_oid("1.2.3.4")
    blobs = []
    for _ in range(3):
        fields = cms.parse_message(_message(10, {"t": "x"}, [("aes256_wrap", 40)]))._fields
        decoy = _der.seq(decoy_oid, _der.set_of([_der.octets(_COMMITMENT_PREFIX + os.urandom(32))]))
        fields["auth_attrs"] = b"\xa1" + _der.tlv(_der.SET, decoy + fields["auth_attrs"][2:])[1:]
        body = _der.seq(*(fields[name] for name, _, _ in cms._FIELDS if name in fields))
        blobs.append(_der.seq(cms._AUTH_ENVELOPED_TLV, _der.tlv(0xA0, body)))
    assert len({len(b) for b in blobs}) == 1
    for blob in blobs:
        fast, full = _parse_both(blob)
        assert fast == full
        parsed = cms.parse_message(blob)
        assert parsed.auth_attrs is not None and parsed.auth_attrs.other[0][1] in blob
        decoy_value = parsed.auth_attrs.other[0][1]
        assert parsed.commitment is not None and _COMMITMENT_PREFIX + parsed.commitment not in decoy_value


def test_recipient_set_memo_is_for_the_same_tuple_only() -> None:
    """encode_recipient_infos remembers the last tuple of DERs by identity: the same tuple gives
    the same bytes, an equal-looking new tuple or a list (mutable) is encoded afresh."""
    one = tuple(r.kek_recipient_der(os.urandom(16), os.urandom(40), "aes256_wrap") for _ in range(2))
    first = r.encode_recipient_infos(one)
    assert first == _der.set_of(list(one)) and r.encode_recipient_infos(one) is first
    other = (r.kek_recipient_der(os.urandom(16), os.urandom(40), "aes256_wrap"), one[1])
    assert r.encode_recipient_infos(other) == _der.set_of(list(other))
    as_list = list(one)
    assert r.encode_recipient_infos(as_list) == first
    as_list[0] = other[0]
    assert r.encode_recipient_infos(as_list) == _der.set_of(as_list)


# -- checked contexts (keymgr.envelope._attrs.checked_context) ------------------------------------


@settings(max_examples=80, deadline=None)
@given(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=4))
def test_checked_context_is_normalize_context_sorted_seen_or_not(context: dict[str, str]) -> None:
    """The memo gives what normalize_context and a sort give, the first time and every time
    after, and an invalid context (an empty key here) is refused every time, never remembered."""
    from keymgr.envelope._attrs import checked_context, normalize_context
    from keymgr.errors import ConfigurationError

    for _ in range(2):
        try:
            expected = normalize_context(context)
        except ConfigurationError:
            with pytest.raises(ConfigurationError):
                checked_context(context)
            continue
        assert checked_context(context) == (expected, tuple(sorted(expected.items())))


def test_checked_context_follows_a_dict_changed_after_use() -> None:
    from keymgr.envelope._attrs import checked_context
    from keymgr.errors import ConfigurationError

    context = {"tenant": "acme"}
    assert checked_context(context)[1] == (("tenant", "acme"),)
    context["tenant"] = "evil"
    assert checked_context(context)[1] == (("tenant", "evil"),)
    context["list"] = ["not", "a", "str"]  # type: ignore[assignment]
    with pytest.raises(ConfigurationError, match="str"):
        checked_context(context)
    with pytest.raises(ConfigurationError, match="str"):
        checked_context({"tenant": 7})  # type: ignore[dict-item]
