"""Public-key recipients and key pairs for ``keymgr encrypt`` / ``keymgr decrypt``.

``encrypt --recipient FILE`` (repeatable) adds someone's key pair as a recipient: FILE is a
PEM or DER public key or certificate, the annotated PEM or the JSON descriptor that
``keymgr token keygen / pubkey`` write (:mod:`keymgr.recipients.recipient_files`). The OAEP
hash of an RSA recipient is ``--oaep-hash``, else what FILE states, else SHA-256.

``decrypt`` needs nothing for a message to one of the token's key pairs (the manager finds
the pair a recipient names, by subject key identifier or by issuer and serial number through
its certificate); ``--with-key URI`` names a pair, possibly on another token, to try first.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from keymgr import errors

if TYPE_CHECKING:
    from keymgr.recipients.kek import Recipient

__all__ = ["OAEP_HASH_CHOICES", "load_recipients", "recipient_options", "use_key_pairs"]

OAEP_HASH_CHOICES = ("sha1", "sha224", "sha256", "sha384", "sha512")


def load_recipients(paths: Sequence[str], oaep_hash: str | None) -> list[Recipient]:
    """One recipient per file, read before any output exists (a bad file fails the command early)."""
    from keymgr.recipients.recipient_files import read_recipient_file

    recipients = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise errors.ConfigurationError(f"cannot read recipient file {path}: "
                                            f"{exc.strerror or type(exc).__name__}") from None
        recipients.append(read_recipient_file(data, name=path).recipient(oaep_hash=oaep_hash))
    return recipients


def use_key_pairs(km: Any, uris: Sequence[str]) -> None:
    """Let ``km`` decrypt with the key pairs these ``pkcs11:`` URIs name (``object=`` / ``id=``)."""
    from keymgr.hsm import Pkcs11Uri

    for text in uris:
        uri = Pkcs11Uri.parse(text)
        if uri.object is None and uri.id is None:
            raise errors.ConfigurationError("--with-key needs a key URI with object=LABEL or id=... "
                                            "(`keymgr token keys` lists them)")
        km.add_private_key(token=uri)


def recipient_options(command: Any) -> Any:
    """``--recipient`` and ``--oaep-hash``, for ``keymgr encrypt``."""
    command = click.option(
        "--oaep-hash", type=click.Choice(OAEP_HASH_CHOICES), default=None,
        help="OAEP hash for RSA recipients (default: what the recipient file states, else sha256; "
             "SoftHSM 2.6.1 decrypts sha1 only).")(command)
    return click.option(
        "--recipient", "recipient_files", multiple=True, metavar="FILE",
        help="Also encrypt to this public key: a PEM/DER public key or certificate, or what `keymgr token "
             "pubkey` writes (repeatable; with or without --key).")(command)
