"""What every CLI command shares: token choice, output, and error handling.

The CLI is thin (STYLE.md 10): it parses, calls the library, prints. Every
:class:`~keymgr.errors.KeymgrError` becomes one line on stderr and a non-zero
exit code chosen by category; anything unexpected is one line too (a traceback
only with ``KEYMGR_DEBUG=1``), because a custodian at a terminal must never
see a stack trace or, worse, a secret inside one.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, NoReturn

import click

from keymgr import errors

__all__ = ["CliState", "GuardedGroup", "pass_state", "emit_json", "fail", "EXIT_CODES", "console"]

#: Exit codes by error category (2 is click's usage error).
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
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


@dataclass
class CliState:
    """Options given before the command: which token, and how to print."""

    token: str | None = None
    json_output: bool = False
    _manager: Any = field(default=None, repr=False)

    def manager(self) -> Any:
        """The KeyManager for ``--token`` (or the local token), opened once."""
        if self._manager is None:
            from keymgr.manager import KeyManager

            self._manager = KeyManager(self.token)
        return self._manager


pass_state = click.make_pass_decorator(CliState, ensure=True)


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # piped output (files, CI logs) gets wide rows instead of truncated cells
    width = None if stream.isatty() else 240
    return Console(file=stream, highlight=False, soft_wrap=True, width=width)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


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


class GuardedGroup(click.Group):
    """A click group that turns keymgr errors into one line and an exit code.

    Doing it in ``invoke`` (not around ``main``) means click's test runner sees
    exactly what a user at a terminal sees.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Accept ``--json`` anywhere before ``--`` (``keymgr key list --json`` and
        ``keymgr --json key list`` mean the same): it is moved to the top level."""
        if ctx.parent is None:
            end = args.index("--") if "--" in args else len(args)
            if "--json" in args[:end]:
                args = ["--json"] + [a for a in args[:end] if a != "--json"] + args[end:]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except errors.KeymgrError as exc:
            fail(str(exc), exit_code_for(exc))
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except BrokenPipeError:
            sys.exit(141)
        except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
            if os.environ.get("KEYMGR_DEBUG"):
                raise
            fail(f"internal error ({type(exc).__name__}); rerun with KEYMGR_DEBUG=1 for details")
