"""``keymgr audit ...``: verify and read the tamper-evident audit log (docs/audit.md).

``verify`` checks the hash chain (no key needed) and, unless ``--no-token``, every
MAC and the checkpoint in the token; a broken log prints where the chain first
breaks and exits 4 (the integrity category). ``show`` filters entries. ``report`` is the
weekly access review (:mod:`keymgr.audit.report`) as text, JSON or one HTML page.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from keymgr import errors
from keymgr.cli._common import CliState, console, emit_json, exit_code_for, pass_state
from keymgr.cli._common import report as status
from keymgr.terminal import confirmation_input

__all__ = ["audit_group"]


def _log_path(state: CliState, log: str | None) -> Path:
    if log:
        return Path(log)
    from keymgr.audit import default_log_path

    path = default_log_path(local=state.local)
    if path is None and not state.local and not os.environ.get("KEYMGR_AUDIT_LOG"):
        from keymgr.audit import token_log_path

        ts = _open_token(state)
        return token_log_path(ts.serial, ts.label)  # the token's default log on this host
    if path is None:
        raise errors.ConfigurationError("no audit log given, and no default: pass LOG or set KEYMGR_AUDIT_LOG")
    return path


def _open_token(state: CliState) -> Any:
    """The token that holds the audit key and checkpoint, opened without a KeyManager (which
    would itself append to the log being read)."""
    from keymgr.hsm import open_token

    if state.token_uri is not None:
        return open_token(state.token_uri)
    from keymgr.hsm.local import LocalToken

    local = LocalToken.default()
    local.activate()
    return open_token(local.uri())


@click.group("audit")
def audit_group() -> None:
    """Verify and read the audit log."""


@audit_group.command("verify")
@click.argument("logs", nargs=-1, type=click.Path())
@click.option("--no-token", is_flag=True,
              help="Check only the hash chain (no PIN needed); MACs and the checkpoint are not checked.")
@click.option("--sole/--shared", default=None,
              help="Whether LOG is the only log the token checkpoints (then another chain's checkpoint means "
                   "the log was deleted or replaced). Default: --sole for the local token's own log.")
@pass_state
def verify_command(state: CliState, logs: tuple[str, ...], no_token: bool, sole: bool | None) -> None:
    """Check LOG (default: the token's default log, or KEYMGR_AUDIT_LOG) for edited, deleted,
    inserted, reordered or cut-off entries. Several logs, or a directory of them (a fleet's logs,
    one per host): each is checked, and every log the token has checkpointed must be among them."""
    from keymgr.audit import verify_log, verify_logs
    from keymgr.audit.verify import log_files

    if len(logs) > 1 or any(Path(item).is_dir() for item in logs):
        if no_token:
            raise errors.ConfigurationError("verifying several logs together needs the token (drop --no-token)")
        _verify_fleet(state, verify_logs(logs, token=_open_token(state)), len(log_files(logs)))
        return
    log = logs[0] if logs else None
    path = _log_path(state, log)
    if sole is None:
        sole = log is None and state.local
    report = verify_log(path, token=None if no_token else _open_token(state), sole=sole)
    if state.json_output:
        emit_json(report.to_json())
        if not report.ok:
            sys.exit(exit_code_for(errors.IntegrityError()))
        return
    if report.broken is not None:
        raise errors.IntegrityError(f"audit log {path} is broken at {report.broken}")
    _print_report(report)


def _print_report(report: Any) -> None:
    out = console()
    checked = "MACs verified in the token" if report.macs_checked else "hash chain only (MACs not checked)"
    out.print(f"ok: {report.path}: {report.entries} entries, seq 1..{report.last_seq}, chain {report.chain or '-'}; "
              f"{checked}")
    if report.macs_checked:
        if report.checkpoint is None:
            out.print("warning: the token holds no checkpoint for this chain: a cut-off tail is not ruled out")
        else:
            out.print(f"checkpoint: seq {report.checkpoint[0]} ({report.after_checkpoint} entries after it)")
    if report.unmaced:
        out.print(f"warning: entries {_seqs(report.unmaced)} carry no MAC: written without the token (a failed "
                  "login, an approval made on a custodian's token) or appended by someone editing the file; "
                  "they are not authenticated")
    if report.unauthenticated_tail:
        out.print(f"warning: entries {_seqs(report.unauthenticated_tail)} are after the last MAC and checkpoint")
    for chain, how in sorted(report.acknowledged.items()):
        out.print(f"note: the loss of chain {chain} was {how}")
    if report.torn_tail:
        out.print("note: the last line is incomplete (a write cut short); the next append removes it")
    others = sorted(c for c in report.other_chains if c not in report.acknowledged)
    if others:
        out.print(f"note: the token also checkpoints {len(others)} other chain(s) ({', '.join(others[:3])}"
                  f"{' ...' if len(others) > 3 else ''}): other logs; verify them together to check they are there")


def _seqs(seqs: list[int]) -> str:
    return ", ".join(map(str, seqs[:10])) + (f" ... ({len(seqs)} in all)" if len(seqs) > 10 else "")


def _verify_fleet(state: CliState, fleet: Any, files: int) -> None:
    if state.json_output:
        emit_json({"ok": fleet.ok, "logs": [r.to_json() for r in fleet.reports],
                   "missing": [{"chain": m.chain, "seq": m.seq, "host": m.host, "path": m.path}
                               for m in fleet.missing]})
    else:
        acknowledged = fleet.acknowledged
        for report in fleet.reports:
            if report.broken is None:
                _print_report(report)
            elif report.chain in acknowledged:
                click.echo(f"ACKNOWLEDGED: {report.path} at {report.broken}; {acknowledged[report.chain]}")
            else:
                click.echo(f"BROKEN: {report.path} at {report.broken}")
        for missing in fleet.missing:
            label = "ACKNOWLEDGED" if missing.chain in acknowledged else "MISSING"
            click.echo(f"{label}: {missing}")
        click.echo(f"{files} log(s) checked; {len(fleet.failures)} broken, "
                   f"{sum(m.chain not in acknowledged for m in fleet.missing)} missing")
    if not fleet.ok:
        sys.exit(exit_code_for(errors.IntegrityError()))


@audit_group.command("repair")
@click.argument("log", type=click.Path(dir_okay=False))
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_state
def repair_command(state: CliState, log: str, yes: bool) -> None:
    """Acknowledge that LOG lost entries (cut, rolled back, deleted) and start it again: the old
    file is kept beside it as LOG.cut-TIME (it still fails verification: the loss stays visible),
    and the new log's first entry records the repair, who made it, and what was lost."""
    from keymgr.audit import repair_log

    token = _open_token(state)

    def confirmed(damage: str) -> bool:
        click.echo(damage, err=True)  # what is wrong, before the question
        confirmation_input()
        return click.confirm(f"Start {Path(log)} again, keeping the old file beside it?", default=False)

    repair = repair_log(log, token, confirm=None if yes else confirmed)
    moved_to = repair.moved_to
    click.echo(f"{repair.path}: started again" + (f"; the old log is {moved_to.name}" if moved_to else ""))


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


@audit_group.command("report")
@click.argument("logs", nargs=-1, type=click.Path())
@click.option("--since", default="7d", show_default=True,
              help="Start: back from the end (7d, 24h, 90m, 2w), an ISO 8601 UTC time, or 'all'.")
@click.option("--until", default=None, help="End, exclusive (ISO 8601; default: now).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "html"]), default=None,
              help="Output form (default: text; json with --json).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the report to this file (atomically, mode 0600) instead of stdout.")
@click.option("--night", default="0-5", show_default=True, help="Night window, UTC hours START-END (22-5 wraps).")
@click.option("--night-floor", type=int, default=None, help="Flag more decrypts than this in one night [100].")
@click.option("--spike-factor", type=float, default=None, help="Flag a day above this x the median day [5].")
@click.option("--spike-floor", type=int, default=None, help="... and above this many decrypts [1000].")
@click.option("--expected-at-night", multiple=True, metavar="PRINCIPAL",
              help="A principal whose night work is known (not flagged by the night rule); repeatable.")
@pass_state
def report_command(state: CliState, logs: tuple[str, ...], since: str, until: str | None, fmt: str | None,
                   output: str | None, night: str, night_floor: int | None, spike_factor: float | None,
                   spike_floor: int | None, expected_at_night: tuple[str, ...]) -> None:
    """The weekly access review of LOG ... (files, or directories of *.log files; default: the
    log `keymgr audit verify` checks):
    decrypts and encrypts per principal, key and day, refusals and failures, key lifecycle,
    ceremonies, rate-limit trips, and flagged anomalies (docs/audit.md, "The weekly review")."""
    import json
    from datetime import UTC, datetime

    from keymgr.audit import parse_time
    from keymgr.audit.report import Thresholds, build_report, parse_since, render_html, render_text
    from keymgr.cli._output import checked_output, write_output

    if output is not None:
        checked_output(output)
    end = parse_time(until) if until else datetime.now(UTC)
    given: dict[str, Any] = {"night_floor": night_floor, "spike_factor": spike_factor, "spike_floor": spike_floor}
    thresholds = Thresholds(night=Thresholds.parse_night(night), expected_at_night=frozenset(expected_at_night),
                            **{name: value for name, value in given.items() if value is not None})
    paths: list[str | Path] = list(logs) or [_log_path(state, None)]
    report = build_report(paths, since=parse_since(since, end), now=end, thresholds=thresholds)
    form = fmt or ("json" if state.json_output else "text")
    if form == "json":
        text = json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n"
    else:
        text = render_html(report) if form == "html" else render_text(report)
    for problem in report.log_problems():
        click.echo(f"keymgr: warning: {problem}", err=True)
    if output is None:
        click.echo(text, nl=False)
    else:
        write_output(output, text.encode("utf-8"), mode=0o600)
        status(output, f"wrote {output}: {len(report.anomalies)} anomalies, {len(report.rate_limits)} rate-limit trips")
    if any(log.error is not None for log in report.logs):
        sys.exit(exit_code_for(errors.ConfigurationError()))  # a log was not read: the review is incomplete
