"""keymgr.custody: dual control of long-term keys (DESIGN.md, "Dual control").

- :mod:`~keymgr.custody.custodians`: custodians (a key pair on their own token) and
  M-of-N quorum policies, registered in the HSM and MACed there;
- :mod:`~keymgr.custody.custodian_token`: a custodian's token: registering its key, using it;
- :mod:`~keymgr.custody.shamir`: Shamir secret sharing over GF(2^8);
- :mod:`~keymgr.custody.approvals`: canonical requests and custodians' signed approvals;
- :mod:`~keymgr.custody.request_shows`: what a request shows its approvers (quorum keys,
  key versions by CKA_ID and KCV), checked against the keyring when it is used;
- :mod:`~keymgr.custody.authorize`: the gate that checks and consumes approvals;
- :mod:`~keymgr.custody.ceremony` and :mod:`~keymgr.custody.backup_file`: backup to M-of-N
  custodians and restore into another HSM;
- :mod:`~keymgr.custody.threshold`: message recipients only M custodians together can open;
- :mod:`~keymgr.custody.transcript`: signed ceremony transcripts (CMS SignedData);
- :mod:`~keymgr.custody.facade`: :class:`Custody`, all of the above as one KeyManager's token
  offers it (``km.custody``): changes audited, the keyring never handed out.

The runbook for people is docs/ceremonies.md.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> module; imported on first use (PEP 562), so ``keymgr custodian list`` does not
#: load the sharing, sealing and CMS code it never runs
_EXPORTS = {
    "Approval": "approvals", "Request": "approvals", "approve": "approvals", "check_quorum": "approvals",
    "make_request": "approvals", "request_for": "approvals",
    "Authorization": "authorize", "authorize": "authorize", "change_policy": "authorize",
    "BackupFile": "backup_file", "Custody": "facade",
    "BackupResult": "ceremony", "RestoreResult": "ceremony", "backup_keys": "ceremony",
    "open_custodian": "ceremony", "restore_keys": "ceremony",
    "Custodian": "custodians", "CustodianToken": "custodian_token", "CustodyRegister": "custodians",
    "QuorumPolicy": "custodians", "Register": "custodians", "enroll_custodian": "custodian_token",
    "QuorumUnwrapper": "threshold", "ThresholdRecipient": "threshold", "decrypt_with_quorum": "threshold",
    "threshold_recipient": "threshold",
    "VerifiedTranscript": "transcript", "verify_transcript": "transcript",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'keymgr.custody' has no attribute {name!r}")
    return getattr(importlib.import_module(f"keymgr.custody.{module}"), name)


__all__ = [
    "Approval",
    "Authorization",
    "BackupFile",
    "BackupResult",
    "Custodian",
    "CustodianToken",
    "Custody",
    "CustodyRegister",
    "QuorumPolicy",
    "QuorumUnwrapper",
    "Register",
    "Request",
    "RestoreResult",
    "ThresholdRecipient",
    "VerifiedTranscript",
    "approve",
    "authorize",
    "backup_keys",
    "change_policy",
    "check_quorum",
    "decrypt_with_quorum",
    "enroll_custodian",
    "make_request",
    "open_custodian",
    "request_for",
    "restore_keys",
    "threshold_recipient",
    "verify_transcript",
]
