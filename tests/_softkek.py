"""A host-side software KEK for envelope *format* tests.

This is not a PKCS#11 mock: it stands where the token glue will stand, so
the format layer can be tested alone. It wraps data keys with
``cryptography``'s RFC 3394 / RFC 5649 key wrap or AES-GCM and unwraps them
for the recipients it owns, raising the same IntegrityError the token glue
must raise when an unwrap fails.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from asn1crypto import cms
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap,
    aes_key_wrap_with_padding,
)

from keymgr.envelope import KekAlgorithm, kek_recipient_info, read_kek_recipient, recipient_kind
from keymgr.errors import IntegrityError


@dataclass
class SoftKek:
    kek_id: bytes = b"kek-1"
    kek: bytes = field(default_factory=lambda: os.urandom(32))
    calls: int = 0

    def recipient(self, dek: bytes, algorithm: KekAlgorithm = "aes256_wrap") -> cms.RecipientInfo:
        if algorithm == "aes256_wrap":
            return kek_recipient_info(self.kek_id, aes_key_wrap(self.kek, dek), algorithm)
        if algorithm == "aes256_wrap_pad":
            return kek_recipient_info(self.kek_id, aes_key_wrap_with_padding(self.kek, dek), algorithm)
        nonce = os.urandom(12)
        return kek_recipient_info(self.kek_id, AESGCM(self.kek).encrypt(nonce, dek, None), algorithm, nonce)

    def unwrap(self, ri: cms.RecipientInfo) -> bytes | None:
        self.calls += 1
        if recipient_kind(ri) != "kekri":
            return None
        found = read_kek_recipient(ri)
        if found.kek_id != self.kek_id:
            return None
        try:
            if found.algorithm == "aes256_wrap":
                return aes_key_unwrap(self.kek, found.encrypted_key)
            if found.algorithm == "aes256_wrap_pad":
                return aes_key_unwrap_with_padding(self.kek, found.encrypted_key)
            assert found.gcm_nonce is not None
            return AESGCM(self.kek).decrypt(found.gcm_nonce, found.encrypted_key, None)
        except (InvalidUnwrap, InvalidTag):
            raise IntegrityError("the data key failed to unwrap") from None
