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
writes the same entry, and only after the same checks:

* the path is a regular file, not a symbolic link (or missing while the token remembers a
  chain there);
* the file is an audit log: at least one line is an audit entry (an application's config
  named by mistake is refused, not moved aside);
* it is this token's log: at least one entry's MAC verifies with this token's audit key,
  or the token registered a chain at this path (``--token`` of another token at 3 a.m. is
  refused: nothing says that log lost anything);
* the file is the one checked when the confirmation returns (another operator's repair in
  the meantime is not repaired again);
* the repair entry records why verification failed (the first broken line and the
  verifier's reason), so an edited entry later removed with ``LOG.cut-TIME`` still reads
  as what it was, not as a plain cut.
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
from keymgr.audit.verify import VerifyReport, read_entries, verify_log
from keymgr.hsm.sessions import TokenSession

__all__ = ["Repair", "repair_log"]


@dataclass(frozen=True)
class Repair:
    """What :func:`repair_log` did: the log started again, and where its old file was kept
    (None when there was no old file: the log was deleted or emptied)."""

    path: Path
    moved_to: Path | None


def repair_log(path: str | os.PathLike[str], token: TokenSession, *,
               confirm: Callable[[str], bool] | None = None) -> Repair:
    """Acknowledge that the log at ``path`` lost entries and start it again (module docstring).

    ``token`` holds the log's audit key and checkpoints. A log that verifies, or a missing
    one the token never checkpointed, has nothing to repair: :class:`~keymgr.errors.PolicyError`,
    and nothing is changed. ``confirm`` is asked once the repair is known to be needed and
    before anything changes, with why it is needed in one line (what ``keymgr audit repair``
    shows before its question); False is a PolicyError and nothing is changed.
    """
    path = Path(path)
    damage = _Damage.of(path, token)
    key, lost, lost_point, report = damage.key, damage.lost, damage.lost_point, damage.report
    if confirm is not None:
        if not confirm(damage.describe(path)):
            raise errors.PolicyError("not confirmed; nothing was changed")
        if _identity(path) != damage.identity:  # another operator's repair, or a writer, meanwhile
            raise errors.PolicyError(f"{path} changed while the confirmation was asked; nothing was changed: "
                                     "run the repair again")
    detail: dict[str, Any] = {}
    moved: Path | None = None
    if report is None and lost is not None and lost_point is not None:
        detail = {"previous_chain": lost, "previous_last_seq": 0, "checkpoint_seq": lost_point[0],
                  "log": "deleted or emptied"}
    if report is not None:
        moved = _move_aside(path)
        assert report.broken is not None  # _damaged_report returns only logs that fail
        detail = {"moved_to": moved.name, **_previous_chain(report), "broken_line": report.broken.line,
                  "broken_reason": report.broken.reason[:300]}
    key.forget_log(damage.host, damage.real)
    with AuditLog(path, token=token) as fresh:
        fresh.record("audit-repair", detail=detail)
    return Repair(path, moved)


@dataclass(frozen=True)
class _Damage:
    """What is known of the log at a path before a repair: the token's audit key, the chain
    the token registered there for this host (and its checkpoint), and the failing report
    (None: the file is missing or empty and the token remembers a chain there)."""

    key: AuditKey
    host: str
    real: str
    lost: str | None
    lost_point: tuple[int, str] | None
    report: VerifyReport | None
    identity: tuple[int, int, int, int] | None  # the file as it was checked (None: missing)

    @classmethod
    def of(cls, path: Path, token: TokenSession) -> _Damage:
        identity = _identity(path)
        key = AuditKey(token)
        host, real = (socket.gethostname() or "unknown")[:255], os.path.realpath(path)
        lost = key.registered_chain(host, real)
        lost_point = key.checkpoint(lost) if lost is not None else None
        report = _damaged_report(path, key, token, registered=lost is not None, remembered=lost_point is not None)
        return cls(key, host, real, lost, lost_point, report, identity)

    def describe(self, path: Path) -> str:
        """Why the log at ``path`` needs a repair, in one line."""
        if self.report is None:
            seq = self.lost_point[0] if self.lost_point else 0
            return f"{path} is missing or empty, but the token checkpointed its chain at seq {seq}"
        assert self.report.broken is not None  # _damaged_report returns only logs that fail
        return f"{path} does not verify: line {self.report.broken.line}: {self.report.broken.reason}"


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    """(device, inode, size, mtime) of the file at ``path`` (never following a link), or None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise errors.ConfigurationError(f"cannot read {path}: {exc.strerror}") from None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _damaged_report(path: Path, key: AuditKey, token: TokenSession, *, registered: bool,
                    remembered: bool) -> VerifyReport | None:
    """The failing verification of the log at ``path`` (None: missing or empty, and the token
    remembers a chain there), or a PolicyError saying why there is nothing to repair here."""
    if path.is_symlink():
        raise errors.PolicyError(f"{path} is a symbolic link: repair the log it points to by its own path "
                                 "(a repair never replaces a link); nothing was changed")
    if os.path.lexists(path) and not path.is_file():
        raise errors.PolicyError(f"{path} is not a regular file, so not an audit log: nothing to repair")
    if not path.exists() or not path.stat().st_size:
        if remembered:
            return None
        state = "does not exist" if not path.exists() else "is empty"
        raise errors.PolicyError(f"{path} {state} and the token remembers no log there: nothing to repair")
    report = verify_log(path, token=token)
    if report.ok:
        raise errors.PolicyError(f"audit log {path} verifies: there is nothing to repair")
    entries = [entry for _, entry in read_entries(path)]
    if not entries:
        raise errors.PolicyError(f"{path} holds no audit entry: it is not an audit log, and it was not changed")
    if not registered and not any(e.mac is not None and key.verify(e.mac_input(), e.mac) for e in entries):
        raise errors.PolicyError(f"no entry of {path} verifies with the audit key of token {token.label!r}, and the "
                                 "token keeps no log at this path: it is another token's log (give that --token); "
                                 "it was not changed")
    return report


def _move_aside(path: Path) -> Path:
    """Rename the damaged log to ``LOG.cut-TIME``, never over an existing file: a hard link
    made first fails if the name is taken (a rename would silently replace it)."""
    moved = path.with_name(f"{path.name}.cut-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}")
    try:
        os.link(path, moved, follow_symlinks=False)
    except FileExistsError:
        raise errors.ConfigurationError(f"{moved} exists; try again in a second") from None
    except OSError as exc:
        raise errors.ConfigurationError(f"cannot keep the damaged log as {moved.name}: {exc.strerror}") from None
    os.unlink(path)
    return moved


def _previous_chain(report: VerifyReport) -> dict[str, Any]:
    """What the repair entry says of the damaged log: its chain, last entry and checkpoint."""
    return {"previous_chain": report.chain or "", "previous_last_seq": report.last_seq,
            "checkpoint_seq": report.checkpoint[0] if report.checkpoint else 0}
