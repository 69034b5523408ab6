"""What every CLI command shares: token choice, output, and error handling.

The CLI is thin (STYLE.md 10): it parses, calls the library, prints. Every
:class:`~keymgr.errors.KeymgrError` becomes one line on stderr and a non-zero
exit code chosen by category; anything unexpected is one line too (a traceback
only with ``KEYMGR_DEBUG=1``), because a custodian at a terminal must never
see a stack trace or, worse, a secret inside one. So is an interrupt: Ctrl-C
(SIGINT) exits 130 and SIGTERM 143, at any moment (:mod:`keymgr.interrupts`),
after the cleanup the exception unwinds through; input that ends at a prompt
(Ctrl-D) is a cancellation, one line and 130 too.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import click

from keymgr import errors, interrupts

__all__ = ["DoneButNotRecorded", "CliState", "GuardedGroup", "pass_state", "committing", "emit_json", "fail",
           "EXIT_CODES", "EXIT_CODE_MEANINGS", "console", "exit_codes_help", "report", "to_stderr", "warn_pin_value",
           "ALLOW_PIN_VALUE_VAR"]

F = TypeVar("F", bound=Callable[..., Any])

class DoneButNotRecorded(errors.StorageError):
    """The change was made (a key rotated, destroyed, restored; a policy set), but a file that records
    it (its signed transcript) could not be written. Not "nothing was changed" (exit 8): a script that
    retried on 8 would rotate twice, so this has an exit code of its own (9)."""


#: Exit codes by error category (2 is click's usage error).
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (DoneButNotRecorded, 9),
    (errors.AuthenticationError, 3),
    (errors.IntegrityError, 4),
    (errors.PolicyError, 5),
    (errors.KeyNotFoundError, 6),
    (errors.TokenNotFoundError, 6),
    (errors.FormatError, 7),
    (errors.StorageError, 8),
    (errors.ConfigurationError, 2),
    (errors.KeymgrError, 1),
)

#: Every exit code of ``keymgr``, as ``keymgr --help`` and docs/getting-started.md list them.
EXIT_CODE_MEANINGS: tuple[tuple[int, str], ...] = (
    (0, "success"),
    (1, "other error (internal ones: rerun with KEYMGR_DEBUG=1)"),
    (2, "usage or configuration: bad arguments, missing files, limits"),
    (3, "PIN or login failed"),
    (4, "integrity: tampered, truncated, wrong key or wrong context"),
    (5, "refused by policy: key state, approvals, rate limit"),
    (6, "no such key or token"),
    (7, "malformed input: not a keymgr stream or message"),
    (8, "storage: a file could not be written (disk full ...); nothing was changed"),
    (9, "done, but its transcript could not be written (the change WAS made)"),
    (130, "interrupted (Ctrl-C, SIGINT), or input ended at a prompt (Ctrl-D)"),
    (141, "standard output closed by its reader (SIGPIPE)"),
    (143, "terminated (SIGTERM)"),
)


def exit_codes_help() -> str:
    """The exit-code table for ``keymgr --help`` (``\b`` keeps click from re-wrapping it)."""
    return "\b\nExit codes:\n" + "\n".join(f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODE_MEANINGS)


@dataclass
class CliState:
    """Options given before the command: which token, and how to print."""

    token_uri: str | None = None
    json_output: bool = False
    _manager: Any = field(default=None, repr=False)

    @property
    def local(self) -> bool:
        """Whether the token is the embedded local one: no ``--token``, or the URI ``keymgr init`` printed."""
        if self.token_uri is None:
            return True
        from keymgr.hsm.local import LocalToken

        return LocalToken.default().is_named_by(self.token_uri)

    def module_path(self) -> str:
        """The PKCS#11 module of ``--token``'s token (custodians' tokens are opened with it),
        else the default module."""
        if self.token_uri is None:
            from keymgr.hsm.discovery import default_module_path

            return default_module_path()
        km = self.manager()
        return str(km.token_info.module_path)

    def manager(self) -> Any:
        """The KeyManager for ``--token`` (or the local token), opened once."""
        if self._manager is None:
            from keymgr.manager import KeyManager

            self._manager = KeyManager(self.token_uri)
        return self._manager

    def close_manager(self) -> None:
        """Close the KeyManager now (its aggregated audit counts are written now, not at exit);
        a later :meth:`manager` opens a new one."""
        if self._manager is not None:
            self._manager.close()
            self._manager = None


pass_state = click.make_pass_decorator(CliState, ensure=True)


def committing(command: F) -> F:
    """For a command that makes a change with a commit (restore, backup, rotate, destroy, policy):
    the command is a commit scope (:func:`keymgr.interrupts.commit_scope`), so that an interrupt
    arriving once the change's commit began waits until the command has written its files and
    printed its outcome, and then ends it (status 130 / 143, saying the change was completed)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        with interrupts.commit_scope():
            return command(*args, **kwargs)

    return run  # type: ignore[return-value]


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # piped output (files, CI logs) gets wide rows instead of truncated cells
    width = None if stream.isatty() else 240
    return Console(file=stream, highlight=False, soft_wrap=True, width=width)


def emit_json(data: Any, *, output: object = None) -> None:
    """The command's JSON report: on stdout, or on stderr when the command's data went to stdout
    (``-o -``), so that the two never mix."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str), err=to_stderr(output))


def to_stderr(output: object) -> bool:
    """Whether a command's own report lines must go to stderr: its data goes to stdout (``-o -``)."""
    return str(output) == "-"


def report(output: object, line: str) -> None:
    """One line of a command's report about writing ``output`` (stderr when the data is on stdout)."""
    click.echo(line, err=to_stderr(output))


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"keymgr: error: {_one_line(message)}", err=True)
    sys.exit(code)


def exit_code_for(exc: BaseException) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1


def _input_ended() -> NoReturn:
    """End at a prompt whose input ended (Ctrl-D): a cancellation, reported as an interrupt is."""
    lead = "\n" if sys.stderr.isatty() else ""
    click.echo(f"{lead}keymgr: cancelled: input ended at a prompt", err=True)
    sys.exit(interrupts.INTERRUPTED)


def _interrupted_behind(exc: BaseException) -> None:
    """An error that an interrupt caused (or that came after one) ends the run as interrupted."""
    interrupt = interrupts.interrupt_behind(exc)
    if interrupt is not None:
        interrupts.report(interrupt)


#: Set to 1 to silence the pin-value warning (tests and CI that mean it).
ALLOW_PIN_VALUE_VAR = "KEYMGR_ALLOW_PIN_VALUE"


def _has_pin_value(text: str) -> bool:
    lowered = text.lower()
    return "pkcs11:" in lowered and "pin-value=" in lowered


def warn_pin_value(args: list[str]) -> None:
    """One line on stderr when a PIN sits in a URI on the command line (every user of the
    machine reads it with ``ps``) or in ``KEYMGR_TOKEN`` (the environment of a process is
    readable by its user and root, and inherited by every child)."""
    if os.environ.get(ALLOW_PIN_VALUE_VAR) == "1":
        return
    where = [w for w, found in (("on the command line (visible to every user through ps)",
                                 any(_has_pin_value(a) for a in args)),
                                ("in KEYMGR_TOKEN", _has_pin_value(os.environ.get("KEYMGR_TOKEN", ""))))
             if found]
    if where:
        click.echo(f"keymgr: warning: a pin-value= PIN {' and '.join(where)}: use pin-source=file:PATH (a 0600 "
                   f"file) or pin-source=env:KEYMGR_PIN instead ({ALLOW_PIN_VALUE_VAR}=1 silences this)", err=True)


class GuardedGroup(click.Group):
    """A click group that turns keymgr errors into one line and an exit code.

    Doing it in ``invoke`` (not around ``main``) means click's test runner sees
    exactly what a user at a terminal sees.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Accept ``--json`` anywhere before ``--`` (``keymgr key list --json`` and
        ``keymgr --json key list`` mean the same): it is moved to the top level."""
        if ctx.parent is None:
            warn_pin_value(args)
            end = args.index("--") if "--" in args else len(args)
            if "--json" in args[:end]:
                args = ["--json"] + [a for a in args[:end] if a != "--json"] + args[end:]
        try:
            return super().parse_args(ctx, args)
        except KeyboardInterrupt as exc:  # click would print "Aborted!" and exit 1
            interrupts.report(exc)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            try:
                return super().invoke(ctx)
            except errors.KeymgrError as exc:
                _interrupted_behind(exc)
                fail(str(exc), exit_code_for(exc))
            except click.Abort as exc:
                if isinstance(exc.__context__, KeyboardInterrupt):  # Ctrl-C at a click prompt
                    interrupts.report(exc.__context__)
                if isinstance(exc.__context__, EOFError):  # Ctrl-D, or no more input, at a prompt
                    _input_ended()
                raise
            except (click.exceptions.Exit, click.ClickException):
                raise
            except BrokenPipeError:
                sys.exit(141)
            except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
                _interrupted_behind(exc)
                if os.environ.get("KEYMGR_DEBUG"):
                    raise
                fail(f"internal error ({type(exc).__name__}); rerun with KEYMGR_DEBUG=1 for details")
        except KeyboardInterrupt as exc:  # also one raised while an error above was being reported
            interrupts.report(exc)
