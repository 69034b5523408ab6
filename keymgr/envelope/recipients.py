"""Recipients: who can recover a message's data key (RFC 5652 section 6.2).

A recipient is an asn1crypto :class:`~asn1crypto.cms.RecipientInfo`, the
type CMS tooling already speaks. This module builds and reads the kinds the
format layer knows about, without any token:

- ``KEKRecipientInfo`` (RFC 5652 section 6.2.3) for a symmetric key kept in a
  token: ``kekid`` names the key (its CKA_ID), the key-encryption algorithm is
  one of ``id-aes256-wrap`` (RFC 3394, ``2.16.840.1.101.3.4.1.45``, no
  parameters, RFC 3565 section 2.3.2), ``id-aes256-wrap-pad`` (RFC 5649,
  ``.48``, no parameters) or ``id-aes256-GCM`` (RFC 5084, ``.46``,
  ``GCMParameters`` with a 12-byte nonce and a 16-byte ICV; the encrypted key
  is then ciphertext || tag, as PKCS#11 ``C_Encrypt`` returns it).
- ``OtherRecipientInfo`` (RFC 5652 section 6.2.5) for recipient types of our
  own, e.g. the threshold recipient (``OID_THRESHOLD_RECIPIENT``).
- ``KeyTransRecipientInfo`` / ``KeyAgreeRecipientInfo`` are carried as they
  are; reading them is the token glue's work.

Caps (each a :class:`~keymgr.errors.FormatError` when read, a
:class:`~keymgr.errors.ConfigurationError` when written): at most 64
recipients, 16 KiB per recipient, 1024 bytes per encrypted key or key id.
Builders return lazily-parsed objects made from our own DER: ~13 µs each
where asn1crypto's constructors take ~100 µs, which is more than the token
call (20-35 µs) the recipient stands for. A decrypt-side data-key cache can
key on ``ri.dump()`` (the recipient's DER, ~1 µs) without reading the fields.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias, overload

from asn1crypto import cms

from keymgr.envelope import _der
from keymgr.envelope._aead import NONCE_SIZE, TAG_SIZE, encode_gcm_parameters, read_gcm_parameters
from keymgr.envelope._attrs import OID_THRESHOLD_RECIPIENT
from keymgr.errors import ConfigurationError, FormatError

__all__ = [
    "MAX_RECIPIENTS", "OID_THRESHOLD_RECIPIENT", "KekAlgorithm", "KekRecipient", "ParsedRecipients",
    "RecipientKind", "RecipientLike", "kek_recipient_der", "kek_recipient_info", "other_recipient_info",
    "load_recipient_info", "read_kek_recipient", "read_other_recipient", "recipient_kind",
]

RecipientKind = Literal["ktri", "kari", "kekri", "pwri", "ori"]
KekAlgorithm = Literal["aes256_wrap", "aes256_wrap_pad", "aes256_gcm"]
#: A recipient as writers hand it over: an asn1crypto object, or the DER of one
#: (what the token glue produces on the per-message path: no asn1crypto round trip).
RecipientLike: TypeAlias = cms.RecipientInfo | bytes

MAX_RECIPIENTS = 64
MAX_RECIPIENT_BYTES = 16 * 1024
MAX_ENCRYPTED_KEY = 1024
MAX_KEK_ID = 1024

_KINDS: dict[int, RecipientKind] = {0x30: "ktri", 0xA1: "kari", 0xA2: "kekri", 0xA3: "pwri", 0xA4: "ori"}
_KEK_OIDS: dict[str, KekAlgorithm] = {
    "2.16.840.1.101.3.4.1.45": "aes256_wrap",
    "2.16.840.1.101.3.4.1.48": "aes256_wrap_pad",
    "2.16.840.1.101.3.4.1.46": "aes256_gcm",
}
_KEK_OID_TLV = {name: _der.encode_oid(oid) for oid, name in _KEK_OIDS.items()}
_KEK_ALGORITHM_BY_TLV = {tlv: name for name, tlv in _KEK_OID_TLV.items()}
_NULL = b"\x05\x00"
_VERSION_4 = _der.integer(4)
_GCM_ICV = _der.integer(TAG_SIZE)
_GCM_PARAMS_HEAD = encode_gcm_parameters(bytes(NONCE_SIZE))[:4]  # SEQUENCE (17), OCTET STRING (12)
_KEKRI_TAGS = (_der.INTEGER, _der.SEQUENCE, _der.SEQUENCE, _der.OCTET_STRING)


@dataclass(frozen=True)
class KekRecipient:
    """The fields of a ``KEKRecipientInfo`` that a token needs to unwrap the data key."""

    kek_id: bytes
    algorithm: KekAlgorithm
    encrypted_key: bytes = field(repr=False)
    gcm_nonce: bytes | None = None


def _check_encrypted_key(algorithm: str, encrypted_key: bytes, error: type[Exception]) -> None:
    n = len(encrypted_key)
    if algorithm == "aes256_wrap":
        ok = n % 8 == 0 and n >= 24  # RFC 3394: at least two 64-bit blocks of key, plus one
    elif algorithm == "aes256_wrap_pad":
        ok = n % 8 == 0 and n >= 16  # RFC 5649: one block when the key is at most 8 bytes
    else:
        ok = n > TAG_SIZE
    if not ok or n > MAX_ENCRYPTED_KEY:
        raise error(f"encrypted key has an impossible length for {algorithm}")


@functools.lru_cache(maxsize=256)
def _kek_frame(kek_id: bytes, algorithm: str, encrypted_length: int) -> tuple[bytes, bytes]:
    """(head, middle): the DER of a KEKRecipientInfo is ``head + nonce + middle + encrypted key``
    (``nonce`` empty but for GCM). Everything but the nonce and the encrypted key depends only
    on the key id, algorithm and length, so a KEK's per-message recipients are two joins."""
    if algorithm not in _KEK_OID_TLV:
        raise ConfigurationError(f"unknown key-encryption algorithm {algorithm!r}")
    if not 1 <= len(kek_id) <= MAX_KEK_ID:
        raise ConfigurationError(f"a KEK id is 1 to {MAX_KEK_ID} bytes")
    _check_encrypted_key(algorithm, bytes(encrypted_length), ConfigurationError)
    params = encode_gcm_parameters(bytes(NONCE_SIZE)) if algorithm == "aes256_gcm" else b""
    body = (_VERSION_4 + _der.seq(_der.octets(kek_id)) + _der.seq(_KEK_OID_TLV[algorithm], params)
            + _der.header(_der.OCTET_STRING, encrypted_length))
    der = _der.header(0xA2, len(body) + encrypted_length) + body
    if not params:
        return der, b""
    nonce_at = len(der) - len(_der.header(_der.OCTET_STRING, encrypted_length)) - len(_GCM_ICV) - NONCE_SIZE
    return der[:nonce_at], der[nonce_at + NONCE_SIZE:]


def kek_recipient_der(kek_id: bytes, encrypted_key: bytes, algorithm: KekAlgorithm,
                      gcm_nonce: bytes | None = None) -> bytes:
    """The DER of a ``KEKRecipientInfo`` (version 4) naming the KEK by ``kek_id``, as a
    ``RecipientInfo`` choice ([2] IMPLICIT)."""
    if (algorithm == "aes256_gcm") != (gcm_nonce is not None):
        raise ConfigurationError("a GCM nonce goes with aes256_gcm, and only with it")
    head, middle = _kek_frame(bytes(kek_id), algorithm, len(encrypted_key))
    if gcm_nonce is None:
        return head + bytes(encrypted_key)
    if len(gcm_nonce) != NONCE_SIZE:
        raise ConfigurationError(f"the GCM nonce must be {NONCE_SIZE} bytes")
    return head + bytes(gcm_nonce) + middle + bytes(encrypted_key)


def kek_recipient_info(kek_id: bytes, encrypted_key: bytes, algorithm: KekAlgorithm,
                       gcm_nonce: bytes | None = None) -> cms.RecipientInfo:
    """A ``KEKRecipientInfo`` (version 4) naming the KEK by ``kek_id``."""
    return cms.RecipientInfo.load(kek_recipient_der(kek_id, encrypted_key, algorithm, gcm_nonce))


def _dump(ri: RecipientLike) -> bytes:
    return ri if isinstance(ri, bytes) else ri.dump()


def recipient_kind(ri: RecipientLike) -> RecipientKind:
    """Which of the five RecipientInfo choices ``ri`` (an object or its DER) is."""
    try:
        return _KINDS[_dump(ri)[0]]
    except (KeyError, IndexError, ValueError, TypeError):
        raise FormatError("not a RecipientInfo") from None


def _parts(ri: RecipientLike, tag: int, what: str, limit: int) -> tuple[bytes, list[_der.Tlv]]:
    try:
        data = _dump(ri)
    except (ValueError, TypeError):
        raise FormatError(f"{what}: not encodable") from None
    outer = _der.read_one(data, tag=tag, what=what)
    return data, _der.children(data, outer, limit=limit, what=what)


def _read_kek_short(data: bytes) -> KekRecipient | None:
    """:func:`read_kek_recipient` for the shape keymgr and OpenSSL write (every length in short
    form, the key id alone in ``kekid``), read by position; None for any other shape, which
    the general reader then takes. It accepts exactly what the general reader accepts."""
    n = len(data)
    if not 9 < n <= 129 or data[0] != 0xA2 or data[1] != n - 2 or data[2:5] != _VERSION_4 or data[5] != _der.SEQUENCE:
        return None
    id_len = data[8]
    if data[7] != _der.OCTET_STRING or data[6] != id_len + 2 or not 0 < id_len < 0x7E:
        return None
    at = 9 + id_len
    if at + 13 > n or data[at] != _der.SEQUENCE or data[at + 1] >= 0x80:
        return None
    params_end = at + 2 + data[at + 1]
    algorithm = _KEK_ALGORITHM_BY_TLV.get(data[at + 2:at + 13])  # every id-aes256-* OID TLV is 11 bytes
    if algorithm is None or params_end + 2 > n or data[params_end] != _der.OCTET_STRING \
            or data[params_end + 1] != n - params_end - 2:
        return None
    params, nonce = data[at + 13:params_end], None
    if algorithm == "aes256_gcm":
        if len(params) != 19 or not params.startswith(_GCM_PARAMS_HEAD) or not params.endswith(_GCM_ICV):
            return None
        nonce = params[4:4 + NONCE_SIZE]
    elif params not in (b"", _NULL):
        return None
    encrypted_key = data[params_end + 2:]
    _check_encrypted_key(algorithm, encrypted_key, FormatError)
    return KekRecipient(kek_id=data[9:at], algorithm=algorithm, encrypted_key=encrypted_key, gcm_nonce=nonce)


def read_kek_recipient(ri: RecipientLike) -> KekRecipient:
    """The key id, algorithm, encrypted key (and GCM nonce) of a ``KEKRecipientInfo`` (object or DER)."""
    if isinstance(ri, bytes):
        found = _read_kek_short(ri)
        if found is not None:
            return found
    what = "KEKRecipientInfo"
    data, parts = _parts(ri, 0xA2, what, 4)
    if len(parts) != 4 or tuple(p.tag for p in parts) != _KEKRI_TAGS:
        raise FormatError(f"{what}: malformed")
    if data[parts[0].start:parts[0].end] != _VERSION_4:  # DER has one encoding of INTEGER 4
        raise FormatError(f"{what}: version must be 4")
    kekid = _der.children(data, parts[1], limit=3, what=what)
    if not kekid or kekid[0].tag != _der.OCTET_STRING or not 1 <= kekid[0].end - kekid[0].body <= MAX_KEK_ID:
        raise FormatError(f"{what}: malformed key identifier")
    algorithm_id = _der.children(data, parts[2], limit=2, what=what)
    if not algorithm_id:
        raise FormatError(f"{what}: malformed key-encryption algorithm")
    algorithm = _KEK_ALGORITHM_BY_TLV.get(data[algorithm_id[0].start:algorithm_id[0].end])
    if algorithm is None:
        raise FormatError(f"{what}: unsupported key-encryption algorithm")
    params = data[algorithm_id[1].start:algorithm_id[1].end] if len(algorithm_id) == 2 else b""
    nonce = None
    if algorithm == "aes256_gcm":
        nonce = read_gcm_parameters(params, what=what)
    elif params not in (b"", _NULL):
        raise FormatError(f"{what}: {algorithm} takes no parameters")
    encrypted_key = data[parts[3].body:parts[3].end]
    _check_encrypted_key(algorithm, encrypted_key, FormatError)
    return KekRecipient(kek_id=data[kekid[0].body:kekid[0].end], algorithm=algorithm,
                        encrypted_key=encrypted_key, gcm_nonce=nonce)


def other_recipient_info(ori_type: str, value: bytes) -> cms.RecipientInfo:
    """An ``OtherRecipientInfo``: ``ori_type`` (dotted OID) and one DER-encoded value."""
    try:
        type_tlv = _der.encode_oid(ori_type)
        element = _der.read_at(value, 0, len(value))
        if element.end != len(value):
            raise FormatError("trailing bytes")
    except (ValueError, FormatError):
        raise ConfigurationError("an OtherRecipientInfo needs a dotted OID and one DER value") from None
    return cms.RecipientInfo.load(_der.tlv(0xA4, type_tlv + bytes(value)))


def read_other_recipient(ri: RecipientLike) -> tuple[str, bytes]:
    """(oriType as a dotted OID, oriValue DER) of an ``OtherRecipientInfo``."""
    what = "OtherRecipientInfo"
    data, parts = _parts(ri, 0xA4, what, 2)
    if len(parts) != 2 or parts[0].tag != _der.OID:
        raise FormatError(f"{what}: malformed")
    return _der.decode_oid(data[parts[0].body:parts[0].end]), data[parts[1].start:parts[1].end]


#: The last tuple of recipient DERs encoded, and its encoding: a cached data key seals every
#: message with the same tuple object (keymgr.envelope.cache). Held by reference, so ``is``
#: means the same immutable bytes; nothing secret (wrapped keys).
_last_encoded: tuple[object, bytes] = (None, b"")


def encode_recipient_infos(recipient_infos: Sequence[RecipientLike]) -> bytes:
    """The DER ``RecipientInfos`` SET for a message or stream we write (objects or their DER)."""
    global _last_encoded
    last = _last_encoded
    if recipient_infos is last[0]:
        return last[1]
    if isinstance(recipient_infos, cms.RecipientInfo | bytes) or not 1 <= len(recipient_infos) <= MAX_RECIPIENTS:
        raise ConfigurationError(f"a message needs 1 to {MAX_RECIPIENTS} recipients (a sequence of RecipientInfo)")
    encoded = []
    for ri in recipient_infos:
        if type(ri) is not bytes and not isinstance(ri, cms.RecipientInfo | bytes):
            raise ConfigurationError("recipients must be asn1crypto.cms.RecipientInfo objects (or their DER)")
        try:
            data = _dump(ri)
            element = _der.read_one(data, tag=data[0], what="RecipientInfo")
        except (FormatError, ValueError, TypeError, IndexError):
            raise ConfigurationError("a recipient is not a DER-encodable RecipientInfo") from None
        if element.tag not in _KINDS or len(data) > MAX_RECIPIENT_BYTES:
            raise ConfigurationError(f"a recipient is not a RecipientInfo of at most {MAX_RECIPIENT_BYTES} bytes")
        encoded.append(data)
    result = _der.set_of(encoded)
    if type(recipient_infos) is tuple and all(type(ri) is bytes for ri in recipient_infos):
        _last_encoded = (recipient_infos, result)
    return result


def load_recipient_info(der: bytes) -> cms.RecipientInfo:
    """One recipient's DER as an asn1crypto object; :class:`FormatError` if asn1crypto cannot read it."""
    try:
        return cms.RecipientInfo.load(der, strict=True)
    except (ValueError, TypeError, KeyError, IndexError, OverflowError):
        raise FormatError("RecipientInfos: malformed recipient") from None


class ParsedRecipients(Sequence[cms.RecipientInfo]):
    """The recipients of a message or stream we read: their DER (:attr:`der`, in encoded
    order), each loaded into an asn1crypto object only when asked for.

    Loading costs ~7-10 µs a recipient, as much as the rest of parsing a small
    message; the token glue reads its own ``KEKRecipientInfo`` from the DER and
    never pays it. A recipient asn1crypto cannot load is a :class:`FormatError`
    when it is first asked for (the DER framing was checked already).
    """

    __slots__ = ("der", "_loaded")

    def __init__(self, der: Sequence[bytes]) -> None:
        self.der: tuple[bytes, ...] = tuple(der)
        self._loaded: list[cms.RecipientInfo | None] = [None] * len(self.der)

    def __len__(self) -> int:
        return len(self.der)

    @overload
    def __getitem__(self, index: int) -> cms.RecipientInfo: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[cms.RecipientInfo, ...]: ...

    def __getitem__(self, index: int | slice) -> cms.RecipientInfo | tuple[cms.RecipientInfo, ...]:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        loaded = self._loaded[index]
        if loaded is None:
            loaded = self._loaded[index] = load_recipient_info(self.der[index])
        return loaded

    def __iter__(self) -> Iterator[cms.RecipientInfo]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"ParsedRecipients({[recipient_kind(d) for d in self.der]})"


def parse_recipient_infos(data: bytes, element: _der.Tlv) -> ParsedRecipients:
    """The recipients of a ``RecipientInfos`` SET (DER checked; asn1crypto objects made on demand)."""
    what = "RecipientInfos"
    if element.tag != _der.SET:
        raise FormatError(f"{what}: expected a SET")
    items = _der.children(data, element, limit=MAX_RECIPIENTS, what=what)
    if not items:
        raise FormatError(f"{what}: at least one recipient is required (RFC 5083 section 2.1)")
    for item in items:
        if item.tag not in _KINDS or item.end - item.start > MAX_RECIPIENT_BYTES:
            raise FormatError(f"{what}: unknown recipient type or recipient too large")
    return ParsedRecipients([data[item.start:item.end] for item in items])
