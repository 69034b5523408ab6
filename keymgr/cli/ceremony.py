"""``keymgr backup`` and ``keymgr restore``: the key ceremonies (docs/ceremonies.md)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from keymgr import errors
from keymgr.cli._common import CliState, committing, emit_json, pass_state, report
from keymgr.cli._custodian_prompts import ask_custodians
from keymgr.cli._custody_common import (
    check_transcript_free,
    custodian_uri,
    default_path,
    parse_custodian_option,
    pin_prompt,
    read_approvals,
    read_file,
    read_request,
    write_transcript,
)
from keymgr.cli._output import check_directory, checked_output, write_output
from keymgr.custody.approvals import Approval, Request
from keymgr.custody.custodian_token import CustodianToken
from keymgr.custody.custodians import Custodian
from keymgr.hsm.pins import PinRequest, pin_source_from_uri

if TYPE_CHECKING:
    from keymgr.manager import TokenInfo

__all__ = ["backup_command", "restore_command", "collect_custodians"]


def _versions(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise errors.ConfigurationError("--versions takes numbers separated by commas, e.g. 1,2") from None


@click.command("backup")
@click.argument("name")
@click.option("--versions", default=None, metavar="N,N", help="Versions to back up (default: every live one).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Backup file to write.")
@click.option("--request", "request_path", type=click.Path(exists=True, dir_okay=False),
              help="The approved backup request (keymgr request backup).")
@click.option("--approval", "approval_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="An approval of the request; repeat for each custodian.")
@click.option("--so-pin-source", default=None, metavar="env:VAR|file:PATH",
              help="Where the HSM's SO PIN comes from (default: asked at the terminal).")
@click.option("--transcript", "transcript_path", type=click.Path(dir_okay=False), default=None,
              help="Signed transcript to write (default: OUTPUT.transcript.p7s).")
@pass_state
@committing
def backup_command(state: CliState, name: str, versions: str | None, output: str, request_path: str | None,
                   approval_paths: tuple[str, ...], so_pin_source: str | None, transcript_path: str | None) -> None:
    """Back up key NAME, wrapped in the HSM, to its M-of-N custodians.

    OUTPUT must not exist (a backup file is never replaced: it may be the only copy of a destroyed
    version); it and the transcript are written before the approvals are spent, so a write that
    fails spends nothing."""
    out = Path(output)
    checked_output(output, new=True)  # before anything: no approvals spent, no SO PIN typed for nothing
    if transcript_path:
        transcript = Path(transcript_path)
    elif str(out) == "-":  # the backup goes to stdout: its transcript gets a name of its own
        transcript = default_path(Path(f"backup-{name}"), ".transcript.p7s")
    else:
        transcript = default_path(out, ".transcript.p7s")
    check_transcript_free(transcript_path)
    check_directory(str(transcript))  # its directory, when given apart from OUTPUT
    km = state.manager()
    request, approvals = read_request(request_path), read_approvals(approval_paths)
    _check_backup_approvals(km, name, _versions(versions), request, approvals)
    source = pin_source_from_uri(so_pin_source, None)
    pin = source.read(PinRequest(km.token_info.label, "mark the backup transport key trusted", user="so"), pin_prompt())
    if pin is None:
        raise errors.AuthenticationError("a backup needs the HSM's SO PIN")
    written: list[Path] = []

    def write_files(result: Any) -> None:
        written.append(_write_backup(out, transcript, result))

    try:
        result = km.backup(name, so_pin=pin, request=request, approvals=approvals, versions=_versions(versions),
                  before_commit=write_files)
    except errors.KeymgrError as exc:
        if not written:
            raise
        raise errors.StorageError(f"the backup was written to {out} (transcript {written[0]}) but its approvals "
                                  f"could not be marked spent: {exc}; the backup is valid, and the request could "
                                  "be used once more until it expires") from None
    finally:
        pin.wipe()
    if state.json_output:
        emit_json({"backup": str(out), "transcript": str(written[0]), "description": result.description},
                  output=out)
    else:
        report(out, f"wrote {out}: {result.description}")
        report(out, f"signed transcript: {written[0]}")


def _write_backup(out: Path, transcript: Path, result: Any) -> Path:
    """The backup file (new, 0600), then its transcript; if the transcript fails, the backup file
    is removed again, so that a failure leaves nothing and spends nothing. Returns the transcript's path."""
    created = checked_output(str(out), new=True).kind == "file"  # not a device or stdout: ours to take back
    write_output(out, result.backup, mode=0o600, new=True)
    if not result.transcript:
        return transcript
    try:
        return write_transcript(transcript, result.transcript)
    except BaseException:
        if created:
            out.unlink(missing_ok=True)
        raise


def _check_backup_approvals(km: Any, name: str, versions: list[int] | None, request: Request | None,
                            approvals: Sequence[Approval]) -> None:
    """The approvals, checked before the SO types the SO PIN (the backup checks them again, and
    spends them): a missing or wrong approval must not cost the SO a PIN entry."""
    if not km.custody.check_approvals("backup", key=name, params={"versions": versions}, request=request,
                                      approvals=approvals):
        raise errors.PolicyError(f"no quorum policy covers key {name!r}: register custodians and set a policy "
                                 "(keymgr custodian policy) before a backup")


def collect_custodians(candidates: Sequence[Custodian], threshold: int, given: Sequence[str], module_path: str,
                       what: str, *, target: TokenInfo | None = None) -> list[CustodianToken]:
    """Open M custodians' tokens: from ``--custodian NAME=URI`` options (any mistake is an error),
    or asked in turn at the terminal, where a slip re-asks (:mod:`keymgr.cli._custodian_prompts`).
    Tokens opened are closed on failure."""
    if not given:
        return ask_custodians(candidates, threshold, module_path, what, target=target)
    by_name = {c.name: c for c in candidates}
    tokens: list[CustodianToken] = []
    try:
        for option in given:
            name, uri = parse_custodian_option(option)
            custodian = by_name.get(name)
            if custodian is None:
                raise errors.PolicyError(f"custodian {name!r} is not one of the custodians of this {what} "
                                         f"({', '.join(by_name)})")
            if any(t.custodian.name == name for t in tokens):
                raise errors.PolicyError(f"custodian {name!r} was given twice; each custodian counts once")
            tokens.append(CustodianToken.open(custodian, custodian_uri(uri, module_path),
                                              pin_callback=pin_prompt(name)))
        return tokens
    except BaseException:
        for token in tokens:
            token.close()
        raise


@click.command("restore")
@click.argument("backup_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--token", "target", default=None, metavar="URI", help="The target HSM (default: the global --token).")
@click.option("--custodian", "custodians", multiple=True, metavar="NAME=URI",
              help="A custodian and their token URI (with pin-source); repeat. Default: asked at the terminal.")
@click.option("--transcript", "transcript_path", type=click.Path(dir_okay=False), default=None,
              help="Signed transcript to write, never over an existing file (default: restore-ID.transcript.p7s "
                   "here, or restore-ID-2.transcript.p7s ... when that exists).")
@pass_state
@committing
def restore_command(state: CliState, backup_file: str, target: str | None, custodians: tuple[str, ...],
                    transcript_path: str | None) -> None:
    """Restore the keys of BACKUP_FILE into the target HSM, with M custodians present."""
    from keymgr.custody.backup_file import BackupFile

    backup = BackupFile.parse(read_file(backup_file, "backup file"))
    check_transcript_free(transcript_path)
    if target:
        state.token_uri = target
    km = state.manager()
    info = km.token_info
    if not state.json_output:
        click.echo(f"{backup.describe()}", err=True)
        click.echo(f"Target: token {info.label!r} (serial {info.serial})", err=True)
    km.check_restorable(backup)  # a clashing key is refused before any custodian types a PIN
    tokens = collect_custodians([s.custodian for s in backup.shares], backup.quorum.threshold, custodians,
                                info.module_path, "backup", target=info)
    try:
        result = km.restore(backup, tokens)
    finally:
        for token in tokens:
            token.close()
    transcript = Path(transcript_path or f"restore-{backup.id.hex()[:8]}.transcript.p7s")
    if result.transcript:
        transcript = write_transcript(transcript, result.transcript, done="the keys were restored")
    restored = [{"name": r.name, "versions": [v.version for v in r.versions]} for r in result.records]
    if state.json_output:
        emit_json({"restored": restored, "token": info.label, "transcript": str(transcript)})
        return
    for name in result.finished:
        click.echo(f"key {name!r}: token {info.label!r} held every version of it already, restored earlier "
                   "(from this backup by a run cut short, or from another backup of the same key); checked and "
                   "finished it", err=True)
    for r in result.records:
        versions = ", ".join(str(v.version) for v in r.versions)
        click.echo(f"restored key {r.name!r} versions {versions} into token {info.label!r}")
    click.echo(f"signed transcript: {transcript}")
