"""Recipient files: what a sender is handed to encrypt to someone's key pair.

``keymgr encrypt --recipient FILE`` reads three forms:

1. a PEM or DER public key or X.509 certificate, from any tool;
2. the PEM that ``keymgr token keygen / pubkey --out`` writes: the certificate (or public
   key) with RFC 7468 explanatory text in front, which every PEM reader skips
   (RFC 7468 section 5.2) and which says what the key's token can decrypt::

       keymgr recipient: rsa-2048 key pair 'alice' on token 'custodian-1'
       keymgr-oaep-hash: sha1
       -----BEGIN CERTIFICATE-----

3. a recipient descriptor: the JSON that ``keymgr token keygen / pubkey --json`` prints
   (``{"keymgr_recipient": 1, "public_key_pem": ..., "certificate_pem": ..., "oaep_hash": ...}``).

Why the hash travels with the key: an RSA public key says nothing about the OAEP hash its
private half can be used with, and tokens differ (SoftHSM 2.6.1 decrypts SHA-1 only,
STACK-FACTS 7). The hash is ``--oaep-hash`` when given, else what the file says, else
SHA-256; a message the token cannot open then fails saying which hash it uses and which
the token does (:class:`~keymgr.recipients.token_keys.TokenPrivateKey`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from keymgr import errors
from keymgr.recipients._pk_algorithms import OAEP_HASHES, PublicKey, load_public_key
from keymgr.recipients.identities import find_certificate
from keymgr.recipients.kek import Recipient

__all__ = ["DESCRIPTOR_VERSION", "RecipientFile", "annotated_pem", "read_recipient_file"]

DESCRIPTOR_VERSION = 1
_HASH_LINE = re.compile(rb"^keymgr-oaep-hash:[ \t]*([a-z0-9]+)[ \t]*\r?$", re.MULTILINE)
DEFAULT_OAEP_HASH = "sha256"


@dataclass(frozen=True)
class RecipientFile:
    """What a recipient file holds: the key, its certificate (DER) if any, and the OAEP hash
    the file states (None: it says nothing)."""

    public_key: PublicKey
    certificate: bytes | None
    oaep_hash: str | None
    name: str

    def recipient(self, *, oaep_hash: str | None = None) -> Recipient:
        """The recipient: ``oaep_hash`` if given, else the file's, else SHA-256."""
        from keymgr.recipients.pubkey import public_key_recipient

        chosen = oaep_hash or self.oaep_hash or DEFAULT_OAEP_HASH
        return public_key_recipient(self.certificate or self.public_key, oaep_hash=chosen, name=self.name)


def _checked_hash(value: Any, where: str) -> str | None:
    if value in (None, ""):
        return None
    if value not in OAEP_HASHES:
        raise errors.ConfigurationError(f"{where}: OAEP hash {value!r} is not one of {', '.join(OAEP_HASHES)}")
    return str(value)


def _descriptor(raw: bytes, name: str) -> RecipientFile:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise errors.ConfigurationError(f"{name}: not a recipient descriptor (invalid JSON)") from None
    if not isinstance(doc, dict) or doc.get("keymgr_recipient") != DESCRIPTOR_VERSION:
        raise errors.ConfigurationError(f"{name}: not a keymgr recipient descriptor (keymgr_recipient: "
                                        f"{DESCRIPTOR_VERSION} missing); `keymgr token pubkey --json` writes one")
    pem = doc.get("certificate_pem") or doc.get("public_key_pem")
    if not isinstance(pem, str):
        raise errors.ConfigurationError(f"{name}: the descriptor holds no public_key_pem or certificate_pem")
    public = load_public_key(pem.encode())
    if isinstance(doc.get("public_key_pem"), str) and load_public_key(doc["public_key_pem"].encode()) != public:
        raise errors.ConfigurationError(f"{name}: the descriptor's certificate and public key differ")
    return RecipientFile(public_key=public, certificate=find_certificate(pem.encode()),
                         oaep_hash=_checked_hash(doc.get("oaep_hash"), name), name=str(doc.get("label") or ""))


def read_recipient_file(data: bytes, *, name: str) -> RecipientFile:
    """A recipient file's key, certificate and stated OAEP hash (``name`` is shown in errors)."""
    raw = bytes(data)
    if raw.lstrip()[:1] == b"{":
        return _descriptor(raw, name)
    try:
        public = load_public_key(raw)
    except errors.ConfigurationError as exc:
        raise errors.ConfigurationError(f"{name}: {exc}") from None
    head = raw[:raw.find(b"-----BEGIN")] if b"-----BEGIN" in raw else b""
    stated = _HASH_LINE.search(head)
    if stated is None and re.search(rb"^keymgr-oaep-hash:", head, re.MULTILINE):
        raise errors.ConfigurationError(f"{name}: its keymgr-oaep-hash line is not understood (write one of sha1, "
                                        "sha224, sha256, sha384, sha512, in lower case, alone on the line)")
    return RecipientFile(public_key=public, certificate=find_certificate(raw),
                         oaep_hash=_checked_hash(stated.group(1).decode() if stated else None, name), name="")


def annotated_pem(pem: bytes, *, about: str, oaep_hash: str | None) -> bytes:
    """``pem`` with the explanatory lines keymgr reads back (and every PEM reader skips)."""
    shown = "".join(c if c.isprintable() else "?" for c in about)  # a label cannot add a line of its own
    lines = [f"keymgr recipient: {shown}"]
    if oaep_hash:
        lines.append(f"keymgr-oaep-hash: {oaep_hash}")
    return ("\n".join(lines) + "\n").encode() + pem
