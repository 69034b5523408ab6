"""``keymgr key ...``: named keys and their versions."""

from __future__ import annotations

import sys
from typing import Any

import click

from keymgr import KeyRecord, errors
from keymgr.cli._common import CliState, console, emit_json, pass_state
from keymgr.hsm.templates import DEFAULT_PROFILE

__all__ = ["key_group", "record_json"]


def record_json(record: KeyRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "profile": record.profile,
        "primary": record.primary,
        "created": record.created,
        "min_decryption_version": record.min_decryption_version,
        "policy": {"rotate_after_days": record.policy.rotate_after_days,
                   "max_messages": record.policy.max_messages, "auto_rotate": record.policy.auto_rotate,
                   "backup": record.policy.backup},
        "versions": [{"version": v.version, "id": v.key_id.hex(), "label": record.label_of(v.version),
                      "state": v.state, "created": v.created, "kcv": v.kcv, "primary": v.version == record.primary,
                      "uses": v.uses, "decrypts": v.version >= record.min_decryption_version
                      and v.state in ("active", "decrypt-only"),
                      "history": [{"state": s, "at": t} for s, t in v.history]}
                     for v in record.versions],
    }


def _print_records(records: list[KeyRecord]) -> None:
    from rich.table import Table

    table = Table(title="keys")
    for column in ("name", "version", "state", "primary", "CKA_ID", "KCV", "uses", "profile", "created"):
        table.add_column(column)
    for record in records:
        for v in record.versions:
            state = v.state if v.version >= record.min_decryption_version else f"{v.state} (retired)"
            table.add_row(record.name, str(v.version), state, "*" if v.version == record.primary else "",
                          v.key_id.hex(), v.kcv or "-", str(v.uses), record.profile, v.created)
    console().print(table)
    for record in records:
        if record.min_decryption_version > 1:
            click.echo(f"{record.name}: minimum decryption version {record.min_decryption_version}")


@click.group("key")
def key_group() -> None:
    """Create, list and inspect named keys."""


@key_group.command("create")
@click.argument("name")
@click.option("--profile", type=click.Choice(["kw", "gcm"]), default=DEFAULT_PROFILE, show_default=True,
              help="How the key protects data keys: kw = AES key wrap (standard), gcm = AES-GCM in the token.")
@click.option("--rotate-after-days", type=click.IntRange(min=1), default=None, help="Cryptoperiod.")
@click.option("--max-messages", type=click.IntRange(min=1), default=None, help="Encryptions per version.")
@click.option("--auto-rotate", is_flag=True, help="Rotate automatically when the cryptoperiod ends or the "
              "version reaches --max-messages (instead of refusing to encrypt).")
@click.option("--backup", is_flag=True, help="Make the key backup-capable (M-of-N custodian backups; "
              "docs/ceremonies.md). Without it the key can never leave the token.")
@click.option("--transcript", "transcript_path", type=click.Path(dir_okay=False), default=None,
              help="Write the signed ceremony transcript (CMS SignedData) here.")
@click.option("--exist-ok", is_flag=True, help="Get or create: a key NAME of that profile that exists already is "
              "shown as it is (its policy untouched) instead of an error; for scripts run again.")
@pass_state
def create_command(state: CliState, name: str, profile: str, rotate_after_days: int | None,
                   max_messages: int | None, auto_rotate: bool, backup: bool, transcript_path: str | None,
                   exist_ok: bool) -> None:
    """Generate a new key NAME (version 1) inside the token."""
    from keymgr.cli._custody_common import check_transcript_free

    check_transcript_free(transcript_path)  # before the key exists: a transcript is never overwritten
    km = state.manager()
    existed = exist_ok and _exists(km, name)
    record = km.create_key(name, profile=profile, rotate_after_days=rotate_after_days, max_messages=max_messages,
                           backup=backup, auto_rotate=auto_rotate, exist_ok=exist_ok)
    if existed:
        v = record.primary_version
        _say(state, record, f"key {record.name!r} exists already: primary version {v.version} "
                            f"(CKA_ID {v.key_id.hex()}, KCV {v.kcv or '-'}); nothing was created")
        return
    if transcript_path:
        from keymgr.cli._custody_common import write_change_transcript

        write_change_transcript(transcript_path, lambda: km.custody.key_transcript(
            "create", record, profile=profile, backup=backup),
            f"key {name!r} was created")
    if state.json_output:
        emit_json(record_json(record))
    else:
        v = record.primary_version
        click.echo(f"created key {record.name!r} version {v.version} (CKA_ID {v.key_id.hex()}, KCV {v.kcv or '-'})")


def _exists(km: Any, name: str) -> bool:
    try:
        km.describe_key(name)
    except errors.KeyNotFoundError:
        return False
    return True


def _say(state: CliState, record: Any, line: str) -> None:
    if state.json_output:
        emit_json(record_json(record))
    else:
        click.echo(line)


@key_group.command("list")
@pass_state
def list_command(state: CliState) -> None:
    """List every named key and its versions."""
    records = state.manager().list_keys()
    if state.json_output:
        emit_json({"keys": [record_json(r) for r in records]})
    else:
        _print_records(records)


@key_group.command("show")
@click.argument("name")
@pass_state
def show_command(state: CliState, name: str) -> None:
    """Show one key: versions, states, dates, key check values, uses, primary, minimum decryption
    version, and whether each version's key object proves the token made it (keymgr key verify)."""
    manager = state.manager()
    record = manager.describe_key(name)
    checks = {c.version: c for c in manager.verify_keys(name)}
    if state.json_output:
        data = record_json(record)
        for version in data["versions"]:
            check = checks[version["version"]]
            version["verified"] = check.ok
            version["verdict"] = check.verdict
        emit_json(data)
    else:
        _print_records([record])
        for number, check in sorted(checks.items()):
            click.echo(f"{name} v{number}: {check.verdict}")


@key_group.command("verify")
@click.argument("name", required=False)
@pass_state
def verify_command(state: CliState, name: str | None) -> None:
    """Check that every version of NAME (default: every key) is what the token made: generated
    inside it (CKA_LOCAL), never readable or extractable, its profile's roles only, the recorded
    key check value. A planted or altered version fails; so does a MAC key the token did not make,
    and a key object that no fact names (facts deleted). Exit 4 if anything fails."""
    manager = state.manager()
    try:
        checks = manager.verify_keys(name)
    except errors.KeyNotFoundError:
        if name is None or not manager.verify_token_objects(name)[0]:
            raise
        checks = []  # no key of that name, yet objects labelled as its versions: report them
    failed = [c for c in checks if not c.ok]
    problems, notes = manager.verify_token_objects(name)
    if state.json_output:
        emit_json({"ok": not failed and not problems, "versions": [
            {"key": c.name, "version": c.version, "id": c.key_id.hex(), "restored": c.restored, "ok": c.ok,
             "failures": list(c.failures)} for c in checks], "token_objects": problems, "notes": notes})
    else:
        for c in checks:
            click.echo(f"{c.name} v{c.version} ({c.key_id.hex()}): {c.verdict}")
        for line in problems:
            click.echo(f"FAILED: {line}")
        for line in notes:
            click.echo(f"note: {line}")
        click.echo(f"{len(checks)} version(s) checked, {len(failed)} failed"
                   + (f"; {len(problems)} problem(s) with other token objects" if problems else ""))
    if failed or problems:
        sys.exit(4)
