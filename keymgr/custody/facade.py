"""Custody as one KeyManager's token offers it: ``km.custody``, the safe face of this package.

The functions of :mod:`keymgr.custody` take a :class:`~keymgr.keyring.store.Keyring`, which can also
rewrite key states with no check and no audit entry; a KeyManager keeps its keyring private and
hands out a :class:`Custody` instead. Every change here (custodian added or removed, quorum
policy set) is recorded in the manager's audit log as its own methods are, by this module
rather than by the caller; every call is refused once the manager is closed; approvals are only
checked here, never spent: the operation they approve (backup, destroy, policy) spends them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from keymgr import errors
from keymgr.custody.approvals import DEFAULT_TTL, Approval, Request, request_for
from keymgr.custody.authorize import authorize, change_policy, key_ceremony_transcript
from keymgr.custody.custodians import Custodian, CustodyRegister, QuorumPolicy, Register

if TYPE_CHECKING:
    from keymgr.audit import Operation
    from keymgr.custody.threshold import ThresholdRecipient
    from keymgr.keyring.store import KeyRecord, Keyring

__all__ = ["Custody"]


def _expect(value: object, kind: type, what: str) -> None:
    """A ConfigurationError naming ``what`` when ``value`` is not a ``kind`` (True is no int here):
    a caller's wrong argument ends in keymgr's own error, never an AttributeError from deep inside."""
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise errors.ConfigurationError(f"{what} must be {kind.__name__}, not {type(value).__name__}")


#: ``audited(op, key=..., detail=...)``: the manager's one audit helper
Audited = Callable[..., "Operation"]


class Custody:
    """Custodians, quorum policies, requests, threshold recipients and key ceremony
    transcripts of one KeyManager's token (``km.custody``; docs/ceremonies.md)."""

    def __init__(self, keyring: Callable[[], Keyring], audited: Audited) -> None:
        """``keyring`` returns the manager's keyring or raises once it is closed; ``audited``
        records an operation in the manager's audit log."""
        self._keyring = keyring
        self._audited = audited

    def __repr__(self) -> str:
        return "Custody()"

    # -- reading --------------------------------------------------------------------------

    def register(self) -> Register:
        """The registered custodians and quorum policies, verified (MACed in the token)."""
        return CustodyRegister(self._keyring()).load()

    def custodians(self) -> tuple[Custodian, ...]:
        """The registered custodians, in the order they were added."""
        return self.register().custodians

    def quorum_policy(self, threshold: int, custodians: Sequence[str] | None = None) -> QuorumPolicy:
        """An M-of-N policy of ``threshold`` among ``custodians`` (default: every registered one),
        to pass to :meth:`set_policy` or to a request for it; nothing is written."""
        _expect(threshold, int, "threshold")
        if custodians is not None and (isinstance(custodians, str) or not all(isinstance(c, str) for c in custodians)):
            raise errors.ConfigurationError("custodians is a list of custodian names")
        names = tuple(custodians) if custodians else tuple(c.name for c in self.custodians())
        return QuorumPolicy(threshold, names)

    # -- changes, audited ---------------------------------------------------------------------

    def add_custodian(self, custodian: Custodian) -> Register:
        """Register ``custodian`` (from :func:`keymgr.custody.enroll_custodian`); audited."""
        _expect(custodian, Custodian, "custodian (enroll_custodian makes one)")
        detail = {"custodian": custodian.name, "fingerprint": custodian.fingerprint[:64]}
        with self._audited("custodian-add", detail=detail):
            return CustodyRegister(self._keyring()).add(custodian)

    def remove_custodian(self, name: str) -> Register:
        """Remove custodian ``name`` (refused while a quorum policy names them); audited."""
        _expect(name, str, "a custodian name")
        with self._audited("custodian-remove", detail={"custodian": name}):
            return CustodyRegister(self._keyring()).remove(name)

    def set_policy(self, policy: QuorumPolicy | None, *, key: str | None = None, request: Request | None = None,
                   approvals: Sequence[Approval] = ()) -> tuple[Register, bytes]:
        """Set (``None``: remove) the quorum policy of ``key`` or of the whole keyring, approved
        under the policy in force (:func:`keymgr.custody.authorize.change_policy`); returns the
        register and the signed transcript (b"" when the token cannot sign); audited."""
        if policy is not None:
            _expect(policy, QuorumPolicy, "policy (quorum_policy makes one)")
        if request is not None:
            _expect(request, Request, "request")
        detail = None if policy is None else {"threshold": policy.threshold,
                                              "custodians": ",".join(policy.custodians)[:200]}
        with self._audited("policy", key=key, detail=detail):
            return change_policy(self._keyring(), policy, key=key, request=request, approvals=approvals)

    # -- requests and approvals ---------------------------------------------------------------

    def request(self, operation: str, *, key: str | None, params: Mapping[str, Any],
                ttl: timedelta = DEFAULT_TTL, requested_by: str = "") -> Request:
        """A new request for ``operation``, showing its approvers the quorum and the key versions
        (:func:`keymgr.custody.approvals.request_for`). Nothing is written to the token."""
        _expect(operation, str, "operation")
        _expect(params, Mapping, "params")
        _expect(ttl, timedelta, "ttl")
        return request_for(self._keyring(), operation, key=key, params=params, ttl=ttl, requested_by=requested_by)

    def check_approvals(self, operation: str, *, key: str | None, params: Mapping[str, Any],
                        request: Request | None, approvals: Sequence[Approval]) -> bool:
        """Whether a quorum policy covers ``operation``; if one does, its approvals are checked
        (a missing or bad one raises :class:`~keymgr.errors.PolicyError`) but not spent, so a
        caller can refuse before asking anyone for a PIN."""
        _expect(params, Mapping, "params")
        return authorize(self._keyring(), operation, key=key, params=params, request=request, approvals=approvals,
                         consume=False) is not None

    # -- recipients and transcripts -----------------------------------------------------------

    def threshold_recipient(self, key: str | None = None) -> ThresholdRecipient:
        """A recipient that M custodians of ``key``'s quorum (else the keyring's) open together."""
        from keymgr.custody.threshold import threshold_recipient

        return threshold_recipient(self.register(), key=key)

    def key_transcript(self, ceremony: str, record: KeyRecord, *, versions: Sequence[int] | None = None,
                       **details: Any) -> bytes:
        """The signed transcript of a change to one key (``create``, ``rotate``): its versions'
        ids and key check values, signed by the HSM (b"" when it cannot sign)."""
        from keymgr.keyring.facts import KeyRecord as Record

        _expect(record, Record, "record (km.describe_key gives one)")
        return key_ceremony_transcript(self._keyring(), ceremony, record, versions=versions, **details)
