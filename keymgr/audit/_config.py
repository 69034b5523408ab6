"""Where the audit log goes when the caller does not say: the choice, in one place.

* ``KEYMGR_AUDIT_LOG`` names the file (``off``, ``none`` or empty: no audit log);
* otherwise a KeyManager on the embedded local token logs to ``$KEYMGR_HOME/audit.log``,
  beside the token's own files (its checkpoint lives in that token);
* otherwise (a token named by URI: every production HSM) the log is per user and per
  token, ``$XDG_STATE_HOME/keymgr/audit/<token serial>.log`` (``~/.local/state/...``), and
  keymgr says so on standard error the first time it creates it. Each host of a fleet so
  keeps its own log of the shared token (docs/audit.md, "Many hosts").

Turning the log off (``audit=False``, ``KEYMGR_AUDIT_LOG=off``) is itself recorded: one
``audit-off`` entry in the default log of that token (:func:`record_audit_off`).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from keymgr import errors
from keymgr.audit._log import AuditLog
from keymgr.audit._operation import Operation
from keymgr.hsm.sessions import TokenSession

__all__ = ["default_log_path", "token_log_path", "resolve_audit", "standalone_operation", "record_audit_off",
           "audit_is_off", "ENV_VAR"]

ENV_VAR = "KEYMGR_AUDIT_LOG"
_OFF = ("", "off", "none", "0", "false")


def default_log_path(*, local: bool) -> Path | None:
    """The log file a KeyManager uses when given no ``audit=`` (module docstring), or None."""
    configured = os.environ.get(ENV_VAR)
    if configured is not None:
        return None if configured.strip().lower() in _OFF else Path(configured).expanduser()
    if local:
        from keymgr.hsm.local import keymgr_home

        return keymgr_home() / "audit.log"
    return None


def audit_is_off(audit: object) -> bool:
    """Whether ``audit=`` (or, for None, the environment) turns auditing off."""
    if audit is False:
        return True
    configured = os.environ.get(ENV_VAR)
    return audit is None and configured is not None and configured.strip().lower() in _OFF


def token_log_path(serial: str, label: str) -> Path:
    """The default log of a token named by URI: per user, per token (by serial)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", serial.strip() or label.strip() or "token")[:64]
    return Path(base) / "keymgr" / "audit" / f"{name}.log"


def default_token_log(ts: TokenSession) -> AuditLog:
    """The AuditLog of a URI-named token given no ``audit=``; one notice when it is first made."""
    path = token_log_path(ts.serial, ts.label)
    if not path.exists():
        print(f"keymgr: audit log of token {ts.label!r} (serial {ts.serial}): {path} (first use; "
              f"{ENV_VAR} or audit= choose another place; docs/audit.md)", file=sys.stderr)
    return AuditLog(path, token=ts)


def record_audit_off(ts: TokenSession, *, local: bool, why: str) -> None:
    """Leave one ``audit-off`` entry in the token's default log: turning auditing off is recorded."""
    path = token_log_path(ts.serial, ts.label) if not local else None
    if local:
        from keymgr.hsm.local import keymgr_home

        path = keymgr_home() / "audit.log"
    assert path is not None
    try:
        with AuditLog(path, token=ts) as log:
            log.record("audit-off", detail={"by": why})
    except errors.KeymgrError as exc:
        print(f"keymgr: warning: auditing is off, and that could not be recorded in {path}: {exc}", file=sys.stderr)


def resolve_audit(audit: AuditLog | str | os.PathLike[str] | bool | None, *, local: bool) -> AuditLog | None:
    """The AuditLog for a KeyManager's ``audit=`` argument: an AuditLog as given, a path,
    ``False`` for none, ``True`` for the default location (which must exist), None for the
    default if there is one."""
    if audit is False:
        return None
    if isinstance(audit, AuditLog):
        return audit
    if isinstance(audit, (str, os.PathLike)):
        return AuditLog(audit)
    if audit is None or audit is True:
        path = default_log_path(local=local)
        if path is None:
            if audit is True:
                raise errors.ConfigurationError(
                    f"audit=True, but this token has no default audit log: pass a path or set {ENV_VAR}")
            return None
        return AuditLog(path)
    raise errors.ConfigurationError("audit= takes an AuditLog, a path, True, False or None")


@contextmanager
def standalone_operation(op: str, *, local: bool, key: str | None = None,
                         detail: Mapping[str, Any] | None = None) -> Iterator[Operation | None]:
    """Record one operation done without a KeyManager (a custodian signing an approval on
    their own token) in the default log, if there is one. Its entry carries no MAC: the
    custodian's token is not the one whose audit key the log's verifier holds; the next
    MACed entry covers it through the chain."""
    log = resolve_audit(None, local=local)
    if log is None:
        yield None
        return
    with log, log.operation(op, key=key, detail=detail) as operation:
        yield operation
