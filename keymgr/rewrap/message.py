"""Rewrap: move an envelope's data key to its key's current primary, payload untouched.

After a rotation, data written under older versions still names them; rewrap
replaces each recipient of ours (a ``KEKRecipientInfo`` naming a version of a
key on this token) that is not under the key's primary with one that is, so
the old version can later be retired and destroyed (Vault transit's
``rewrap``; Tink re-encrypts instead, which reads the payload).

What changes and what does not:

- Only the recipients. The payload (``encryptedContent`` / stream segments),
  the authenticated attributes (context, key commitment) and the GCM tag are
  copied byte for byte: the AAD never covered the recipients (RFC 5083 section
  2.2, and the stream header hash covers only the parameters), so the envelope
  still verifies afterwards and no payload byte is read.
- Other recipients (a DR site's KEK, an RSA / ECDH key pair, a quorum) stay as
  they are; keymgr cannot wrap for them and must not drop them.
- The data key comes out of the token only as far as every decrypt takes it
  (a ``DataKey`` in memory, wiped after the new wrap), and only through
  :class:`~keymgr.recipients.kek.KekProtector`, so the old version's state is
  enforced: a retired, suspended or destroyed version cannot be rewrapped away
  from, exactly as it cannot decrypt.
- The unwrapped key is checked against the key commitment before it is
  wrapped again: a recipient that carries another key (a spliced recipient)
  is an :class:`~keymgr.errors.IntegrityError`, never laundered into a
  current-looking one. Compat messages (no attributes) have no commitment to
  check; their rewrap is as good as the recipient it started from.
- If the key's primary already has a recipient in the envelope, a stale
  recipient of the same key is dropped instead of wrapped a second time.

Idempotent: an envelope whose recipients of ours are all under the primary
comes back as the same bytes (:attr:`RewrapResult.current`).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Literal

from keymgr import errors
from keymgr.envelope._aead import DataKey
from keymgr.envelope.cms import parse_message, replace_recipients
from keymgr.envelope.recipients import read_kek_recipient, recipient_kind
from keymgr.envelope.stream import StreamHeader, read_stream_header, replace_stream_recipients
from keymgr.hsm import probe
from keymgr.keyring.store import KeyRecord, KeyVersion
from keymgr.recipients.kek import KekProtector

__all__ = ["Move", "RewrapResult", "Rewrapper"]

_FAILED = "the data key of a recipient does not match the envelope's key commitment: the envelope was tampered with"
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class Move:
    """One recipient moved: key ``key`` from version ``source`` to ``target`` (``target`` equal to
    the primary; ``dropped`` when the primary already had a recipient and the stale one was removed)."""

    key: str
    source: int
    target: int
    dropped: bool = False


@dataclass(frozen=True)
class RewrapResult:
    """What :class:`Rewrapper` did. ``data`` is the new message, or a stream's new header."""

    kind: Literal["message", "stream"]
    data: bytes = field(repr=False)
    moves: tuple[Move, ...]
    #: (key, version) of every recipient of ours that was already under the primary
    kept: tuple[tuple[str, int], ...]

    @property
    def current(self) -> bool:
        """Nothing had to move: ``data`` is the input, byte for byte."""
        return not self.moves


@dataclass
class _Ours:
    der: bytes
    record: KeyRecord
    version: KeyVersion


class Rewrapper:
    """Rewrap messages and streams for the keys of one token (through its :class:`KekProtector`)."""

    def __init__(self, protector: KekProtector) -> None:
        self._protector = protector

    def ready(self) -> None:
        """Make the first token calls now: read the keyring and probe the token (once per
        process, and inherited by forked workers, which then only re-initialise and log in)."""
        self._protector.keyring.reload()
        probe(self._protector.keyring.token)

    def _ours(self, der: bytes) -> _Ours | None:
        if recipient_kind(der) != "kekri":
            return None
        # the protector's lookup remembers ids that are not ours (a DR site's), sparing a keyring reload each
        found = self._protector.find(read_kek_recipient(der).kek_id)
        return None if found is None else _Ours(der, *found)

    def _data_key(self, ours: _Ours, commitment: bytes | None) -> DataKey:
        key = self._protector.unwrap_der(ours.der)
        if key is None:  # _ours found it in the keyring: the protector must too
            raise errors.KeyNotFoundError(f"key {ours.record.name!r} version {ours.version.version} is not "
                                          f"usable on token {self._protector.keyring.token.label!r}")
        if commitment is not None and not key.matches(commitment):
            key.wipe()
            raise errors.IntegrityError(_FAILED)
        return key

    def recipients(self, recipient_der: Sequence[bytes],
                   commitment: bytes | None) -> tuple[list[bytes], tuple[Move, ...], tuple[tuple[str, int], ...]]:
        """The new recipient list (DER), what moved, and what was current already.

        :class:`~keymgr.errors.RecipientNotFoundError` if no recipient is a key of this
        token; :class:`~keymgr.errors.PolicyError` if a stale one's version may not
        decrypt (retired, suspended ...), so it cannot be moved either.
        """
        found = [(der, self._ours(der)) for der in recipient_der]
        ours = [o for _, o in found if o is not None]
        if not ours:
            label = self._protector.keyring.token.label
            raise errors.RecipientNotFoundError(
                f"none of the {len(recipient_der)} recipients is a key of token {label!r}")
        primaries = {(o.record.name, o.version.version) for o in ours if o.version.version == o.record.primary}
        kept = tuple(sorted(primaries))
        result: list[bytes] = []
        moves: list[Move] = []
        for der, mine in found:
            if mine is None or mine.version.version == mine.record.primary:
                result.append(der)
                continue
            name, primary = mine.record.name, mine.record.primary
            dek = self._data_key(mine, commitment)
            try:
                if (name, primary) in primaries:
                    moves.append(Move(name, mine.version.version, primary, dropped=True))
                    continue
                result.append(self._protector.wrap_der(mine.record, dek))
                primaries.add((name, primary))
                moves.append(Move(name, mine.version.version, primary))
            finally:
                dek.wipe()
        return result, tuple(moves), kept

    def plan(self, kek_ids: Sequence[bytes]) -> tuple[Move, ...]:
        """What :meth:`recipients` would move for recipients naming ``kek_ids``, without a token
        call (a dry run): stale versions are state-checked (:class:`~keymgr.errors.PolicyError`)
        but nothing is unwrapped, so a tampered recipient shows only in the real run."""
        found = [f for f in (self._protector.find(k) for k in kek_ids) if f is not None]
        if not found:
            label = self._protector.keyring.token.label
            raise errors.RecipientNotFoundError(f"none of the envelope's key ids is a key of token {label!r}")
        primaries = {(record.name, record.primary) for record, version in found if version.version == record.primary}
        moves = []
        for record, version in found:
            if version.version != record.primary:
                self._protector.check_state(record, version)
                target = (record.name, record.primary)
                moves.append(Move(record.name, version.version, record.primary, dropped=target in primaries))
                primaries.add(target)
        return tuple(moves)

    def message(self, blob: bytes) -> RewrapResult:
        """Rewrap a CMS message (:func:`~keymgr.envelope.cms.replace_recipients`)."""
        data = bytes(blob)
        parsed = parse_message(data)
        new, moves, kept = self.recipients(parsed.recipient_infos.der, parsed.commitment)
        out = replace_recipients(data, new) if moves else data
        return RewrapResult("message", out, moves, kept)

    def stream_header(self, header: StreamHeader) -> RewrapResult:
        """A stream's new header (:func:`~keymgr.envelope.stream.replace_stream_recipients`); the
        segments after the old header follow the new one unchanged."""
        new, moves, kept = self.recipients(header.recipient_infos.der, header.commitment)
        out = replace_stream_recipients(header.raw, new) if moves else header.raw
        return RewrapResult("stream", out, moves, kept)

    def stream(self, src: BinaryIO, dst: BinaryIO) -> RewrapResult:
        """Read a stream's header from ``src``, write the new header and then every remaining
        byte of ``src`` to ``dst`` as it is (segments are copied, never opened)."""
        result = self.stream_header(read_stream_header(src))
        dst.write(result.data)
        shutil.copyfileobj(src, dst, _COPY_CHUNK)
        return result
