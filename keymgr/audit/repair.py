"""Starting a damaged audit log again, on the record (``keymgr audit repair``; docs/audit.md).

A log that lost entries (cut off, rolled back, deleted) fails verification, and the
writer refuses to append to it (:class:`keymgr.audit.AuditLog`): silently starting a
new file would hide the loss. :func:`repair_log` is the deliberate way on. The damaged
file is kept beside the log as ``LOG.cut-TIME`` (it still fails verification, so the
loss stays visible), the token forgets which chain the log's path had, and the new
log's first entry, MACed by the token's audit key, is an ``audit-repair`` entry naming
the old chain, where it ended and where the token's checkpoint was: the verifier of
the new log, or of a fleet's logs, reports the old chain as acknowledged, not missing.

A library function, not the CLI's own code, so that every program that repairs a log
writes the same entry, and only after the same checks.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from keymgr import errors
from keymgr.audit._log import AuditLog
from keymgr.audit._token import AuditKey
from keymgr.audit.verify import VerifyReport, verify_log
from keymgr.hsm.sessions import TokenSession

__all__ = ["Repair", "repair_log"]


@dataclass(frozen=True)
class Repair:
    """What :func:`repair_log` did: the log started again, and where its old file was kept
    (None when there was no old file: the log was deleted or emptied)."""

    path: Path
    moved_to: Path | None


def repair_log(path: str | os.PathLike[str], token: TokenSession, *,
               confirm: Callable[[], bool] | None = None) -> Repair:
    """Acknowledge that the log at ``path`` lost entries and start it again (module docstring).

    ``token`` holds the log's audit key and checkpoints. A log that verifies, or a missing
    one the token never checkpointed, has nothing to repair: :class:`~keymgr.errors.PolicyError`,
    and nothing is changed. ``confirm`` is asked once the repair is known to be needed and
    before anything changes; False is a PolicyError and nothing is changed.
    """
    path = Path(path)
    key = AuditKey(token)
    host, real = (socket.gethostname() or "unknown")[:255], os.path.realpath(path)
    report = verify_log(path, token=token) if path.exists() and path.stat().st_size else None
    lost = key.registered_chain(host, real)
    lost_point = key.checkpoint(lost) if lost is not None else None
    if (report is not None and report.ok) or (report is None and lost_point is None):
        raise errors.PolicyError(f"audit log {path} verifies: there is nothing to repair")
    if confirm is not None and not confirm():
        raise errors.PolicyError("not confirmed; nothing was changed")
    detail: dict[str, Any] = {}
    moved: Path | None = None
    if report is None and lost is not None and lost_point is not None:
        detail = {"previous_chain": lost, "previous_last_seq": 0, "checkpoint_seq": lost_point[0],
                  "log": "deleted or emptied"}
    if report is not None:
        moved = _move_aside(path)
        detail = {"moved_to": moved.name, **_previous_chain(report)}
    key.forget_log(host, real)
    with AuditLog(path, token=token) as fresh:
        fresh.record("audit-repair", detail=detail)
    return Repair(path, moved)


def _move_aside(path: Path) -> Path:
    """Rename the damaged log to ``LOG.cut-TIME`` (never over an existing file)."""
    moved = path.with_name(f"{path.name}.cut-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}")
    if moved.exists():
        raise errors.ConfigurationError(f"{moved} exists; try again in a second")
    os.rename(path, moved)
    return moved


def _previous_chain(report: VerifyReport) -> dict[str, Any]:
    """What the repair entry says of the damaged log: its chain, last entry and checkpoint."""
    return {"previous_chain": report.chain or "", "previous_last_seq": report.last_seq,
            "checkpoint_seq": report.checkpoint[0] if report.checkpoint else 0}
