"""Envelope formats: data encrypted under a data key, the data key wrapped for recipients.

Token-independent: this package reads and writes bytes and imports nothing of
keymgr but the base helpers; wrapping a data key in a token is the work of
:mod:`keymgr.recipients` (KEKs on the token, public-key recipients), reached
through the ``unwrap`` callables and the ``RecipientInfo`` values passed in here.

- :mod:`keymgr.envelope.cms`: one message in memory, a DER CMS
  ``AuthEnvelopedData`` (RFC 5083) with AES-256-GCM (RFC 5084).
- :mod:`keymgr.envelope.stream`: inputs of any size in constant memory,
  a header and STREAM-sealed segments.
- :mod:`keymgr.envelope.recipients`: ``KEKRecipientInfo`` and
  ``OtherRecipientInfo`` builders and readers.
- :mod:`keymgr.envelope.inspect`: what a message or stream says about itself.
- :mod:`keymgr.envelope.cache`: data-key caching policies.

Messages from other implementations may be BER: they are read through their
DER re-encoding (:mod:`keymgr.envelope._ber`); keymgr writes DER only.

The byte layouts, OIDs and the reasons for them are in docs/format.md.
"""

from keymgr.envelope._aead import DataKey
from keymgr.envelope._attrs import KEYMGR_ARC, OID_COMMITMENT, OID_CONTEXT, OID_THRESHOLD_RECIPIENT
from keymgr.envelope.cms import (
    ParsedMessage,
    Unwrap,
    UnwrapDer,
    open_message,
    parse_message,
    replace_recipients,
    seal_message,
)
from keymgr.envelope.recipients import (
    KekAlgorithm,
    KekRecipient,
    ParsedRecipients,
    RecipientKind,
    RecipientLike,
    kek_recipient_der,
    kek_recipient_info,
    other_recipient_info,
    read_kek_recipient,
    read_other_recipient,
    recipient_kind,
)
from keymgr.envelope.stream import (
    StreamHeader,
    decrypt_stream,
    encrypt_stream,
    read_stream_header,
    replace_stream_recipients,
)

__all__ = [
    "KEYMGR_ARC",
    "OID_COMMITMENT",
    "OID_CONTEXT",
    "OID_THRESHOLD_RECIPIENT",
    "DataKey",
    "KekAlgorithm",
    "KekRecipient",
    "ParsedMessage",
    "ParsedRecipients",
    "RecipientKind",
    "RecipientLike",
    "StreamHeader",
    "Unwrap",
    "UnwrapDer",
    "decrypt_stream",
    "encrypt_stream",
    "kek_recipient_der",
    "kek_recipient_info",
    "open_message",
    "other_recipient_info",
    "parse_message",
    "read_kek_recipient",
    "read_other_recipient",
    "read_stream_header",
    "recipient_kind",
    "replace_recipients",
    "replace_stream_recipients",
    "seal_message",
]
