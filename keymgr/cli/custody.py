"""``keymgr custodian``, ``request``, ``approve``, ``transcript``, ``quorum``: dual control at the terminal."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from keymgr import errors
from keymgr.cli._common import CliState, committing, console, emit_json, pass_state, report
from keymgr.cli._custody_common import (
    check_transcript_free,
    custodian_uri,
    pin_prompt,
    read_approvals,
    read_file,
    read_request,
    write_transcript,
)
from keymgr.cli._output import checked_output, write_output
from keymgr.cli.approve import approve_command
from keymgr.cli.ceremony import collect_custodians

__all__ = ["custodian_group", "request_group", "approve_command", "transcript_group", "quorum_group",
           "register_custody_commands"]


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if not text else tuple(n.strip() for n in text.split(",") if n.strip())


def _context(pairs: tuple[str, ...]) -> dict[str, str] | None:
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise errors.ConfigurationError(f"--context takes KEY=VALUE, not {pair!r}")
        out[key] = value
    return out


def _write_transcript(path: str | None, data: bytes, done: str) -> None:
    if path and data:
        click.echo(f"signed transcript: {write_transcript(Path(path), data, done=done)}", err=True)


# -- custodians ---------------------------------------------------------------------------------

@click.group("custodian")
def custodian_group() -> None:
    """Register custodians and set M-of-N quorum policies."""


@custodian_group.command("add")
@click.argument("name")
@click.option("--token", "--custodian-token", "uri", required=True, metavar="URI",
              help="The custodian's own token (label or pkcs11: URI).")
@click.option("--key-label", default=None, help="Label of the custodian's key pair (default: keymgr-custodian).")
@pass_state
def custodian_add(state: CliState, name: str, uri: str, key_label: str | None) -> None:
    """Register custodian NAME by the key pair on their token (their PIN is asked)."""
    from keymgr.custody.custodian_token import enroll_custodian
    from keymgr.hsm import open_token

    km = state.manager()
    ts = open_token(custodian_uri(uri, km.token_info.module_path), pin_callback=pin_prompt(name))
    try:
        custodian = enroll_custodian(name, ts, key_label=key_label)
    finally:
        ts.close()
    km.custody.add_custodian(custodian)
    if state.json_output:
        emit_json(_custodian_json(custodian))
    else:
        origin = "self-signed by the token" if custodian.self_signed else "from the token"
        click.echo(f"registered custodian {name!r}: {custodian.kind} key {custodian.key_label!r} on token "
                   f"{custodian.token_label!r}, fingerprint {custodian.fingerprint}, certificate {origin}")


def _custodian_json(c: Any) -> dict[str, Any]:
    return {"name": c.name, "kind": c.kind, "fingerprint": c.fingerprint, "token": c.token_label,
            "serial": c.token_serial, "key_label": c.key_label, "added": c.added, "self_signed": c.self_signed}


@custodian_group.command("remove")
@click.argument("name")
@pass_state
def custodian_remove(state: CliState, name: str) -> None:
    """Remove custodian NAME (refused while a quorum policy names them)."""
    state.manager().custody.remove_custodian(name)
    click.echo(f"removed custodian {name!r}")


@custodian_group.command("list")
@pass_state
def custodian_list(state: CliState) -> None:
    """List registered custodians and quorum policies."""
    register = state.manager().custody.register()
    if state.json_output:
        emit_json({"custodians": [_custodian_json(c) for c in register.custodians],
                   "policies": {k: p.to_json() for k, p in register.policies.items()}})
        return
    from rich.table import Table

    table = Table(title="custodians")
    for column in ("name", "key", "fingerprint", "token", "certificate", "added"):
        table.add_column(column)
    for c in register.custodians:
        table.add_row(c.name, c.kind, c.fingerprint[:16], c.token_label,
                      "self-signed" if c.self_signed else "issued", c.added)
    console().print(table)
    for scope, policy in sorted(register.policies.items()):
        label = "every key" if scope == "*" else f"key {scope!r}"
        click.echo(f"quorum for {label}: {policy.describe()}")
    if not register.policies:
        click.echo("no quorum policy set")


@custodian_group.command("policy")
@click.argument("threshold", type=click.IntRange(min=1))
@click.option("--key", default=None, help="Set the policy of this key (default: the whole keyring).")
@click.option("--custodians", default=None, metavar="A,B,C", help="The N custodians (default: all registered).")
@click.option("--request", "request_path", type=click.Path(exists=True, dir_okay=False),
              help="Approved request, needed when a policy is already in force.")
@click.option("--approval", "approval_paths", multiple=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--transcript", "transcript_path", type=click.Path(dir_okay=False), default=None)
@pass_state
@committing
def custodian_policy(state: CliState, threshold: int, key: str | None, custodians: str | None,
                     request_path: str | None, approval_paths: tuple[str, ...], transcript_path: str | None) -> None:
    """Require THRESHOLD of the custodians (M of N) for a key or the keyring."""
    km = state.manager()
    check_transcript_free(transcript_path)
    policy = km.custody.quorum_policy(threshold, _names(custodians))
    _, transcript = km.custody.set_policy(policy, key=key, request=read_request(request_path),
                                          approvals=read_approvals(approval_paths))
    _write_transcript(transcript_path, transcript, f"the quorum policy was set to {policy.describe()}")
    click.echo(f"quorum for {'key ' + repr(key) if key else 'every key'}: {policy.describe()}")


# -- requests and approvals ---------------------------------------------------------------------

@click.group("request")
def request_group() -> None:
    """Write a request for an operation that needs the custodians' approval."""


def _request_options(command: Any) -> Any:
    command = click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
                           help="Request file to write.")(command)
    command = click.option("--ttl-hours", type=click.IntRange(min=1, max=720), default=24, show_default=True,
                           help="How long approvals may be collected.")(command)
    return click.option("--by", "requested_by", default="", help="Who asks (recorded in the request).")(command)


def _write_request(state: CliState, operation: str, key: str | None, params: dict[str, Any], output: str,
                   ttl_hours: int, requested_by: str) -> None:
    checked_output(output, new=True)
    request = state.manager().custody.request(operation, key=key, params=params, ttl=timedelta(hours=ttl_hours),
                                              requested_by=requested_by)
    write_output(output, request.to_bytes(), new=True)  # never over a request that has approvals
    if state.json_output:
        emit_json({"request": output, "digest": request.digest, "describe": request.describe()}, output=output)
    else:
        report(output, f"wrote {output}: {request.describe()}")
        report(output, f"request digest: {request.digest}")
        report(output, "(each approver sees this digest before signing: read it to them out of band)")


@request_group.command("destroy")
@click.argument("name")
@click.option("--version", "versions", type=click.IntRange(min=1), multiple=True, required=True)
@_request_options
@pass_state
def request_destroy(state: CliState, name: str, versions: tuple[int, ...], output: str, ttl_hours: int,
                    requested_by: str) -> None:
    """Request that versions of key NAME be destroyed."""
    _write_request(state, "destroy", name, {"versions": sorted(set(versions))}, output, ttl_hours, requested_by)


@request_group.command("backup")
@click.argument("name")
@click.option("--versions", default=None, metavar="N,N")
@_request_options
@pass_state
def request_backup(state: CliState, name: str, versions: str | None, output: str, ttl_hours: int,
                   requested_by: str) -> None:
    """Request a backup of key NAME."""
    from keymgr.cli.ceremony import _versions

    _write_request(state, "backup", name, {"versions": _versions(versions)}, output, ttl_hours, requested_by)


@request_group.command("policy")
@click.argument("threshold", type=click.IntRange(min=1))
@click.option("--key", default=None)
@click.option("--custodians", default=None, metavar="A,B,C")
@_request_options
@pass_state
def request_policy(state: CliState, threshold: int, key: str | None, custodians: str | None, output: str,
                   ttl_hours: int, requested_by: str) -> None:
    """Request a change of quorum policy."""
    policy = state.manager().custody.quorum_policy(threshold, _names(custodians))
    _write_request(state, "set-policy", None, {"scope": key or "*", "policy": policy.to_json()}, output, ttl_hours,
                   requested_by)


# -- transcripts ---------------------------------------------------------------------------------

@click.group("transcript")
def transcript_group() -> None:
    """Check ceremony transcripts."""


@transcript_group.command("verify")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@pass_state
def transcript_verify(state: CliState, path: str) -> None:
    """Verify every signature of a transcript and show what it records."""
    from keymgr.custody.transcript import verify_transcript

    verified = verify_transcript(read_file(path, "transcript"))
    known: dict[str, str] = {}
    if state.token_uri:
        known = {c.fingerprint: c.name for c in state.manager().custody.custodians()}
    signers: list[dict[str, Any]] = [{"subject": s, "fingerprint": f, "custodian": known.get(f)}
                                     for s, f in verified.signers]
    doc = verified.document
    if state.json_output:
        emit_json({"valid": True, "signers": signers, "transcript": doc})
        return
    click.echo(f"transcript OK: {doc.get('ceremony')} on token {doc.get('keyring', {}).get('token')!r}, "
               f"{doc.get('started')} .. {doc.get('finished')}, outcome {doc.get('outcome')}")
    for s in signers:
        who = f"registered custodian {s['custodian']!r}" if s["custodian"] else s["subject"]
        click.echo(f"  signed by {who} (key {s['fingerprint'][:16]})")
    for k in doc.get("keys", []):
        click.echo(f"  key {k.get('name')!r} v{k.get('version')} id {k.get('id')} kcv {k.get('kcv') or '-'}")


# -- threshold recipients ------------------------------------------------------------------------

@click.group("quorum")
def quorum_group() -> None:
    """Encrypt so that M custodians together can decrypt (break glass), and decrypt so."""


@quorum_group.command("encrypt")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.option("--key", required=True, help="The key that encrypts for everyday use.")
@click.option("--context", "context", multiple=True, metavar="KEY=VALUE")
@pass_state
def quorum_encrypt(state: CliState, source: str, output: str, key: str, context: tuple[str, ...]) -> None:
    """Encrypt SOURCE for KEY and for the key's custodian quorum."""
    checked_output(output)
    km = state.manager()
    recipient = km.custody.threshold_recipient(key)
    blob = km.encrypt(read_file(source, "input"), key=key, context=_context(context), also_to=[recipient])
    write_output(output, blob)
    report(output, f"wrote {output}: readable with key {key!r} or by {recipient.description}")


@quorum_group.command("decrypt")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.option("--custodian", "custodians", multiple=True, metavar="NAME=URI")
@click.option("--context", "context", multiple=True, metavar="KEY=VALUE")
@pass_state
def quorum_decrypt(state: CliState, source: str, output: str, custodians: tuple[str, ...],
                   context: tuple[str, ...]) -> None:
    """Decrypt SOURCE through its threshold recipient, with M custodians' tokens."""
    from keymgr.custody.threshold import decrypt_with_quorum, read_threshold
    from keymgr.envelope import parse_message

    checked_output(output)  # before the custodians come: plaintext that cannot be written is not made
    blob = read_file(source, "message")
    infos = [i for i in (read_threshold(ri) for ri in parse_message(blob).recipient_infos) if i is not None]
    if not infos:
        raise errors.KeyNotFoundError("the message has no threshold recipient")
    module = state.module_path()
    tokens = collect_custodians([s.custodian for s in infos[0].slots], infos[0].threshold, custodians, module,
                                "message")
    try:
        plaintext = decrypt_with_quorum(blob, tokens, context=_context(context))
    finally:
        for token in tokens:
            token.close()
    write_output(output, plaintext, mode=0o600)
    report(output, f"wrote {output}")


def register_custody_commands(group: click.Group) -> None:
    """Add the dual-control commands to the ``keymgr`` group."""
    from keymgr.cli.ceremony import backup_command, restore_command

    for command in (custodian_group, request_group, approve_command, backup_command, restore_command,
                    transcript_group, quorum_group):
        group.add_command(command)
