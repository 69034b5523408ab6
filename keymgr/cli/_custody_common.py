"""What the custody commands share: custodian token URIs, PIN prompts, approval files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click

from keymgr import errors
from keymgr.custody.approvals import Approval, Request
from keymgr.hsm.pins import PinCallback, PinRequest

__all__ = ["custodian_uri", "parse_custodian_option", "pin_prompt", "read_approvals", "read_file", "read_request"]

MAX_INPUT = 16 * 1024 * 1024


def read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_INPUT + 1)
    except OSError as exc:
        raise errors.ConfigurationError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > MAX_INPUT:
        raise errors.FormatError(f"{what} {path} is too large")
    return data


def read_request(path: str | None) -> Request | None:
    return None if path is None else Request.parse(read_file(path, "request"))


def read_approvals(paths: Sequence[str]) -> list[Approval]:
    approvals = []
    for path in paths:
        try:
            approvals.append(Approval.parse(read_file(path, "approval")))
        except errors.FormatError as exc:
            raise errors.FormatError(f"{path}: {exc}") from None
    return approvals


def custodian_uri(value: str, module_path: str) -> str:
    """A custodian's token: a full ``pkcs11:`` URI, or a bare token label on the HSM's module."""
    value = value.strip()
    if not value:
        raise errors.ConfigurationError("no token given")
    if value.startswith("pkcs11:"):
        return value
    if any(c in value for c in ";?&/%"):
        raise errors.ConfigurationError(f"{value!r} is neither a token label nor a pkcs11: URI")
    return f"pkcs11:token={value}?module-path={module_path}"


def parse_custodian_option(value: str) -> tuple[str, str]:
    """``NAME=URI`` (the URI carrying pin-source or pin-value for automation)."""
    name, sep, uri = value.partition("=")
    if not sep or not name or not uri:
        raise errors.ConfigurationError(f"--custodian takes NAME=URI, not {value!r}")
    return name.strip(), uri.strip()


def pin_prompt(custodian: str | None = None) -> PinCallback:
    """A no-echo terminal prompt for a PIN, saying whose token it is for."""

    def callback(request: PinRequest) -> str | None:
        who = f" (custodian {custodian!r})" if custodian else ""
        what = "SO PIN" if request.user == "so" else "PIN"
        warning = {"final-try": " [FINAL TRY before the PIN locks]",
                   "count-low": " [few tries left]"}.get(request.tries_left, "")
        return str(click.prompt(f"{what} for token {request.token_label!r}{who}{warning}", hide_input=True,
                                err=True))

    return callback


def default_path(base: Path, suffix: str) -> Path:
    return base.with_name(base.name + suffix)
