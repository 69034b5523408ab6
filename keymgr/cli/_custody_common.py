"""What the custody commands share: custodian token URIs, PIN prompts, approval files."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import click

from keymgr import errors
from keymgr.custody.approvals import Approval, Request
from keymgr.files import write_new
from keymgr.hsm.pins import PinCallback, PinRequest, tries_left_note

__all__ = ["custodian_uri", "parse_custodian_option", "pin_prompt", "read_approvals", "read_file", "read_request",
           "check_transcript_free", "write_transcript",
           "write_change_transcript"]

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
        shown = request.tries_left in ("final-try", "count-low")
        warning = f" [{tries_left_note(request.tries_left)}]" if shown else ""
        return str(click.prompt(f"{what} for token {request.token_label!r}{who}{warning}", hide_input=True,
                                err=True))

    return callback


def default_path(base: Path, suffix: str) -> Path:
    return base.with_name(base.name + suffix)


_TRANSCRIPT_SUFFIX = ".transcript.p7s"
#: how many numbered names a transcript tries before giving up
_TRANSCRIPT_NAMES = 1000


def check_transcript_free(path: str | None) -> None:
    """Before a ceremony: refuse a ``--transcript`` path that exists (a transcript is never
    overwritten), or whose directory is missing or not writable: saying so after the ceremony
    would be too late to choose another."""
    if path is None:
        return
    if os.path.lexists(path):
        raise errors.ConfigurationError(f"{path} exists already; keymgr never overwrites a transcript: "
                                        "give another --transcript path (or move that file)")
    from keymgr.cli._output import checked_output

    checked_output(path, new=True)


def _numbered(path: Path, number: int) -> Path:
    name = path.name
    base, ext = ((name[: -len(_TRANSCRIPT_SUFFIX)], _TRANSCRIPT_SUFFIX) if name.endswith(_TRANSCRIPT_SUFFIX)
                 else os.path.splitext(name))
    return path.with_name(f"{base}-{number}{ext}")


def write_transcript(path: Path, data: bytes, *, done: str | None = None) -> Path:
    """Write a signed transcript to a new file: ``path``, or if that name is taken (a second restore
    of one backup), the first free of ``NAME-2.transcript.p7s``, ``-3`` ...; returns where it went.
    An existing transcript is never replaced (docs/ceremonies.md). ``done``: the change it records,
    already made; a failure then says so (:class:`~keymgr.cli._common.DoneButNotRecorded`, exit 9)
    instead of "nothing was changed"."""
    try:
        return _write_free(path, data)
    except errors.StorageError as exc:
        if done is None:
            raise
        from keymgr.cli._common import DoneButNotRecorded

        reason = str(exc).removesuffix("; nothing was changed")
        raise DoneButNotRecorded(f"{done}, but its transcript could not be written: {reason}") from None


def _write_free(path: Path, data: bytes) -> Path:
    for number in range(1, _TRANSCRIPT_NAMES + 1):
        candidate = path if number == 1 else _numbered(path, number)
        try:
            write_new(candidate, data)
            return candidate
        except FileExistsError:
            continue
    raise errors.StorageError(f"no free name for the transcript beside {path}; move old transcripts away")


def write_change_transcript(path: str, make: Callable[[], bytes], done: str) -> None:
    """Sign and write the transcript of a change already made: a failure says the change was made
    (exit 9), never "nothing was changed"."""
    from keymgr.cli._common import DoneButNotRecorded

    try:
        data = make()
    except errors.KeymgrError as exc:
        raise DoneButNotRecorded(f"{done}, but its transcript could not be signed: {exc}") from None
    written = write_transcript(Path(path), data, done=done)
    if str(written) != path:
        click.echo(f"signed transcript: {written} ({path} appeared meanwhile)", err=True)
