"""CMS messages: ``ContentInfo`` / ``AuthEnvelopedData`` (RFC 5083) with AES-256-GCM (RFC 5084).

The byte layout we write (DER throughout)::

    ContentInfo SEQUENCE {
      contentType  id-ct-authEnvelopedData (1.2.840.113549.1.9.16.1.23)
      content [0] EXPLICIT AuthEnvelopedData SEQUENCE {
        version 0                                       RFC 5083 section 2.1
        recipientInfos SET OF RecipientInfo             1..64, see recipients.py
        authEncryptedContentInfo SEQUENCE {
          contentType id-data
          contentEncryptionAlgorithm { id-aes256-GCM, GCMParameters { nonce (12), ICVlen 16 } }
          encryptedContent [0] IMPLICIT OCTET STRING }
        authAttrs [1] IMPLICIT SET OF Attribute          absent in compat_openssl mode
          -- key commitment, encryption context (if any), content-type id-data
        mac OCTET STRING (16) } }

The data key (DEK) is the content-encryption key itself, so that OpenSSL
(which knows nothing of our attributes) decrypts compat messages with the
DEK it unwraps. The AAD is the DER of authAttrs under the SET OF tag (RFC
5083 section 2.2); recipients are outside it, so :func:`replace_recipients`
can rewrap a message without touching its payload.

Errors: malformed bytes are :class:`~keymgr.errors.FormatError`; a wrong
context, a failed commitment or tag are one :class:`~keymgr.errors.IntegrityError`
with one message (no oracle); no matching recipient is
:class:`~keymgr.errors.RecipientNotFoundError` (a ``KeyNotFoundError`` and an
``IntegrityError``: an edited key id looks like a message for another token).
``KeyManager`` turns malformed ciphertexts into the integrity error too. A message that asks for an
algorithm keymgr does not read (another content cipher, another content type) is
:class:`~keymgr.errors.UnsupportedAlgorithmError`, naming it: those fields are public.

BER in, DER out: keymgr writes DER only. A message that is not DER (Bouncy Castle's default,
``openssl cms -stream``) is re-encoded as DER (:mod:`keymgr.envelope._ber`) and that is what is
read, so the AAD is the DER of authAttrs as RFC 5083 section 2.2 requires, and a rewrap writes DER.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, overload

from asn1crypto import cms

from keymgr.envelope import _der
from keymgr.envelope._aead import (
    KEY_SIZE,
    NONCE_SIZE,
    TAG_SIZE,
    DataKey,
    encode_gcm_parameters,
    read_gcm_parameters,
)
from keymgr.envelope._attrs import (
    OID_DATA,
    build_auth_attrs,
    checked_context,
    normalize_context,
    parse_auth_attrs,
)
from keymgr.envelope._ber import ber_to_der
from keymgr.envelope._names import describe
from keymgr.envelope._nonces import random_nonce
from keymgr.envelope._parsed import SHAPES as _SHAPES
from keymgr.envelope._parsed import SHAPES_MAX, MessageShape, ParsedMessage
from keymgr.envelope.recipients import ParsedRecipients, RecipientLike, encode_recipient_infos, parse_recipient_infos
from keymgr.errors import (
    ConfigurationError,
    FormatError,
    IntegrityError,
    MechanismUnsupportedError,
    RecipientNotFoundError,
    UnsupportedAlgorithmError,
)

__all__ = ["ParsedMessage", "Unwrap", "UnwrapDer", "open_message", "parse_message", "replace_recipients",
           "seal_message"]

OID_AUTH_ENVELOPED_DATA = "1.2.840.113549.1.9.16.1.23"
OID_AES256_GCM = "2.16.840.1.101.3.4.1.46"

#: Returns the data key for a recipient it can unwrap, else None.
Unwrap = Callable[[cms.RecipientInfo], DataKey | bytes | bytearray | None]
#: The same, given the recipient's DER (no asn1crypto object is made): the per-message path.
UnwrapDer = Callable[[bytes], DataKey | bytes | bytearray | None]

MESSAGE_FAILED = "the message failed authentication: tampered, truncated, wrong key or wrong context"
_MAX_PLAINTEXT = 2**36 - 32  # NIST SP 800-38D section 5.2.1.1: 2^39 - 256 bits per invocation
_AUTH_ENVELOPED_TLV = _der.encode_oid(OID_AUTH_ENVELOPED_DATA)
_DATA_TLV = _der.encode_oid(OID_DATA)
_GCM_TLV = _der.encode_oid(OID_AES256_GCM)
_VERSION_0 = _der.integer(0)
_MAC_HEADER = _der.header(_der.OCTET_STRING, TAG_SIZE)
# DER has one encoding of "id-data under id-aes256-GCM, 12-byte nonce, ICV 16": everything but the
# nonce is constant, so the reader compares bytes instead of walking six elements.
_ALGORITHM = _der.seq(_GCM_TLV, encode_gcm_parameters(bytes(NONCE_SIZE)))
_ECI_HEAD = _DATA_TLV + _ALGORITHM[:-NONCE_SIZE - 3]
_ECI_TAIL = _ALGORITHM[-3:]  # INTEGER 16, after the nonce


def seal_message(plaintext: bytes, *, dek: DataKey | bytes | bytearray, recipient_infos: Sequence[RecipientLike],
                 context: Mapping[str, str] | None, compat_openssl: bool = False) -> bytes:
    """Encrypt ``plaintext`` under ``dek`` into a DER ``ContentInfo``.

    Every message carries the key-commitment attribute and, when given, the
    context; ``compat_openssl=True`` writes no attributes at all (OpenSSL 3.0
    cannot parse them, STACK-FACTS 15), so it takes no context and has no
    commitment: weaker, documented in docs/format.md. The nonce is random, and
    no caller can choose it; with random 96-bit nonces one data key
    may seal at most 2^32 messages (NIST SP 800-38D section 8.3).
    """
    ctx, items = checked_context(context)
    if compat_openssl and ctx:
        raise ConfigurationError("compat_openssl messages carry no attributes, so no encryption context")
    if len(plaintext) > _MAX_PLAINTEXT:
        raise ConfigurationError("a message holds at most 64 GiB; use the stream format")
    nonce = random_nonce()
    recipients = encode_recipient_infos(recipient_infos)
    key = DataKey.coerce(dek)
    try:
        aad = b"" if compat_openssl else build_auth_attrs(context=ctx, commitment=key.commitment, content_type=True,
                                                            sorted_items=items)
        sealed = memoryview(key.seal(nonce, plaintext, aad))
    finally:
        if key is not dek:
            key.wipe()
    ciphertext = sealed[:-TAG_SIZE]
    auth_attrs = b"\xa1" + aad[1:] if aad else b""
    head, eci_header, content_header = _framing(len(recipients), len(ciphertext), len(auth_attrs))
    return b"".join((head, recipients, eci_header, _ECI_HEAD, nonce, _ECI_TAIL, content_header, ciphertext,
                     auth_attrs, _MAC_HEADER, sealed[-TAG_SIZE:]))


@functools.lru_cache(maxsize=256)
def _framing(recipients: int, ciphertext: int, auth_attrs: int) -> tuple[bytes, bytes, bytes]:
    """The DER headers of a message whose recipient set, ciphertext and attribute set have
    these lengths: (everything before the recipients, the EncryptedContentInfo header, the
    content header). A service's messages come in a few sizes, so each is computed once."""
    content_header = _der.header(0x80, ciphertext)
    eci_length = len(_ECI_HEAD) + NONCE_SIZE + len(_ECI_TAIL) + len(content_header) + ciphertext
    eci_header = _der.header(_der.SEQUENCE, eci_length)
    aed_length = (len(_VERSION_0) + recipients + len(eci_header) + eci_length + auth_attrs
                  + len(_MAC_HEADER) + TAG_SIZE)
    aed_header = _der.header(_der.SEQUENCE, aed_length)
    wrapper_header = _der.header(0xA0, len(aed_header) + aed_length)
    total = len(_AUTH_ENVELOPED_TLV) + len(wrapper_header) + len(aed_header) + aed_length
    head = b"".join((_der.header(_der.SEQUENCE, total), _AUTH_ENVELOPED_TLV, wrapper_header, aed_header, _VERSION_0))
    return head, eci_header, content_header


_FIELDS = (("version", _der.INTEGER, True), ("originator_info", 0xA0, False), ("recipient_infos", _der.SET, True),
           ("content", _der.SEQUENCE, True), ("auth_attrs", 0xA1, False), ("mac", _der.OCTET_STRING, True),
           ("unauth_attrs", 0xA2, False))


def _split(data: bytes) -> dict[str, _der.Tlv]:
    """Name each AuthEnvelopedData field (RFC 5083 section 2.1, in order, optional ones by their tag)."""
    outer = _der.read_one(data, tag=_der.SEQUENCE, what="ContentInfo")
    if not data.startswith(_AUTH_ENVELOPED_TLV, outer.body):
        content_type = _der.read_at(data, outer.body, outer.end)
        if content_type.tag == _der.OID:
            raise UnsupportedAlgorithmError(
                f"the message is {describe(_der.decode_oid(data[content_type.body:content_type.end]))}; keymgr "
                "reads CMS AuthEnvelopedData (RFC 5083) with AES-256-GCM (openssl cms -encrypt -aes-256-gcm)")
        raise FormatError("not a CMS AuthEnvelopedData (RFC 5083) ContentInfo")
    wrapper = _der.read_one(data, outer.body + len(_AUTH_ENVELOPED_TLV), outer.end, tag=0xA0, what="ContentInfo")
    inner = _der.read_one(data, wrapper.body, wrapper.end, tag=_der.SEQUENCE, what="AuthEnvelopedData")
    fields: dict[str, _der.Tlv] = {}
    pos, end = inner.body, inner.end
    for name, tag, required in _FIELDS:
        if pos < end and data[pos] == tag:
            fields[name] = element = _der.read_at(data, pos, end)
            pos = element.end
        elif required:
            raise FormatError(f"AuthEnvelopedData: {name} missing or out of place")
    if pos != end:
        raise FormatError("AuthEnvelopedData: unexpected fields")
    return fields


def _content(data: bytes, eci: _der.Tlv) -> tuple[bytes, bytes]:
    """(nonce, ciphertext) of the EncryptedContentInfo keymgr reads; FormatError naming what differs."""
    at = eci.body + len(_ECI_HEAD) + NONCE_SIZE
    if data.startswith(_ECI_HEAD, eci.body) and data.startswith(_ECI_TAIL, at):
        content = _der.read_at(data, at + len(_ECI_TAIL), eci.end)
        if content.tag == 0x80 and content.end == eci.end:
            return data[at - NONCE_SIZE:at], data[content.body:content.end]
    what = "EncryptedContentInfo"
    parts = _der.children(data, eci, limit=3, what=what)
    if len(parts) < 2 or data[parts[0].start:parts[0].end] != _DATA_TLV:
        raise FormatError(f"{what}: only id-data content is supported")
    algorithm = _der.children(data, parts[1], limit=2, what=what) if parts[1].tag == _der.SEQUENCE else []
    if not algorithm or algorithm[0].tag != _der.OID:
        raise FormatError(f"{what}: malformed content-encryption algorithm")
    if data[algorithm[0].start:algorithm[0].end] != _GCM_TLV:
        raise UnsupportedAlgorithmError(
            f"the content is encrypted with {describe(_der.decode_oid(data[algorithm[0].body:algorithm[0].end]))}; "
            "keymgr reads only AES-256-GCM (id-aes256-GCM, RFC 5084)")
    if len(algorithm) != 2:
        raise FormatError(f"{what}: GCMParameters missing")
    read_gcm_parameters(data[algorithm[1].start:algorithm[1].end], what=what)
    if len(parts) != 3 or parts[2].tag != 0x80:
        raise FormatError(f"{what}: detached or constructed (BER) content is not supported")
    raise FormatError(f"{what}: not DER")


def parse_message(blob: bytes) -> ParsedMessage:
    """Read a message's structure; :class:`FormatError` unless it is one DER AuthEnvelopedData
    that keymgr can decrypt (AES-256-GCM, 12-byte nonce, 16-byte tag, id-data content).

    A message of a shape seen before is read from the shape (:class:`MessageShape`): a
    service decrypts messages that differ only in the contents of a few OCTET
    STRINGs, and the full parse costs as much as the rest of a cached decrypt."""
    data = bytes(blob)
    shape = _SHAPES.get(len(data))
    if shape is not None:
        parsed = shape.read(data)
        if parsed is not None:
            return parsed
    return _parse_lenient(data)


def _parse_lenient(data: bytes) -> ParsedMessage:
    """The strict (DER) parse; failing that, the parse of the message's DER re-encoding, if it is
    BER (another writer's). An unsupported algorithm is final: re-encoding would not change it."""
    try:
        return _parse_new_shape(data)
    except UnsupportedAlgorithmError:
        raise
    except FormatError as strict:
        try:
            der = ber_to_der(data)
        except FormatError:
            raise strict from None
        if der == data:
            raise
        return _parse_new_shape(der)


def _parse_new_shape(data: bytes) -> ParsedMessage:
    """The full parse of a message no remembered shape fits; its shape is remembered."""
    parsed, nonce_at = _parse_full(data)
    if len(_SHAPES) >= SHAPES_MAX:
        _SHAPES.clear()
    _SHAPES[len(data)] = MessageShape.of(parsed, nonce_at=nonce_at)
    return parsed


def _parse_full(data: bytes) -> tuple[ParsedMessage, int]:
    """The full parse, and where the content nonce starts (for the message's shape)."""
    f = _split(data)
    if data[f["version"].start:f["version"].end] != _VERSION_0:
        raise FormatError("AuthEnvelopedData: version must be 0 (RFC 5083 section 2.1)")
    recipients = parse_recipient_infos(data, f["recipient_infos"])
    nonce, ciphertext = _content(data, f["content"])
    attrs = None
    if "auth_attrs" in f:
        attrs = parse_auth_attrs(data, f["auth_attrs"])
        if attrs.content_type not in (None, OID_DATA):
            raise FormatError("content-type attribute does not match the content (RFC 5652 section 11.1)")
    if f["mac"].end - f["mac"].body != TAG_SIZE:
        raise FormatError(f"AuthEnvelopedData: mac must be a {TAG_SIZE}-byte OCTET STRING")
    for name in ("originator_info", "unauth_attrs"):
        if name in f:
            _der.check_der(data, f[name], what=name)
    return ParsedMessage(
        recipient_infos=recipients, content_type=OID_DATA, nonce=nonce, icv_length=TAG_SIZE, auth_attrs=attrs,
        encrypted_content=ciphertext, mac=data[f["mac"].body:f["mac"].end],
        _layout=(data, f)), f["content"].body + len(_ECI_HEAD)


def replace_recipients(blob: bytes, new_recipient_infos: Sequence[RecipientLike]) -> bytes:
    """The same message with other recipients (rewrap). Every other field, the payload,
    authAttrs and mac included, is copied byte for byte; the AAD does not cover recipients."""
    parsed = parse_message(blob)
    fields = parsed._fields  # noqa: SLF001 - our own dataclass
    fields["recipient_infos"] = encode_recipient_infos(new_recipient_infos)
    body = _der.seq(*(fields[name] for name, _, _ in _FIELDS if name in fields))
    return _der.seq(_AUTH_ENVELOPED_TLV, _der.tlv(0xA0, body))


def check_context(found: dict[str, str] | None, commitment: bytes | None, *, context: Mapping[str, str] | None,
                  return_context: bool, require_commitment: bool, failure: str) -> dict[str, str]:
    """The context check shared by messages and streams; returns the context found ({} if none).

    The context sealed in must equal ``context`` unless the caller asked for it
    back (``return_context`` with no ``context``). A context, expected or found,
    is accepted only with a key commitment beside it, so a message without
    attributes (compat mode) passes only when no context is involved.
    """
    # a context equal to the one a well-formed message carries is valid: no need to check it entry by entry
    expected = found if type(context) is dict and context and context == found else normalize_context(context)
    found = found or {}
    if (context is not None or not return_context) and found != expected:
        raise IntegrityError(failure)
    if (expected or found or require_commitment) and commitment is None:
        raise IntegrityError(failure)
    return found


def _unwrapper(unwrap: Unwrap | None, unwrap_der: UnwrapDer | None) -> tuple[UnwrapDer | Unwrap, bool]:
    """The one unwrap callable a reader uses, and whether it takes DER."""
    if (unwrap is None) == (unwrap_der is None):
        raise ConfigurationError("give exactly one of unwrap and unwrap_der")
    return (unwrap_der, True) if unwrap_der is not None else (unwrap, False)  # type: ignore[return-value]


def find_data_key(recipient_infos: ParsedRecipients | tuple[bytes, ...], unwrap: Unwrap | None,
                  commitment: bytes | None, *, failure: str,
                  unwrap_der: UnwrapDer | None = None) -> tuple[DataKey, bool]:
    """The first data key ``unwrap`` (or ``unwrap_der``) yields, checked against the
    commitment, and whether it was made here (so the caller wipes it after use).
    ``recipient_infos`` may be the recipients' DER alone (a message read from its shape).

    Recipients are tried in the order they are encoded. The first key found
    decides: a key that fails the commitment is an :class:`IntegrityError`,
    not a reason to try the next recipient, so every reader of one message
    sees the same key or nothing. A recipient of ours that asks for what keymgr
    or the token cannot do (:class:`UnsupportedAlgorithmError`,
    :class:`MechanismUnsupportedError`) does not stop the search: that error is
    raised only if no other recipient yields a key.
    """
    call, by_der = _unwrapper(unwrap, unwrap_der)
    if type(recipient_infos) is tuple:
        ders: tuple[bytes, ...] = recipient_infos
        if not by_der:
            recipient_infos = ParsedRecipients(ders)
    else:
        ders = recipient_infos.der  # type: ignore[union-attr]
    unusable: UnsupportedAlgorithmError | MechanismUnsupportedError | None = None
    for index, der in enumerate(ders):
        try:
            found = call(der if by_der else recipient_infos[index])
        except (UnsupportedAlgorithmError, MechanismUnsupportedError) as exc:
            unusable = unusable or exc
            continue
        if found is None:
            continue
        if isinstance(found, DataKey):
            key, owned = found, False
        elif len(found) != KEY_SIZE:
            raise IntegrityError(failure)
        else:
            key, owned = DataKey(found), True
        if commitment is not None and not key.matches(commitment):
            if owned:
                key.wipe()
            raise IntegrityError(failure)
        return key, owned
    if unusable is not None:
        raise unusable
    raise RecipientNotFoundError(f"none of the {len(recipient_infos)} recipients matches a key available here "
                                 "(a message for another token, or one whose recipients were edited)")


@overload
def open_message(blob: bytes, *, unwrap: Unwrap | None = ..., context: Mapping[str, str] | None,
                 return_context: Literal[False] = ..., require_commitment: bool = ...,
                 unwrap_der: UnwrapDer | None = ...) -> bytes: ...
@overload
def open_message(blob: bytes, *, unwrap: Unwrap | None = ..., context: Mapping[str, str] | None,
                 return_context: Literal[True], require_commitment: bool = ...,
                 unwrap_der: UnwrapDer | None = ...) -> tuple[bytes, dict[str, str]]: ...


def open_message(blob: bytes, *, unwrap: Unwrap | None = None, context: Mapping[str, str] | None,
                 return_context: bool = False, require_commitment: bool = False,
                 unwrap_der: UnwrapDer | None = None) -> bytes | tuple[bytes, dict[str, str]]:
    """Decrypt a message: check the context, find a data key, check its commitment, then GCM.

    ``unwrap`` is called with each recipient as an asn1crypto ``RecipientInfo``;
    ``unwrap_der`` (give one or the other) with its DER, which spares the
    asn1crypto object on the per-message path.

    ``context`` must equal the one sealed in (``None`` and ``{}`` both mean
    none). With ``return_context=True`` and ``context=None`` any context is
    accepted and returned with the plaintext, for the caller to check.
    ``require_commitment=True`` also refuses compat (attribute-free) messages.
    """
    data = bytes(blob)
    recipients: ParsedRecipients | tuple[bytes, ...]
    shape = _SHAPES.get(len(data))
    if shape is not None and shape.fits(data):  # a message of a shape seen before: read by position
        found_context, commitment, recipients, nonce, sealed, aad = shape.parts(data)
    else:  # the shape was compared already: straight to the full parse (or BER's re-encoding)
        parsed = _parse_lenient(data)
        found_context, commitment, recipients = parsed.context, parsed.commitment, parsed.recipient_infos
        nonce, sealed, aad = parsed.nonce, parsed.encrypted_content + parsed.mac, parsed.aad
    found = check_context(found_context, commitment, context=context, return_context=return_context,
                          require_commitment=require_commitment, failure=MESSAGE_FAILED)
    key, owned = find_data_key(recipients, unwrap, commitment, failure=MESSAGE_FAILED, unwrap_der=unwrap_der)
    try:
        plaintext = key.open(nonce, sealed, aad)
    except IntegrityError:
        raise IntegrityError(MESSAGE_FAILED) from None
    finally:
        if owned:
            key.wipe()
    return (plaintext, dict(found)) if return_context else plaintext
