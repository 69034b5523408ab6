"""The gate in front of operations that destroy, export, or change who guards keys.

:func:`authorize` is what an operation calls before it acts: with a quorum
policy covering the key it demands a request and M valid approvals
(:func:`~keymgr.custody.approvals.check_quorum`) and consumes the request, so
it cannot be used twice; without a policy it returns ``None`` and the caller
keeps its own safeguard (an explicit confirmation). :func:`change_policy`
puts policy changes behind the same gate: the *current* policy must approve
its own replacement, so no single person can weaken it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from keymgr import errors, interrupts
from keymgr.custody.approvals import Approval, Request, check_quorum
from keymgr.custody.custodians import KEYRING_SCOPE, CustodyRegister, QuorumPolicy, Register
from keymgr.custody.transcript import TranscriptRecorder, hsm_signer, sign_transcript
from keymgr.keyring.store import KeyRecord, Keyring

__all__ = ["Authorization", "authorize", "authorize_destroy", "change_policy", "ceremony_transcript",
           "key_ceremony_transcript"]


@dataclass(frozen=True)
class Authorization:
    """Who approved an operation, and under which request."""

    request_digest: str
    expires: str
    approvers: tuple[str, ...]
    register: Register

    def consume(self, keyring: Keyring) -> None:
        """Spend the request: the same request and approvals are refused from now on."""
        CustodyRegister(keyring).consume(self.request_digest, self.expires)

    def record(self, recorder: TranscriptRecorder) -> None:
        recorder.details["request"] = self.request_digest
        for name in self.approvers:
            recorder.participant("approver", name, self.register.custodian(name).fingerprint)


def authorize(keyring: Keyring, operation: str, *, key: str | None, params: Mapping[str, Any],
              request: Request | None, approvals: Sequence[Approval], consume: bool = True) -> Authorization | None:
    """Check and (unless ``consume=False``: the caller then calls :meth:`Authorization.consume`
    once the operation cannot fail for want of something a retry could supply, such as a PIN)
    consume the approvals for ``operation``; None when no quorum policy applies."""
    store = CustodyRegister(keyring)
    register = store.load()
    scope = key if operation != "set-policy" else (None if params.get("scope") == KEYRING_SCOPE else
                                                   params.get("scope"))
    policy = register.policy_for(scope)
    if policy is None:
        return None
    if request is None:
        target = f" {key}" if key else ""
        command = {"destroy": f"destroy{target} --version N", "backup": f"backup{target}",
                   "set-policy": "policy M"}.get(operation, operation)
        raise errors.PolicyError(f"{operation}{target} needs approvals by {policy.describe()}: write a request "
                                 f"(keymgr request {command} -o REQ) and have it approved (keymgr approve REQ)")
    approvers = check_quorum(request, approvals, register, operation=operation, token=keyring.token, key=key,
                             params=params, record=keyring.get(key) if key is not None else None)
    auth = Authorization(request.digest, request.expires, approvers, register)
    if consume:
        auth.consume(keyring)
    return auth


def authorize_destroy(keyring: Keyring, name: str, versions: Sequence[int], *, request: Request | None = None,
                      approvals: Sequence[Approval] = (), confirmed: bool = False,
                      consume: bool = True) -> Authorization | None:
    """The gate of ``key destroy``: M approvals where a quorum policy covers the key (consumed
    here unless ``consume=False``); otherwise the caller's explicit confirmation (``confirmed``)."""
    auth = authorize(keyring, "destroy", key=name, params={"versions": sorted(set(versions))}, request=request,
                     approvals=approvals, consume=consume)
    if auth is None and not confirmed:
        raise errors.PolicyError(f"destroying key {name!r} version(s) {', '.join(map(str, sorted(versions)))} "
                                 "cannot be undone: confirm it explicitly (--yes)")
    return auth


def change_policy(keyring: Keyring, policy: QuorumPolicy | None, *, key: str | None = None,
                  request: Request | None = None, approvals: Sequence[Approval] = ()) -> tuple[Register, bytes]:
    """Set (or remove) a quorum policy, approved under the current one; returns the register and transcript.

    The transcript is signed first; then, signals held (:mod:`keymgr.interrupts`), the approvals
    are spent and the register written (the commit): an interrupt before changes nothing."""
    scope = KEYRING_SCOPE if key is None else key
    params = {"scope": scope, "policy": None if policy is None else policy.to_json()}
    with interrupts.commit_scope():
        auth = authorize(keyring, "set-policy", key=None, params=params, request=request, approvals=approvals,
                         consume=False)
        store = CustodyRegister(keyring)
        if policy is not None:
            for name in policy.custodians:
                store.load().custodian(name)  # an unknown name is refused before anything is signed
        recorder = TranscriptRecorder("set-policy", keyring.token.label, keyring.token.serial)
        if auth is not None:
            auth.record(recorder)
        recorder.step("quorum policy set", scope=scope, policy=params["policy"])
        transcript = ceremony_transcript(keyring, recorder, "success")
        interrupts.hold_signals()
        spent = None if auth is None else (auth.request_digest, auth.expires)
        return store.set_policy(policy, key=key, spend=spent), transcript


def ceremony_transcript(keyring: Keyring, recorder: TranscriptRecorder, outcome: str) -> bytes:
    """Sign a finished ceremony with the keyring's HSM (b"" if the token cannot sign)."""
    signer = hsm_signer(keyring.token)
    return sign_transcript(recorder.finish(outcome), [signer]) if signer is not None else b""


def key_ceremony_transcript(keyring: Keyring, ceremony: str, record: KeyRecord, *,
                            versions: Sequence[int] | None = None, auth: Authorization | None = None,
                            outcome: str = "success", **details: Any) -> bytes:
    """The signed transcript of a ceremony on one key (create, rotate, destroy): who approved it,
    which versions with their ids and key check values, and the outcome."""
    recorder = TranscriptRecorder(ceremony, keyring.token.label, keyring.token.serial)
    if auth is not None:
        auth.record(recorder)
    recorder.details.update(details)
    for v in record.versions:
        if versions is None or v.version in versions:
            recorder.key(record.name, v.version, v.key_id, v.kcv, state=v.state)
    recorder.step(f"{ceremony} key {record.name!r}", versions=sorted(versions) if versions else None)
    return ceremony_transcript(keyring, recorder, outcome)
