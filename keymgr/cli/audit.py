"""``keymgr audit ...``: verify and read the tamper-evident audit log (docs/audit.md).

``verify`` checks the hash chain (no key needed) and, unless ``--no-token``, every
MAC and the checkpoint in the token; a broken log prints where the chain first
breaks and exits 4 (the integrity category). ``show`` filters entries.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from keymgr import errors
from keymgr.cli._common import CliState, console, emit_json, exit_code_for, pass_state

__all__ = ["audit_group"]


def _log_path(state: CliState, log: str | None) -> Path:
    if log:
        return Path(log)
    from keymgr.audit import default_log_path

    path = default_log_path(local=state.token is None)
    if path is None:
        raise errors.ConfigurationError("no audit log given, and no default: pass LOG or set KEYMGR_AUDIT_LOG")
    return path


def _open_token(state: CliState) -> Any:
    """The token that holds the audit key and checkpoint, opened without a KeyManager (which
    would itself append to the log being read)."""
    from keymgr.hsm import open_token

    if state.token is not None:
        return open_token(state.token)
    from keymgr.local import LocalToken

    local = LocalToken.default()
    local.activate()
    return open_token(local.uri())


@click.group("audit")
def audit_group() -> None:
    """Verify and read the audit log."""


@audit_group.command("verify")
@click.argument("log", required=False, type=click.Path(dir_okay=False))
@click.option("--no-token", is_flag=True,
              help="Check only the hash chain (no PIN needed); MACs and the checkpoint are not checked.")
@click.option("--sole/--shared", default=None,
              help="Whether LOG is the only log the token checkpoints (then another chain's checkpoint means "
                   "the log was deleted or replaced). Default: --sole for the local token's own log.")
@pass_state
def verify_command(state: CliState, log: str | None, no_token: bool, sole: bool | None) -> None:
    """Check LOG (default: the local token's log, or KEYMGR_AUDIT_LOG) for edited, deleted,
    inserted, reordered or cut-off entries."""
    from keymgr.audit import verify_log

    path = _log_path(state, log)
    if sole is None:
        sole = log is None and state.token is None
    report = verify_log(path, token=None if no_token else _open_token(state), sole=sole)
    if state.json_output:
        emit_json(report.to_json())
        if not report.ok:
            sys.exit(exit_code_for(errors.IntegrityError()))
        return
    if report.broken is not None:
        raise errors.IntegrityError(f"audit log {path} is broken at {report.broken}")
    out = console()
    checked = "MACs verified in the token" if report.macs_checked else "hash chain only (MACs not checked)"
    out.print(f"ok: {report.entries} entries, seq 1..{report.last_seq}, chain {report.chain or '-'}; {checked}")
    if report.macs_checked:
        if report.checkpoint is None:
            out.print("warning: the token holds no checkpoint for this chain: a cut-off tail is not ruled out")
        else:
            out.print(f"checkpoint: seq {report.checkpoint[0]} ({report.after_checkpoint} entries after it)")
    if report.unauthenticated_tail:
        out.print(f"warning: entries {report.unauthenticated_tail} carry no MAC and no later MAC covers them")
    if report.torn_tail:
        out.print("note: the last line is incomplete (a write cut short); the next append removes it")
    for chain, seq in sorted(report.other_chains.items()):
        out.print(f"note: the token also checkpoints chain {chain} (seq {seq}): another log, or a deleted one")


def _entry_row(number: int, entry: Any) -> list[str]:
    who = entry.actor.user + (f" ({entry.actor.principal})" if entry.actor.principal else "")
    count = entry.detail.get("count")
    return [str(number), str(entry.seq), entry.time, who, str(entry.actor.pid), entry.op, entry.key or "-",
            "-" if entry.version is None else str(entry.version), entry.outcome, entry.error or "",
            "" if count is None else str(count), "yes" if entry.mac else "no"]


@audit_group.command("show")
@click.argument("log", required=False, type=click.Path(dir_okay=False))
@click.option("--key", default=None, help="Only this key name.")
@click.option("--actor", default=None, help="Only this OS user, uid or application principal.")
@click.option("--op", "op", default=None, help="Only this operation (create, encrypt, decrypt, login ...).")
@click.option("--outcome", type=click.Choice(["ok", "refused", "failed"]), default=None)
@click.option("--since", default=None, help="From this UTC time on (ISO 8601, e.g. 2026-12-02T17:00).")
@click.option("--until", default=None, help="Before this UTC time (ISO 8601).")
@pass_state
def show_command(state: CliState, log: str | None, key: str | None, actor: str | None, op: str | None,
                 outcome: str | None, since: str | None, until: str | None) -> None:
    """List LOG's entries, filtered. Reading is not verifying: run `keymgr audit verify`."""
    from keymgr.audit import parse_time, read_entries, select

    path = _log_path(state, log)
    bad: list[int] = []
    chosen = list(select(read_entries(path, bad), key=key, actor=actor, op=op, outcome=outcome,
                         since=parse_time(since) if since else None, until=parse_time(until) if until else None))
    if state.json_output:
        emit_json([{"line": number, **entry.to_json()} for number, entry in chosen])
    else:
        from rich.table import Table

        table = Table(title=f"audit log {path}")
        for column in ("line", "seq", "time", "actor", "pid", "op", "key", "ver", "outcome", "error", "count",
                       "MAC"):
            table.add_column(column)
        for number, entry in chosen:
            table.add_row(*_entry_row(number, entry))
        console().print(table)
    if bad:
        click.echo(f"keymgr: warning: {len(bad)} lines are not audit entries (first: line {bad[0]}); "
                   "run `keymgr audit verify`", err=True)
