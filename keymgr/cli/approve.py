"""``keymgr approve``: a custodian signs a request, having seen all of it.

What is shown before the question (:meth:`keymgr.custody.approvals.Request.explain`):
the operation in full (a destroy's versions by CKA_ID and KCV and the word
"irreversible", a policy's threshold and custodians), the HSM by label and serial,
the approving quorum with each custodian's key fingerprint, and the request's full
digest, the same one ``keymgr request`` printed, to compare out of band. Before the
PIN: the custodian must be one of that quorum and the token must show their
registered key; before signing, in any case, the key signing must be that key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from keymgr import errors
from keymgr.cli._common import CliState, pass_state, report
from keymgr.cli._custody_common import custodian_uri, default_path, pin_prompt, read_file
from keymgr.cli._output import checked_output, write_output
from keymgr.terminal import confirmation_input

__all__ = ["approve_command"]


@click.command("approve")
@click.argument("request_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--custodian", "name", required=True, help="Your custodian name.")
@click.option("--token", "--custodian-token", "uri", default=None, metavar="URI",
              help="Your token (label or pkcs11: URI); asked if not given.")
@click.option("--key-label", default=None)
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="Approval file (default: REQUEST.NAME.approval).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_state
def approve_command(state: CliState, request_path: str, name: str, uri: str | None, key_label: str | None,
                    output: str | None, yes: bool) -> None:
    """Sign an approval of the request in REQUEST_PATH with your token's key.

    The request is shown in full first (with its digest, to compare with the one the requester
    gave you); your token is checked to hold your registered key before your PIN is asked."""
    from keymgr.audit import standalone_operation
    from keymgr.custody.approvals import Request, approve

    request = Request.parse(read_file(request_path, "request"))
    out = output or str(default_path(Path(request_path), f".{name}.approval"))
    checked_output(out, new=True)  # before the PIN: an approval that cannot be written costs the custodian nothing
    fingerprint = _approver_fingerprint(state, request, name)
    click.echo("You are asked to approve:", err=True)
    for line in request.explain():
        click.echo(line, err=True)
    if not yes:
        confirmation_input()  # only what is typed after the request was shown may approve it
    if not yes and not click.confirm(f"Approve it as custodian {name!r}?", default=False, err=True):
        raise errors.PolicyError("not approved")
    module = state.module_path()
    if uri is None:
        uri = click.prompt("Your token (token label or pkcs11: URI)", err=True)
    with standalone_operation("approve", local=not state.token_uri, key=request.key,
                              detail={"custodian": name, "request": request.digest,
                                      "operation": request.operation}):
        token_uri = custodian_uri(uri, module)
        signer = _approver_token(token_uri, name, fingerprint, key_label)
        try:
            approval = approve(request, signer)
        finally:
            signer.close()
    write_output(out, approval.to_bytes(), new=True)  # never over a request or another approval
    report(out, f"wrote {out}: approval by {name!r} of request {request.digest}")


def _approver_fingerprint(state: CliState, request: Any, name: str) -> str | None:
    """The registered key of custodian ``name`` for this request: from the quorum the request shows,
    else (an older request) from the register when the HSM is at hand; None if neither says."""
    quorum = request.shows["quorum"] if request.shows is not None else None
    if quorum is not None:
        members = {c["name"]: c["fingerprint"] for c in quorum["custodians"]}
        if name not in members:
            raise errors.PolicyError(f"custodian {name!r} is not one of those who approve this request "
                                     f"({', '.join(members)}); check --custodian")
        return str(members[name])
    if not state.token_uri:
        click.echo("  note: this request does not name the custodians' keys; your token is checked when the "
                   "approvals are used", err=True)
        return None
    return str(state.manager().custody.register().custodian(name).fingerprint)


def _approver_token(uri: str, name: str, fingerprint: str | None, key_label: str | None) -> Any:
    """The approver's token, logged in, holding their registered key: checked before the PIN where
    the token shows its public keys, and before anything is signed in any case."""
    from keymgr.custody.custodian_token import CustodianToken, check_shown_key
    from keymgr.hsm import open_token

    ts = open_token(uri, login=False)
    try:
        if fingerprint is not None:
            check_shown_key(ts, name, fingerprint)
        ts = open_token(uri, pin_callback=pin_prompt(name))
        if fingerprint is None:
            return CustodianToken.local(name, ts, key_label=key_label)
        return CustodianToken.by_fingerprint(name, ts, fingerprint, key_label=key_label)
    except BaseException:
        ts.close()
        raise
