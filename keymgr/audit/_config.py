"""Where the audit log goes when the caller does not say: the choice, in one place.

* ``KEYMGR_AUDIT_LOG`` names the file (``off``, ``none`` or empty: no audit log);
* otherwise a KeyManager on the embedded local token logs to ``$KEYMGR_HOME/audit.log``,
  beside the token's own files (its checkpoint lives in that token);
* otherwise (a token named by URI) there is no default file: such tokens are shared by
  many processes and machines, whose operators choose where their logs go (a path, a
  ``logging`` logger, syslog). docs/audit.md, "Where the log goes".
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from keymgr import errors
from keymgr.audit._log import AuditLog
from keymgr.audit._operation import Operation

__all__ = ["default_log_path", "resolve_audit", "standalone_operation", "ENV_VAR"]

ENV_VAR = "KEYMGR_AUDIT_LOG"
_OFF = ("", "off", "none", "0", "false")


def default_log_path(*, local: bool) -> Path | None:
    """The log file a KeyManager uses when given no ``audit=`` (module docstring), or None."""
    configured = os.environ.get(ENV_VAR)
    if configured is not None:
        return None if configured.strip().lower() in _OFF else Path(configured).expanduser()
    if local:
        from keymgr.local import keymgr_home

        return keymgr_home() / "audit.log"
    return None


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
