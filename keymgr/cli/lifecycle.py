"""``keymgr key rotate | activate | due | retire | suspend | resume | compromise | destroy``.

Thin (STYLE.md 10): each command calls one :class:`~keymgr.KeyManager` method
(:mod:`keymgr.lifecycle.rotation`, :mod:`keymgr.lifecycle.shred`) and prints the key's record
(``--json``) or one line.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from keymgr import KeyManager, KeyRecord, errors
from keymgr.cli._common import CliState, committing, console, emit_json, pass_state
from keymgr.cli.keys import record_json
from keymgr.terminal import confirmation_input

__all__ = ["register_lifecycle_commands"]


def _report(state: CliState, record: KeyRecord, line: str, **extra: Any) -> None:
    if state.json_output:
        emit_json({**record_json(record), **extra})
    else:
        click.echo(line)


def _version_line(record: KeyRecord, number: int) -> str:
    v = record.version(number)
    return f"version {v.version} ({v.state}, CKA_ID {v.key_id.hex()}, KCV {v.kcv or '-'})"


@click.command("rotate")
@click.argument("name")
@click.option("--pre-active", is_flag=True, help="Create the new version pre-active; `key activate` makes it primary.")
@click.option("--transcript", "transcript_path", type=click.Path(dir_okay=False), default=None,
              help="Write the signed ceremony transcript (CMS SignedData) here.")
@pass_state
@committing
def rotate_command(state: CliState, name: str, pre_active: bool, transcript_path: str | None) -> None:
    """Create a new version of NAME and make it the primary (the old one keeps decrypting)."""
    from keymgr.cli._custody_common import check_transcript_free, write_change_transcript

    check_transcript_free(transcript_path)  # before the rotation: a transcript is never overwritten
    km = state.manager()
    before = km.describe_key(name).primary
    record = km.rotate(name, activate=not pre_active)
    newest = max(v.version for v in record.versions)
    if transcript_path:
        write_change_transcript(transcript_path, lambda: km.custody.key_transcript("rotate", record,
                                                                                 versions=sorted({before, newest})),
                    f"key {name!r} was rotated (version {newest} created)")
    if pre_active:
        line = f"key {name!r}: new {_version_line(record, newest)}; primary stays version {record.primary}"
    else:
        line = (f"key {name!r}: primary is now {_version_line(record, newest)}; "
                f"was {_version_line(record, before)}")
    _report(state, record, line)


@click.command("activate")
@click.argument("name")
@click.option("--version", "version", type=click.IntRange(min=1), required=True)
@pass_state
def activate_command(state: CliState, name: str, version: int) -> None:
    """Make pre-active VERSION of NAME the primary."""
    record = state.manager().activate(name, version)
    _report(state, record, f"key {name!r}: primary is now {_version_line(record, version)}")


def _state_command(command: str, method: Callable[[KeyManager], Callable[[str, int], KeyRecord]],
                   doc: str) -> click.Command:
    @click.command(command, help=doc)
    @click.argument("name")
    @click.option("--version", "version", type=click.IntRange(min=1), required=True)
    @pass_state
    def run(state: CliState, name: str, version: int) -> None:
        record = method(state.manager())(name, version)
        _report(state, record, f"key {name!r}: {_version_line(record, version)}")

    return run


@click.command("retire")
@click.argument("name")
@click.option("--below", type=click.IntRange(min=2), required=True, help="Versions below this stop decrypting.")
@click.option("--immediately", is_flag=True, help="Do not wait until hosts sharing the token must have seen the "
              "newer primary (10 minutes after it took over): for a single host.")
@pass_state
def retire_command(state: CliState, name: str, below: int, immediately: bool) -> None:
    """Stop versions of NAME below N from decrypting (its minimum decryption version). Final for
    data still under them: refused within 10 minutes of a version ceasing to be the primary, while
    other hosts may still encrypt under it, unless --immediately."""
    record = state.manager().retire(name, below=below, immediately=immediately)
    _report(state, record, f"key {name!r}: versions below {record.min_decryption_version} no longer decrypt")


@click.command("due")
@pass_state
def due_command(state: CliState) -> None:
    """List keys whose primary version is past its cryptoperiod (rotate_after_days)."""
    from keymgr.lifecycle.rotation import due

    late = due(state.manager().list_keys())
    if state.json_output:
        emit_json({"due": [{"name": r.name, "primary": r.primary, "created": r.primary_version.created,
                            "rotate_after_days": r.policy.rotate_after_days, "due_since": at.isoformat(),
                            "auto_rotate": r.policy.auto_rotate} for r, at in late]})
        return
    if not late:
        click.echo("no key is past its cryptoperiod")
        return
    from rich.table import Table

    table = Table(title="keys due for rotation")
    for column in ("name", "primary", "created", "cryptoperiod (days)", "due since", "auto-rotate"):
        table.add_column(column)
    for r, at in late:
        table.add_row(r.name, str(r.primary), r.primary_version.created, str(r.policy.rotate_after_days),
                      at.isoformat(), "yes" if r.policy.auto_rotate else "no")
    console().print(table)


@click.command("destroy")
@click.argument("name")
@click.option("--version", "version", type=click.IntRange(min=1), required=True)
@click.option("--paths", "paths", multiple=True, type=click.Path(exists=True),
              help="Files or directories to scan for envelopes that still need the version (repeatable).")
@click.option("--request", "request_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The approved request (keymgr request destroy), where a quorum policy covers the key.")
@click.option("--approval", "approval_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A custodian's approval of the request (repeatable).")
@click.option("--yes", is_flag=True, help="Confirm destruction without a prompt: needed for keys without a quorum "
              "policy, and for any key when no --paths were checked and no terminal can ask.")
@click.option("--force", is_flag=True, help="Destroy even though envelopes under --paths still need the version.")
@click.option("--immediately", is_flag=True, help="Do not wait until hosts sharing the token must have seen the "
              "newer primary (10 minutes after it took over): for a single host.")
@click.option("--transcript", "transcript_path", type=click.Path(dir_okay=False), default=None,
              help="Write the signed ceremony transcript (CMS SignedData) here.")
@pass_state
@committing
def destroy_command(state: CliState, name: str, version: int, paths: tuple[str, ...], request_path: str | None,
                    approval_paths: tuple[str, ...], yes: bool, force: bool, immediately: bool,
                    transcript_path: str | None) -> None:
    """Crypto-shred VERSION of NAME: its token object is destroyed; data only it protects is lost.

    Without --paths nothing is checked for data that still needs the version: at a
    terminal keymgr says so and asks you to type the key's name; elsewhere it needs --yes."""
    from keymgr.cli._custody_common import (
        check_transcript_free,
        read_approvals,
        read_request,
        write_change_transcript,
    )

    check_transcript_free(transcript_path)  # before the destroy: a transcript is never overwritten
    km = state.manager()
    if not paths and not yes:
        yes = _confirm_unchecked_destroy(km.describe_key(name), version)
    result = km.destroy(name, version, paths=paths, request=read_request(request_path),
                        approvals=read_approvals(approval_paths), confirmed=yes, force=force,
                        transcript=transcript_path is not None, immediately=immediately)
    if transcript_path and result.transcript is not None:
        made = result.transcript
        write_change_transcript(transcript_path, lambda: made, f"key {name!r} version {version} was destroyed")
    scan = result.scan
    found = (f"; {len(scan.needing)} of {scan.envelopes} envelope(s) scanned needed it" if scan is not None
             else "; not checked for data that still needed it (no --paths)")
    who = f"; approved by {', '.join(result.approvers)}" if result.approvers else ""
    _report(state, result.record, f"key {name!r}: version {version} destroyed{found}{who}",
            destroyed={"version": version, "approvers": list(result.approvers),
                       "envelopes": None if scan is None else scan.envelopes,
                       "needing": None if scan is None else list(scan.needing)})


def _confirm_unchecked_destroy(record: KeyRecord, version: int) -> bool:
    """A destroy with no --paths checked nothing: ask for the key's name at a terminal
    (a quorum's approvals say the custodians agreed, not that no data needs the version);
    refuse elsewhere unless --yes was given. True once confirmed."""
    from keymgr.lifecycle.rotation import check_transition

    target = record.version(version)
    if target.state == "destroyed":
        return False  # already shredded: the library says so (or finishes a destroy that crashed)
    check_transition(record, target, "destroyed")  # a version that may not be destroyed: say so before asking
    what = _version_line(record, version)
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise errors.PolicyError(f"key {record.name!r} {what}: no --paths given, so nothing was checked for data "
                                 "that still needs it; pass --paths DIR to check, or --yes to destroy it unchecked")
    click.echo(f"About to destroy key {record.name!r} {what}. This is irreversible: data encrypted under it "
               "is lost for good.\nNo --paths were given, so NOTHING was checked for data that still needs "
               "this version (keymgr key destroy --paths DIR checks).", err=True)
    confirmation_input()  # a pasted next line must not confirm a warning printed after it
    try:
        typed = click.prompt(f"Type the key name ({record.name}) to destroy it anyway, or press Enter to stop",
                             default="", show_default=False, err=True)
    except click.Abort as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):
            raise  # Ctrl-C: reported as an interrupt (exit 130)
        typed = ""  # end of input (Ctrl-D): not a confirmation
    if typed.strip() != record.name:
        raise errors.PolicyError(f"not confirmed: key {record.name!r} version {version} was not destroyed")
    return True


def register_lifecycle_commands(group: click.Group) -> None:
    """Add the lifecycle commands to the ``key`` group."""
    for command in (rotate_command, activate_command, retire_command, due_command, destroy_command,
                    _state_command("suspend", lambda km: km.suspend,
                                   "Suspend VERSION of NAME: no encryption or decryption until resumed."),
                    _state_command("resume", lambda km: km.resume,
                                   "Return suspended VERSION of NAME to its previous state."),
                    _state_command("compromise", lambda km: km.mark_compromised,
                                   "Mark VERSION of NAME compromised: it decrypts only for recovery "
                                   "(allow_compromised).")):
        group.add_command(command)
