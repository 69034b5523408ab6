"""The audit log's token side: its MAC key and its checkpoints.

* The **audit key** is an HMAC-SHA256 key generated inside the token from
  :data:`keymgr.hsm.templates.MAC_KEY` (sensitive, non-extractable, sign/verify only),
  under its own label and CKA_ID, apart from the keyring's metadata MAC key: the
  two keys authenticate different things and a MAC made for one is never valid
  for the other (besides their domain strings).
* A **checkpoint** is a token register (:mod:`keymgr.hsm.registers`) per log
  chain holding ``"<seq> <entry hash>"`` of the newest entry checkpointed. A
  file editor without the PIN cannot change it, so cutting entries off the end
  of a log is detected by :func:`keymgr.audit.verify_log`.

Whoever holds the user PIN can use the audit key and rewrite the checkpoint:
the log proves that the file was not edited by someone without the token,
not that the token's users are honest (docs/audit.md, "What verify proves").
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from keymgr import errors
from keymgr.hsm import objects, registers
from keymgr.hsm.sessions import TokenSession
from keymgr.hsm.templates import MAC_KEY

__all__ = ["AuditKey", "AUDIT_KEY_ID", "AUDIT_KEY_LABEL", "REGISTER_PREFIX", "LOG_PREFIX", "LogRegistration"]

AUDIT_KEY_ID = b"keymgr/audit-mac"
AUDIT_KEY_LABEL = "keymgr/audit-mac"
#: Checkpoint registers are named ``keymgr-audit/<chain id>``.
REGISTER_PREFIX = "keymgr-audit/"
#: Every log file a token has seen: ``keymgr-audit-log/<hash of host and path>`` holds
#: ``{"chain", "host", "path"}``, written when the log's chain starts.
LOG_PREFIX = "keymgr-audit-log/"

_CHECKPOINT = re.compile(r"^([1-9][0-9]{0,18}) ([0-9a-f]{64})$")


class AuditKey:
    """The audit MAC key and the checkpoints of one token (a thin wrapper, no state but a flag)."""

    def __init__(self, ts: TokenSession) -> None:
        self._ts = ts
        self._keys: list[bytes] | None = None  # usable audit keys, lowest first (the one that MACs)
        self._unsupported = False

    @property
    def token(self) -> TokenSession:
        return self._ts

    def _ensure(self) -> bool:
        """Find or make the audit key. Two hosts opening a fresh token at once may each make one
        (no create-if-absent in PKCS#11): both stay valid for checking, and every writer MACs with
        the lowest CKA_ID (:func:`keymgr.hsm.objects.ensure_singleton_key`)."""
        if self._keys is None and not self._unsupported:
            try:
                self._keys = objects.ensure_singleton_key(self._ts, MAC_KEY, label=AUDIT_KEY_LABEL,
                                                          id_prefix=AUDIT_KEY_ID)
            except errors.MechanismUnsupportedError:
                self._unsupported = True  # e.g. a TPM: RSA / EC keys only; asked once per process
                return False
        return self._keys is not None

    def mac(self, data: bytes) -> str | None:
        """HMAC-SHA256 of ``data`` inside the token, hex, or None for a token that cannot hold an
        HMAC key (its entries are then protected by the checkpoint's hash alone). The key is made
        on first use, so a token is only given an audit key once something is audited on it."""
        if not self._ensure() or self._keys is None:
            return None
        return objects.hmac_sha256(self._ts, self._keys[0], data).hex()

    def verify(self, data: bytes, mac_hex: str) -> bool:
        """Whether ``mac_hex`` is one of the audit keys' MAC of ``data`` (the token compares)."""
        try:
            mac = bytes.fromhex(mac_hex)
        except ValueError:
            return False
        keys = objects.singleton_keys(self._ts, AUDIT_KEY_LABEL) if self._keys is None else self._keys
        if any(objects.hmac_sha256_verify(self._ts, key_id, data, mac) for key_id in keys):
            return True
        fresh = objects.singleton_keys(self._ts, AUDIT_KEY_LABEL)  # made by another host since
        return any(objects.hmac_sha256_verify(self._ts, key_id, data, mac) for key_id in fresh if key_id not in keys)

    def checkpoint(self, chain: str) -> tuple[int, str] | None:
        """The token's checkpoint of ``chain``: (seq, entry hash), or None if it has none."""
        value = registers.read_register(self._ts, REGISTER_PREFIX + chain)
        return None if value is None else _parse(chain, value)

    def set_checkpoint(self, chain: str, seq: int, digest: str) -> None:
        registers.write_register(self._ts, REGISTER_PREFIX + chain, f"{seq} {digest}")

    # -- the logs a token has seen --------------------------------------------------------

    @staticmethod
    def _log_register(host: str, path: str) -> str:
        return LOG_PREFIX + hashlib.sha256(f"{host}\x00{path}".encode()).hexdigest()[:32]

    def registered_chain(self, host: str, path: str) -> str | None:
        """The chain the token recorded for the log at ``path`` on ``host``, or None."""
        value = registers.read_register(self._ts, self._log_register(host, path))
        return None if value is None else _registration(value).chain

    def register_log(self, host: str, path: str, chain: str) -> None:
        """Record that ``chain`` is the log at ``path`` on ``host`` (when its first entry is written)."""
        value = json.dumps({"chain": chain, "host": host[:128], "path": path[-700:]}, sort_keys=True)
        registers.write_register(self._ts, self._log_register(host, path), value)

    def forget_log(self, host: str, path: str) -> None:
        """Drop the registration of ``path`` (``keymgr audit repair``: the log starts a new chain)."""
        registers.write_register(self._ts, self._log_register(host, path), json.dumps({"chain": None}))

    def logs(self) -> list[LogRegistration]:
        """Every log this token has registered (one per host and path)."""
        found = registers.list_registers(self._ts, LOG_PREFIX)
        return [reg for value in found.values() if (reg := _registration(value)).chain is not None]

    def checkpoints(self) -> dict[str, tuple[int, str]]:
        """Every chain this token holds a checkpoint for: chain id -> (seq, entry hash)."""
        found = registers.list_registers(self._ts, REGISTER_PREFIX)
        return {name[len(REGISTER_PREFIX):]: _parse(name, value) for name, value in found.items()}


@dataclass(frozen=True)
class LogRegistration:
    """One log file a token knows: its chain, and the host and path it was written at."""

    chain: str | None
    host: str
    path: str


def _registration(value: str) -> LogRegistration:
    try:
        data = json.loads(value)
        chain = data.get("chain")
        if chain is not None and not re.fullmatch(r"[0-9a-f]{32}", str(chain)):
            raise ValueError("chain")
        return LogRegistration(chain, str(data.get("host", "")), str(data.get("path", "")))
    except (ValueError, AttributeError, TypeError):
        raise errors.IntegrityError("a log registration on the token is not well-formed") from None


def _parse(chain: str, value: str) -> tuple[int, str]:
    match = _CHECKPOINT.match(value)
    if match is None:
        raise errors.IntegrityError(f"the token's audit checkpoint for chain {chain} is not well-formed")
    return int(match.group(1)), match.group(2)
