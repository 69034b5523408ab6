"""Threshold recipients: a message's data key that only M custodians together can recover.

For break-glass secrets (DESIGN.md, "Threshold recipient"): next to the usual
token-KEK recipient, a message gets one ``OtherRecipientInfo`` (RFC 5652
section 6.2.5) whose ``oriType`` is ``OID_THRESHOLD_RECIPIENT`` and whose
``oriValue`` is::

    ThresholdRecipient ::= SEQUENCE {
      version    INTEGER (1),
      id         OCTET STRING (16),          -- random, binds the shares to this recipient
      threshold  INTEGER (1..255),           -- M
      shares     SEQUENCE (1..16) OF SEQUENCE {
        custodian    UTF8String,             -- name, for the prompts and errors
        publicKey    OCTET STRING,           -- the custodian's SubjectPublicKeyInfo (DER)
        index        INTEGER (1..255),       -- Shamir x-coordinate
        commitment   OCTET STRING,           -- shamir.share_commitment under the share context
        sealed       OCTET STRING } }        -- CMS AuthEnvelopedData to the custodian (see _seal)

The data key (32 bytes) is split M-of-N with Shamir over GF(2^8); each share
is sealed to one custodian's token key and bound to its context (recipient
id, custodian fingerprint, index, M). Recovery needs no keyring, only the
message and M custodians' tokens: the public keys travel in the recipient.
The recovered key is still checked against the message's key commitment, so
M colluding custodians cannot substitute a key (DESIGN.md, envelope).

Costs: each share adds ~0.5-0.9 KiB (RSA-2048 more than P-256); recipients
are capped at 16 KiB (``recipients.MAX_RECIPIENT_BYTES``), hence N <= 16.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from asn1crypto import cms, core

from keymgr import errors
from keymgr._certs import kind_of, load_spki
from keymgr._memory import zero
from keymgr.custody import shamir
from keymgr.custody._shares import SealedShare, deal, open_checked, quorum_shortfall, wipe_shares
from keymgr.custody.custodian_token import CustodianToken
from keymgr.custody.custodians import Custodian, QuorumPolicy, Register
from keymgr.envelope._aead import DataKey
from keymgr.envelope._attrs import OID_THRESHOLD_RECIPIENT
from keymgr.envelope.cms import open_message
from keymgr.envelope.recipients import other_recipient_info, read_other_recipient, recipient_kind

__all__ = ["ThresholdRecipient", "QuorumUnwrapper", "decrypt_with_quorum", "read_threshold",
           "threshold_recipient", "MAX_SHARES"]

MAX_SHARES = 16


class _Slot(core.Sequence):  # type: ignore[misc]  # asn1crypto is untyped
    _fields = [("custodian", core.UTF8String), ("public_key", core.OctetString), ("index", core.Integer),
               ("commitment", core.OctetString), ("sealed", core.OctetString)]


class _Slots(core.SequenceOf):  # type: ignore[misc]
    _child_spec = _Slot


class _Value(core.Sequence):  # type: ignore[misc]
    _fields = [("version", core.Integer), ("id", core.OctetString), ("threshold", core.Integer),
               ("shares", _Slots)]


@dataclass(frozen=True)
class ThresholdInfo:
    """A parsed threshold recipient."""

    id: bytes
    threshold: int
    slots: tuple[SealedShare, ...]

    def context(self, slot: SealedShare) -> dict[str, str]:
        return {"purpose": "keymgr threshold share", "recipient": self.id.hex(), "custodian": slot.custodian.name,
                "fingerprint": slot.custodian.fingerprint, "index": str(slot.index), "threshold": str(self.threshold)}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.custodian.name for s in self.slots)


class ThresholdRecipient:
    """M of the given custodians, together, as one recipient of a message (see module docstring)."""

    def __init__(self, custodians: Sequence[Custodian], threshold: int) -> None:
        QuorumPolicy(threshold, tuple(c.name for c in custodians))  # checks M, N and unique names
        if len(custodians) > MAX_SHARES:
            raise errors.ConfigurationError(f"a threshold recipient has at most {MAX_SHARES} custodians")
        self._custodians = tuple(custodians)
        self._threshold = threshold

    @property
    def description(self) -> str:
        return f"any {self._threshold} of {', '.join(c.name for c in self._custodians)}"

    def __repr__(self) -> str:
        return f"ThresholdRecipient({self.description})"

    def wrap(self, dek: DataKey) -> cms.RecipientInfo:
        info = ThresholdInfo(os.urandom(16), self._threshold, ())
        dealt = deal(dek.reveal(), self._threshold, self._custodians, info.context)
        slots = [{"custodian": d.custodian.name, "public_key": d.custodian.public_key_der, "index": d.index,
                  "commitment": d.commitment, "sealed": d.sealed} for d in dealt]
        value = _Value({"version": 1, "id": info.id, "threshold": self._threshold, "shares": slots})
        return other_recipient_info(OID_THRESHOLD_RECIPIENT, value.dump())


def threshold_recipient(register: Register, *, key: str | None = None,
                        policy: QuorumPolicy | None = None) -> ThresholdRecipient:
    """The recipient for ``policy``, or for the quorum policy of ``key`` (else the keyring's)."""
    chosen = policy or register.policy_for(key)
    if chosen is None:
        raise errors.PolicyError("no quorum policy is set; set one with keymgr custodian policy")
    return ThresholdRecipient([register.custodian(n) for n in chosen.custodians], chosen.threshold)


def read_threshold(ri: cms.RecipientInfo) -> ThresholdInfo | None:
    """The threshold recipient in ``ri``; None for any other recipient. FormatError if malformed."""
    if recipient_kind(ri) != "ori":
        return None
    oid, value = read_other_recipient(ri)
    if oid != OID_THRESHOLD_RECIPIENT:
        return None
    what = "threshold recipient"
    try:
        parsed = _Value.load(value, strict=True)
        version, rid, threshold = parsed["version"].native, parsed["id"].native, parsed["threshold"].native
        raw_slots = [(s["custodian"].native, s["public_key"].native, s["index"].native, s["commitment"].native,
                      s["sealed"].native) for s in parsed["shares"]]
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError, UnicodeError):
        raise errors.FormatError(f"{what}: malformed") from None
    if version != 1 or len(rid) != 16 or not 1 <= len(raw_slots) <= MAX_SHARES or \
            not 1 <= threshold <= len(raw_slots):
        raise errors.FormatError(f"{what}: unsupported version or impossible sizes")
    slots = []
    for name, spki, index, commitment, sealed in raw_slots:
        if not isinstance(index, int) or not 1 <= index <= 255 or not 16 <= len(commitment) <= 64:
            raise errors.FormatError(f"{what}: impossible share")
        custodian = Custodian(name=name, kind=kind_of(load_spki(spki)), public_key_der=spki, certificate_der=b"")
        slots.append(SealedShare(custodian, index, commitment, sealed))
    if len({s.index for s in slots}) != len(slots) or len({s.custodian.name for s in slots}) != len(slots):
        raise errors.FormatError(f"{what}: a share index or custodian appears twice")
    return ThresholdInfo(rid, threshold, tuple(slots))


class QuorumUnwrapper:
    """The unwrap side: recovers the data key of a threshold recipient from the custodians' tokens."""

    def __init__(self, tokens: Sequence[CustodianToken]) -> None:
        self._tokens = tuple(tokens)
        #: names of the custodians whose shares were used, after a successful unwrap
        self.used: tuple[str, ...] = ()

    def unwrap(self, ri: cms.RecipientInfo) -> DataKey | None:
        info = read_threshold(ri)
        if info is None:
            return None
        by_fingerprint = {s.custodian.fingerprint: s for s in info.slots}
        shares: list[shamir.Share] = []
        used: list[str] = []
        try:
            for token in self._tokens:
                slot = by_fingerprint.get(hashlib.sha256(token.custodian.public_key_der).hexdigest())
                if slot is None:
                    raise errors.PolicyError(f"custodian {token.custodian.name!r} holds no share of this message "
                                             f"(its custodians: {', '.join(info.names)})")
                if slot.custodian.name in used:
                    continue
                holder = CustodianToken(slot.custodian, token.ts, token.ref)
                shares.append(open_checked(holder, slot, info.context(slot), kept_in="the message"))
                used.append(slot.custodian.name)
            if len(used) < info.threshold:
                raise errors.PolicyError(quorum_shortfall("this message", info.threshold, info.names, used))
            secret = bytearray(shamir.combine(shares, info.threshold))
            try:
                if len(secret) != 32:
                    raise errors.IntegrityError("the recovered data key is not authentic")
                self.used = tuple(used)
                return DataKey(secret)
            finally:
                zero(secret)
        finally:
            wipe_shares(shares)


def decrypt_with_quorum(blob: bytes, tokens: Sequence[CustodianToken], *,
                        context: Mapping[str, str] | None = None) -> bytes:
    """Decrypt a message through its threshold recipient with M custodians' tokens."""
    return open_message(bytes(blob), unwrap=QuorumUnwrapper(tokens).unwrap, context=context)
