"""The M-of-N share path: deal a secret to custodians, and take their shares back, checked.

Both places that split a secret among custodians go through here: a backup's
transport key (:mod:`keymgr.custody.ceremony`) and a message's data key
(:mod:`keymgr.custody.threshold`). Each says what a share is bound to (its
*context*: which backup or message, which custodian's key, which index) and
where the shares are kept; the cryptography is this module's alone:

* :func:`deal`: split M-of-N with Shamir (:mod:`keymgr.custody.shamir`), seal each
  share to its custodian's token key under its context (:mod:`keymgr.custody._seal`),
  and keep beside it a commitment to the share under the same context, so that a
  share that opens but is not the one dealt is named, not interpolated into a wrong
  secret. Host copies of the shares are wiped.
* :func:`open_checked`: open one custodian's share with their token and check it
  against its index and commitment; a damaged or replaced share is an
  :class:`~keymgr.errors.IntegrityError` naming the custodian, and nothing else.
* :func:`quorum_shortfall`: the one message for a quorum that is not met.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from keymgr import errors
from keymgr._memory import zero
from keymgr.custody import shamir
from keymgr.custody._seal import open_share, seal_share
from keymgr.custody.custodian_token import CustodianToken
from keymgr.custody.custodians import Custodian

__all__ = ["SealedShare", "deal", "open_checked", "quorum_shortfall", "wipe_shares"]


@dataclass(frozen=True)
class SealedShare:
    """One custodian's place: who, which share (its Shamir index), the commitment to it, the sealed share.
    A backup file keeps these as ``ShareSlot``; a threshold recipient in its ``oriValue``."""

    custodian: Custodian
    index: int
    commitment: bytes = field(repr=False)
    sealed: bytes = field(repr=False)


def _context_bytes(context: Mapping[str, str]) -> bytes:
    """The context as the commitment binds it: ``key=value`` NUL-terminated, keys sorted."""
    return "".join(f"{k}={v}\x00" for k, v in sorted(context.items())).encode("utf-8")


def deal(secret: bytes | bytearray, threshold: int, custodians: Sequence[Custodian],
         context_of: Callable[[SealedShare], Mapping[str, str]]) -> list[SealedShare]:
    """Split ``secret`` ``threshold``-of-``len(custodians)``, one share sealed to each custodian in order,
    bound to ``context_of(place)`` (``place``: the custodian and index, not yet sealed)."""
    shares = shamir.split(bytes(secret), threshold, len(custodians))
    try:
        dealt = []
        for custodian, share in zip(custodians, shares, strict=True):
            context = context_of(SealedShare(custodian, share.index, b"", b""))
            raw = bytearray(share.to_bytes())
            try:
                dealt.append(SealedShare(custodian, share.index,
                                         shamir.share_commitment(share, context=_context_bytes(context)),
                                         seal_share(custodian, raw, context)))
            finally:
                zero(raw)
        return dealt
    finally:
        wipe_shares(shares)


def open_checked(token: CustodianToken, slot: SealedShare, context: Mapping[str, str], *, kept_in: str) -> shamir.Share:
    """Open ``slot``'s share with ``token`` and check it against its index and commitment.
    ``kept_in`` names where the commitment is kept (``"the backup"``), for the error."""
    name = slot.custodian.name
    raw = open_share(token, slot.sealed, context)
    try:
        share = shamir.Share.from_bytes(bytes(raw))
    except errors.KeymgrError:
        raise errors.IntegrityError(f"the share of custodian {name!r} is damaged") from None
    finally:
        zero(raw)
    if share.index != slot.index or not shamir.verify_share(share, slot.commitment, _context_bytes(context)):
        share.wipe()
        raise errors.IntegrityError(f"the share of custodian {name!r} does not match its commitment in {kept_in}: "
                                    "it was altered or replaced")
    return share


def quorum_shortfall(what: str, threshold: int, custodians: Iterable[str], took: Sequence[str]) -> str:
    """Why ``what`` (``"this backup"``) was refused: fewer than ``threshold`` of its custodians took part."""
    return (f"{what} needs {threshold} of its custodians ({', '.join(custodians)}); "
            f"only {len(took)} took part ({', '.join(took) or 'none'})")


def wipe_shares(shares: Iterable[shamir.Share]) -> None:
    """Zero every share's value (host copies of a secret's shares do not outlive their use)."""
    for share in shares:
        share.wipe()
