"""Content encryption: AES-256-GCM with the sizes keymgr pins, and key commitment.

Both envelope formats (CMS messages, streams) encrypt through this module
and nothing else, so the Wycheproof AES-GCM vectors that run through
:meth:`DataKey.seal` / :meth:`DataKey.open` test the code path real data takes.

Pinned sizes (RFC 5084 section 3.2 allows more; keymgr reads and writes only these):
a 256-bit key, a 96-bit nonce (the size NIST SP 800-38D section 8.2 treats
as the default, and the one RFC 5084 recommends), a 128-bit tag.

Key commitment: GCM is not key-committing; one ciphertext and tag can be
made to verify under two different keys (Dodis et al., "Fast Message
Franking", 2018; Albertini et al., "How to Abuse and Fix Authenticated
Encryption Without Key Commitment", 2022). A message with two recipients
could then show each a different plaintext. :func:`key_commitment` is
HKDF-SHA256 (RFC 5869) of the data key under a label of its own; storing
it in the message and checking it before decrypting binds the message to
one key, because two keys with the same commitment are a SHA-256 collision.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keymgr._memory import zero
from keymgr.envelope import _der
from keymgr.errors import ConfigurationError, FormatError, IntegrityError

__all__ = [
    "COMMITMENT_SIZE", "KEY_SIZE", "NONCE_SIZE", "TAG_SIZE", "DataKey", "encode_gcm_parameters",
    "hkdf_sha256", "key_commitment", "read_gcm_parameters",
]

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
COMMITMENT_SIZE = 32
COMMITMENT_INFO = b"keymgr key commitment v1"
_COMMITMENT_BLOCK_1 = COMMITMENT_INFO + b"\x01"  # RFC 5869 2.3: T(1) = HMAC(PRK, info || 0x01)

#: The one message of every content authentication failure (no oracle).
AEAD_FAILED = "AES-256-GCM authentication failed"


_HASH_LEN = 32


def hkdf_sha256(ikm: bytes | bytearray, *, salt: bytes | None, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869), extract then expand; :class:`ValueError` above 255 blocks.

    Written out with ``hmac.digest`` (OpenSSL's one-shot HMAC) rather than
    ``cryptography``'s HKDF object: the same bytes (the Wycheproof HKDF vectors
    run through this function) at about half the cost, which matters because a
    fresh data key pays for one HKDF (its commitment) on every uncached message.
    """
    if not 0 < length <= 255 * _HASH_LEN:
        raise ValueError(f"HKDF-SHA256 output must be 1 to {255 * _HASH_LEN} bytes")
    # RFC 5869 2.2: an absent salt is HashLen zero bytes, which HMAC pads to the same key as b""
    prk = hmac.digest(salt or b"", bytes(ikm), "sha256")
    blocks: list[bytes] = []
    block = b""
    for counter in range(1, -(-length // _HASH_LEN) + 1):
        block = hmac.digest(prk, block + info + bytes((counter,)), "sha256")
        blocks.append(block)
    return b"".join(blocks)[:length]


_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))
_EXTRACT_INNER = hashlib.sha256(bytes(64).translate(_IPAD))  # HMAC key: the all-zero salt (RFC 5869 2.2)
_EXTRACT_OUTER = hashlib.sha256(bytes(64).translate(_OPAD))


def key_commitment(key: bytes | bytearray) -> bytes:
    """The public commitment to a data key: HKDF-SHA256(key, salt=none, info=label), 32 bytes.

    :func:`hkdf_sha256` for one block, with the HMACs (RFC 2104) written out over
    SHA-256 states whose zero-salt pads are hashed once: it runs for every fresh
    data key, and this form costs a third less than two ``hmac.digest`` calls
    (the same bytes: tests/recipients/test_envelope_token.py checks it against :func:`hkdf_sha256`)."""
    inner = _EXTRACT_INNER.copy()
    inner.update(key)
    outer = _EXTRACT_OUTER.copy()
    outer.update(inner.digest())
    block = outer.digest() + bytes(32)  # the PRK as an HMAC key, zero-padded to SHA-256's 64-byte block
    inner = hashlib.sha256(block.translate(_IPAD))
    inner.update(_COMMITMENT_BLOCK_1)
    outer = hashlib.sha256(block.translate(_OPAD))
    outer.update(inner.digest())
    return outer.digest()


def _check_nonce(nonce: bytes) -> None:
    if len(nonce) != NONCE_SIZE:
        raise FormatError(f"AES-GCM nonce must be {NONCE_SIZE} bytes")


def encode_gcm_parameters(nonce: bytes) -> bytes:
    """RFC 5084 ``GCMParameters``: the nonce, and the ICV length written out (its DEFAULT is 12)."""
    return _der.seq(_der.octets(nonce), _der.integer(TAG_SIZE))


_GCM_PARAMS_HEAD = encode_gcm_parameters(bytes(NONCE_SIZE))[:4]
_GCM_PARAMS_TAIL = encode_gcm_parameters(bytes(NONCE_SIZE))[-3:]
_GCM_PARAMS_SIZE = len(encode_gcm_parameters(bytes(NONCE_SIZE)))


def read_gcm_parameters(data: bytes, *, what: str) -> bytes:
    """The nonce of RFC 5084 ``GCMParameters``; :class:`FormatError` unless it is 12 bytes and
    the ICV length 16 (an absent ICV length means the DEFAULT, 12, which keymgr refuses)."""
    if len(data) == _GCM_PARAMS_SIZE and data.startswith(_GCM_PARAMS_HEAD) and data.endswith(_GCM_PARAMS_TAIL):
        return data[len(_GCM_PARAMS_HEAD):-len(_GCM_PARAMS_TAIL)]  # the one DER encoding keymgr accepts
    outer = _der.read_one(data, tag=_der.SEQUENCE, what=what)
    fields = _der.children(data, outer, limit=2, what=what)
    if not fields or fields[0].tag != _der.OCTET_STRING:
        raise FormatError(f"{what}: malformed GCMParameters")
    icv_length = _der.read_int(data, fields[1], what=what) if len(fields) == 2 else 12
    if fields[0].end - fields[0].body != NONCE_SIZE or icv_length != TAG_SIZE:
        raise FormatError(f"{what}: keymgr uses a {NONCE_SIZE}-byte GCM nonce and a {TAG_SIZE}-byte ICV")
    return data[fields[0].body:fields[0].end]


class DataKey:
    """A 256-bit data key made ready for AES-256-GCM.

    The key schedule and the commitment are computed once, so a cached data
    key (one per many messages) pays for them once. The key bytes live in a
    ``bytearray`` that :meth:`wipe` zeroes; the copy inside OpenSSL's cipher
    context is freed, not wiped, when the object goes (as much as Python allows).
    Never shown by ``repr``, never pickled.
    """

    __slots__ = ("_key", "_aead", "_commitment")

    def __init__(self, key: bytes | bytearray | memoryview) -> None:
        if len(key) != KEY_SIZE:
            raise ConfigurationError(f"a data key must be {KEY_SIZE} bytes (AES-256)")
        self._key: bytearray = bytearray(key)
        self._aead: AESGCM | None = AESGCM(bytes(self._key))
        self._commitment: bytes | None = None

    @classmethod
    def coerce(cls, key: DataKey | bytes | bytearray | memoryview) -> DataKey:
        return key if isinstance(key, DataKey) else cls(key)

    def __repr__(self) -> str:
        return "DataKey(AES-256, wiped)" if self._aead is None else "DataKey(AES-256)"

    def __reduce__(self) -> NoReturn:
        raise TypeError("data keys cannot be pickled")

    @property
    def commitment(self) -> bytes:
        """This key's :func:`key_commitment` (computed on first use)."""
        if self._commitment is None:
            self._cipher()  # refuses a wiped key
            self._commitment = key_commitment(self._key)
        return self._commitment

    def matches(self, commitment: bytes) -> bool:
        """Whether ``commitment`` commits to this key (constant-time comparison)."""
        return hmac.compare_digest(self.commitment, commitment)

    def derive(self, *, salt: bytes, info: bytes) -> DataKey:
        """A subkey by HKDF-SHA256 (used for stream segment keys)."""
        self._cipher()  # refuses a wiped key
        return DataKey(hkdf_sha256(self._key, salt=salt, info=info))

    def __del__(self) -> None:
        # Last reference gone (e.g. evicted from a cache while another thread
        # still used it): zero the bytes now rather than leave them to the allocator.
        key = getattr(self, "_key", None)
        if key is not None and getattr(self, "_aead", key) is not None:  # None: wipe() zeroed it already
            zero(key)

    def reveal(self) -> bytes:
        """The key bytes, for the one step that needs them: wrapping the key in a token."""
        self._cipher()  # refuses a wiped key
        return bytes(self._key)

    def wipe(self) -> None:
        """Zero the key bytes and drop the cipher context; the key is unusable afterwards."""
        zero(self._key)
        self._aead = None
        self._commitment = None

    def _cipher(self) -> AESGCM:
        if self._aead is None:
            raise ConfigurationError("this data key was wiped")
        return self._aead

    def seal(self, nonce: bytes, plaintext: bytes | memoryview, aad: bytes) -> bytes:
        """ciphertext || 16-byte tag."""
        aead = self._aead  # the checks of _check_nonce and _cipher, written out: once per message
        if aead is None or len(nonce) != NONCE_SIZE:
            _check_nonce(nonce)
            aead = self._cipher()
        return aead.encrypt(nonce, plaintext, aad)

    def encryptor(self) -> Callable[[bytes, bytes, bytes], bytes]:
        """:meth:`seal` without its per-call checks, for a caller that makes every nonce itself
        (12 random bytes: a batch of field values, one call per value): AES-256-GCM's own
        ``encrypt(nonce, plaintext, aad)`` under this key. Refuses a wiped key now; a :meth:`wipe`
        afterwards does not stop it, so hold it for one batch only and check :attr:`wiped` once
        the batch is sealed (a close meanwhile refuses the batch, as :meth:`seal` would have)."""
        return self._cipher().encrypt

    @property
    def wiped(self) -> bool:
        """Whether :meth:`wipe` has run."""
        return self._aead is None

    def open(self, nonce: bytes, sealed: bytes | memoryview, aad: bytes) -> bytes:
        """Plaintext of ``ciphertext || tag``; :class:`IntegrityError` if it does not verify."""
        aead = self._aead
        if aead is None or len(nonce) != NONCE_SIZE:
            _check_nonce(nonce)
            aead = self._cipher()
        if len(sealed) < TAG_SIZE:
            raise IntegrityError(AEAD_FAILED)
        try:
            return aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise IntegrityError(AEAD_FAILED) from None

    def seal_into(self, nonce: bytes, plaintext: memoryview, aad: bytes, out: memoryview) -> None:
        """Like :meth:`seal`, into ``out`` (exactly ``len(plaintext) + 16`` bytes): no allocation."""
        _check_nonce(nonce)
        self._cipher().encrypt_into(nonce, plaintext, aad, out)

    def open_into(self, nonce: bytes, sealed: memoryview, aad: bytes, out: memoryview) -> None:
        """Like :meth:`open`, into ``out``. On failure ``out`` is zeroed: OpenSSL writes the
        unverified plaintext there before it checks the tag (measured with cryptography 50)."""
        _check_nonce(nonce)
        if len(sealed) < TAG_SIZE:
            raise IntegrityError(AEAD_FAILED)
        try:
            self._cipher().decrypt_into(nonce, sealed, aad, out)
        except InvalidTag:
            zero(out)
            raise IntegrityError(AEAD_FAILED) from None

