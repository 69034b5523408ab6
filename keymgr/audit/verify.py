"""Verifying an audit log, and reading it back.

:func:`verify_log` walks the log once and stops at the first entry that breaks it:

* **no key needed**: every line must be a canonical entry of one chain, seqs must
  run 1, 2, 3 ... and each ``prev`` must be the SHA-256 of the line before. This
  catches an edited, deleted, inserted or reordered line, but whoever edits the
  file can recompute a chain, so on its own it proves only that nobody edited the
  file *carelessly*;
* **with the token** (``token=``): every MAC is checked inside the token by the
  audit key, which an editor without the PIN cannot use, so an edited or forged
  entry is named exactly; and the token's checkpoint (last seq and hash) must be
  in the log, so a cut-off tail is detected.

Entries without a MAC (written while the token could not be used, or on a token
that cannot hold an HMAC key, such as a TPM) are covered by the next MACed
entry's chain and by the checkpoint's hash, which fixes the whole chain up to
it; those after both are reported as unauthenticated: anyone who can write the
file could have appended them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from keymgr import errors
from keymgr._time import parse_audit_time, parse_time
from keymgr.audit._entry import GENESIS_PREV, MAX_LINE, Entry, line_digest, parse_line
from keymgr.audit._token import AuditKey
from keymgr.hsm.sessions import TokenSession

__all__ = ["Break", "VerifyReport", "FleetReport", "MissingLog", "verify_log", "verify_logs", "read_entries",
           "select", "parse_time"]


@dataclass(frozen=True)
class Break:
    """Where the log first breaks: 1-based ``line``, the entry's ``seq`` if it has one, and why."""

    line: int
    seq: int | None
    reason: str

    def __str__(self) -> str:
        seq = f" (seq {self.seq})" if self.seq is not None else ""
        return f"line {self.line}{seq}: {self.reason}"


@dataclass
class VerifyReport:
    """What :func:`verify_log` found. ``ok`` is True when nothing broke."""

    path: str
    entries: int = 0
    chain: str | None = None
    last_seq: int = 0
    macs_checked: bool = False
    checkpoint: tuple[int, str] | None = None
    broken: Break | None = None
    unmaced: list[int] = field(default_factory=list)
    unauthenticated_tail: list[int] = field(default_factory=list)
    after_checkpoint: int = 0
    torn_tail: bool = False
    other_chains: dict[str, int] = field(default_factory=dict)
    #: chains whose loss this log acknowledges (MACed audit-repair entries): chain -> by whom, when
    acknowledged: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.broken is None

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "ok": self.ok, "entries": self.entries, "chain": self.chain,
                "last_seq": self.last_seq, "macs_checked": self.macs_checked,
                "checkpoint_seq": self.checkpoint[0] if self.checkpoint else None,
                "broken": None if self.broken is None else {"line": self.broken.line, "seq": self.broken.seq,
                                                            "reason": self.broken.reason},
                "unmaced": self.unmaced, "unauthenticated_tail": self.unauthenticated_tail,
                "after_checkpoint": self.after_checkpoint, "torn_tail": self.torn_tail,
                "other_chains": self.other_chains}


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line without newline, complete?) with bounded memory per line."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below; a generator
    except OSError as exc:
        raise errors.ConfigurationError(f"cannot read audit log {path}: {exc.strerror}") from None
    with handle:
        number = 0
        while True:
            raw = handle.readline(MAX_LINE + 2)
            if not raw:
                return
            number += 1
            complete = raw.endswith(b"\n")
            if not complete and len(raw) > MAX_LINE:
                while raw and not raw.endswith(b"\n"):  # skip the rest of an overlong line
                    raw = handle.readline(MAX_LINE + 2)
                yield number, b"\x00" * (MAX_LINE + 1), True
                continue
            yield number, raw[:-1] if complete else raw, complete


class _Walk:
    """The state of one verification pass (the rules of the module docstring, in order)."""

    def __init__(self, report: VerifyReport, key: AuditKey | None) -> None:
        self.report = report
        self.key = key
        self.prev_raw: bytes | None = None
        self.prev_seq = 0
        self.prev_maced = True

    def fail(self, line: int, seq: int | None, reason: str) -> bool:
        self.report.broken = Break(line, seq, reason)
        return False

    def step(self, number: int, raw: bytes) -> bool:
        report = self.report
        try:
            entry = parse_line(raw)
        except errors.FormatError as exc:
            return self.fail(number, None, f"not an audit entry ({exc}): edited or corrupted")
        if raw != entry.line():
            return self.fail(number, entry.seq, "not in canonical form: the line was edited")
        if number == 1:
            report.chain = entry.chain
            if self.key is not None:
                report.checkpoint = self.key.checkpoint(entry.chain)
        mac_ok = self._mac_ok(entry)
        if entry.chain != report.chain:
            return self.fail(number, entry.seq, f"belongs to another chain ({entry.chain}): inserted from another log")
        expected_prev = GENESIS_PREV if self.prev_raw is None else line_digest(self.prev_raw)
        if entry.seq != self.prev_seq + 1 or entry.prev != expected_prev:
            return self._chain_break(number, entry, mac_ok, expected_prev)
        if mac_ok is False:
            elsewhere = " (or the log's audit key is on another token)" if number == 1 else ""
            return self.fail(number, entry.seq, f"its MAC does not verify: the entry was edited or forged{elsewhere}")
        if entry.mac is None:
            report.unmaced.append(entry.seq)
            report.unauthenticated_tail.append(entry.seq)
        else:
            report.unauthenticated_tail.clear()
        if report.checkpoint is not None and entry.seq == report.checkpoint[0]:
            if line_digest(raw) != report.checkpoint[1]:
                return self.fail(number, entry.seq, "differs from the entry the token checkpointed: edited or replaced")
            report.unauthenticated_tail.clear()  # the checkpoint's hash covers the chain up to here
        if entry.op == "audit-repair" and entry.mac is not None and self.key is not None:
            previous = entry.detail.get("previous_chain")
            if isinstance(previous, str) and previous:  # a MACed, deliberate acknowledgement of a loss
                report.acknowledged[previous] = f"acknowledged by `keymgr audit repair` at entry {entry.seq} " \
                                                f"({entry.time}, {entry.actor.user}@{entry.actor.host})"
        self.prev_raw, self.prev_seq, self.prev_maced = raw, entry.seq, entry.mac is not None
        report.entries, report.last_seq = number, entry.seq
        return True

    def _mac_ok(self, entry: Entry) -> bool | None:
        if self.key is None or entry.mac is None:
            return None
        return self.key.verify(entry.mac_input(), entry.mac)

    def _chain_break(self, number: int, entry: Entry, mac_ok: bool | None, expected_prev: str) -> bool:
        if mac_ok is True and not self.prev_maced and number > 1:
            # an authentic entry that does not follow an unMACed one: the unMACed one is the intruder
            return self.fail(number - 1, self.prev_seq, "carries no MAC and the authentic entry after it does not "
                                                        "chain to it: inserted or edited")
        if number == 1:
            return self.fail(1, entry.seq, "the log does not begin with the chain's first entry (seq 1): "
                                           "its beginning was removed or replaced")
        if entry.seq != self.prev_seq + 1:
            return self.fail(number, entry.seq, f"seq {entry.seq} where seq {self.prev_seq + 1} was expected: an "
                                                "entry before it was deleted, or entries were inserted or reordered")
        return self.fail(number, entry.seq, f"its prev hash does not match line {number - 1}: that line was edited, "
                                            "or a line was inserted or removed between them")


def verify_log(path: str | os.PathLike[str], *, token: TokenSession | None = None,
               sole: bool = False) -> VerifyReport:
    """Check a log file (module docstring); never raises for what the file contains, only
    :class:`~keymgr.errors.ConfigurationError` if it cannot be read, and token errors.

    ``sole``: this is the only log the token keeps checkpoints for (the local token and its
    default log), so a checkpoint of any other chain means this log was deleted or replaced
    by a new one. Without it such checkpoints are only listed (``other_chains``): a shared
    token may serve the logs of many hosts."""
    report = VerifyReport(path=str(path))
    key = AuditKey(token) if token is not None else None
    report.macs_checked = key is not None
    walk = _Walk(report, key)
    for number, raw, complete in _lines(Path(path)):
        if not complete:
            try:
                parse_line(raw)
            except errors.FormatError:
                report.torn_tail = True  # a write cut short by a crash; the next append removes it
                break
            walk.fail(number, None, "a complete entry without its line end: the file was edited (a writer puts "
                                    "both down in one write)")
            return report
        if not walk.step(number, raw):
            return report
    if key is not None:
        checkpoints = key.checkpoints()
        report.other_chains = {c: seq for c, (seq, _) in checkpoints.items() if c != report.chain}
        here = ((socket.gethostname() or "unknown")[:128], os.path.realpath(path)[-700:])
        elsewhere = {reg.chain for reg in key.logs() if (reg.host, reg.path) != here}
        # a chain registered to another log is that log's business (verify_logs checks it is there);
        # one registered to this very path, or to none (a log from before registration), tells a sole
        # log that it was deleted or replaced
        unexplained = {c: seq for c, seq in report.other_chains.items()
                       if c not in elsewhere and c not in report.acknowledged}
        if sole and unexplained:
            chain, seq = sorted(unexplained.items())[0]
            walk.fail(1, None, f"the token checkpoints chain {chain} up to seq {seq}, which is not this "
                               "log's: the log was deleted or replaced")
            return report
        cp = report.checkpoint
        if cp is not None:
            if cp[0] > report.last_seq:
                walk.fail(report.entries + 1, report.last_seq + 1,
                          f"the log ends at seq {report.last_seq} but the token's checkpoint is seq {cp[0]}: "
                          f"entries {report.last_seq + 1}..{cp[0]} were cut off (truncated)")
            report.after_checkpoint = max(0, report.last_seq - cp[0])
    return report


@dataclass(frozen=True)
class MissingLog:
    """A chain the token has checkpointed that none of the given logs holds."""

    chain: str
    seq: int
    host: str
    path: str

    def __str__(self) -> str:
        where = f"{self.path} on {self.host}" if self.path else "a log the token never registered"
        return f"chain {self.chain} ({where}), checkpointed up to entry {self.seq}, is missing: deleted or not given"


@dataclass
class FleetReport:
    """:func:`verify_logs`: each log's report, and the token's chains no given log holds."""

    reports: list[VerifyReport]
    missing: list[MissingLog]

    @property
    def acknowledged(self) -> dict[str, str]:
        """Chains some given log's MACed ``audit-repair`` entry acknowledges as lost or cut."""
        return {chain: how for r in self.reports for chain, how in r.acknowledged.items()}

    @property
    def failures(self) -> list[VerifyReport]:
        """Broken logs, less those whose loss a repair acknowledged (they stay listed, not failing)."""
        return [r for r in self.reports if not r.ok and r.chain not in self.acknowledged]

    @property
    def ok(self) -> bool:
        return not self.failures and not [m for m in self.missing if m.chain not in self.acknowledged]


def log_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The log files named by ``paths``: files as given, directories by their ``*.log*`` files."""
    found: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            found += sorted(p for p in item.iterdir() if p.is_file() and ".log" in p.name)
        else:
            found.append(item)
    return found


def verify_logs(paths: Iterable[str | os.PathLike[str]], *, token: TokenSession) -> FleetReport:
    """Verify every log of a token together (a fleet's logs, one per host or per path, gathered
    in one place): each must verify, and every chain the token has checkpointed must be among
    them, so deleting a whole log is detected too (docs/audit.md, "Many hosts")."""
    reports = [verify_log(path, token=token) for path in log_files(paths)]
    key = AuditKey(token)
    present = {r.chain for r in reports if r.chain}
    where = {reg.chain: reg for reg in key.logs()}
    missing = []
    for chain, (seq, _) in sorted(key.checkpoints().items()):
        if chain not in present:
            reg = where.get(chain)
            missing.append(MissingLog(chain, seq, reg.host if reg else "", reg.path if reg else ""))
    return FleetReport(reports, missing)


def read_entries(path: str | os.PathLike[str], bad: list[int] | None = None) -> Iterator[tuple[int, Entry]]:
    """Every entry of a log with its line number; lines that are not entries are skipped
    (their numbers appended to ``bad``). For reading, not verifying: see :func:`verify_log`."""
    for number, raw, complete in _lines(Path(path)):
        try:
            if not complete:
                raise errors.FormatError("torn line")
            yield number, parse_line(raw)
        except errors.FormatError:
            if bad is not None:
                bad.append(number)


def select(entries: Iterable[tuple[int, Entry]], *, key: str | None = None, actor: str | None = None,
           op: str | None = None, outcome: str | None = None, since: datetime | None = None,
           until: datetime | None = None) -> Iterator[tuple[int, Entry]]:
    """The entries that match every filter given. ``actor`` matches the OS user, the uid or the
    application principal; ``since`` is inclusive, ``until`` exclusive."""
    for number, entry in entries:
        if key is not None and entry.key != key:
            continue
        if op is not None and entry.op != op:
            continue
        if outcome is not None and entry.outcome != outcome:
            continue
        if actor is not None and actor not in (entry.actor.user, str(entry.actor.uid), entry.actor.principal):
            continue
        if since is not None or until is not None:
            moment = parse_audit_time(entry.time)
            if (since is not None and moment < since) or (until is not None and moment >= until):
                continue
        yield number, entry
