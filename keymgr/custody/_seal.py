"""Sealing a secret share to one custodian's token key, and opening it there.

A sealed share is a CMS ``AuthEnvelopedData`` message (RFC 5083, AES-256-GCM)
whose one recipient is the custodian's public key, built by
:mod:`keymgr.recipients.pubkey`: RSAES-OAEP ``KeyTransRecipientInfo`` for RSA
keys (SHA-256, or SHA-1 where the custodian's token can do nothing else:
SoftHSM 2.6.1) and RFC 5753 ECDH ``KeyAgreeRecipientInfo`` for EC keys. The
share's *context* (which backup or message, which custodian, which index) is
the message's encryption context, an authenticated attribute, so a share
moved to another custodian's slot or into another backup does not open.

Only the custodian's token can open it: the private key never leaves it.
Every failure to open is one :class:`~keymgr.errors.IntegrityError` that names
the custodian and nothing else (no oracle).
"""

from __future__ import annotations

from collections.abc import Mapping

from keymgr import errors
from keymgr.custody.custodian_token import CustodianToken
from keymgr.custody.custodians import Custodian
from keymgr.recipients.pubkey import TokenPrivateKey, decrypt_with, encrypt_to, public_key_recipient

__all__ = ["seal_share", "open_share", "MAX_SEALED"]

MAX_SEALED = 4096


def seal_share(custodian: Custodian, share: bytes | bytearray, context: Mapping[str, str]) -> bytes:
    """Encrypt ``share`` to ``custodian``'s registered public key, bound to ``context``."""
    recipient = public_key_recipient(custodian.public_key(), oaep_hash=custodian.oaep_hash or "sha256",
                                     name=custodian.name)
    return encrypt_to(bytes(share), [recipient], context=dict(context))


def open_share(token: CustodianToken, sealed: bytes, context: Mapping[str, str]) -> bytearray:
    """Decrypt a sealed share with the custodian's token; IntegrityError if it is not theirs or damaged."""
    failed = (f"the share sealed to custodian {token.custodian.name!r} does not open with their token: "
              "the backup or message was damaged or altered, or the share is not theirs")
    if len(sealed) > MAX_SEALED:
        raise errors.IntegrityError(failed)
    try:
        return bytearray(decrypt_with(bytes(sealed), [TokenPrivateKey(token.ts, token.ref)], context=dict(context)))
    except (errors.IntegrityError, errors.FormatError, errors.KeyNotFoundError):
        raise errors.IntegrityError(failed) from None
