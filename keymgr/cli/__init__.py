"""The ``keymgr`` command line, for key custodians and CI pipelines.

A thin layer over the library (STYLE.md 10): each command parses its
arguments, calls :class:`keymgr.KeyManager` or :mod:`keymgr.hsm`, and prints a
rich table or, with ``--json``, machine output. Errors are one line on stderr
with a non-zero exit code (see :mod:`keymgr.cli._common`; the codes are listed
in ``keymgr --help``). The program itself starts in :mod:`keymgr.__main__`.
"""

from __future__ import annotations

import click

from keymgr.cli._common import CliState, GuardedGroup, exit_codes_help
from keymgr.cli.audit import audit_group
from keymgr.cli.crypt import register_crypt_commands
from keymgr.cli.custody import register_custody_commands
from keymgr.cli.fields import fields_group
from keymgr.cli.keys import key_group
from keymgr.cli.lifecycle import register_lifecycle_commands
from keymgr.cli.rewrap import rewrap_command
from keymgr.cli.token_cmds import token_group
from keymgr.cli.tokens import init_command, tokens_command

__all__ = ["main", "cli"]


@click.group(cls=GuardedGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=exit_codes_help())
@click.option("--token", "token", envvar="KEYMGR_TOKEN", metavar="URI",
              help="pkcs11: URI of the token (default: the local SoftHSM token made by `keymgr init`).")
@click.option("--json", "json_output", is_flag=True, help="Print machine-readable JSON.")
@click.version_option(package_name="keymgr", prog_name="keymgr")
@click.pass_context
def cli(ctx: click.Context, token: str | None, json_output: bool) -> None:
    """keymgr: encryption keys kept in hardware tokens."""
    ctx.obj = CliState(token_uri=token or None, json_output=json_output)


cli.add_command(init_command)
cli.add_command(tokens_command)
cli.add_command(token_group)
cli.add_command(key_group)
cli.add_command(rewrap_command)
register_lifecycle_commands(key_group)
cli.add_command(audit_group)
cli.add_command(fields_group)
register_crypt_commands(cli)
register_custody_commands(cli)


def main() -> None:
    """The ``keymgr`` command (:func:`keymgr.__main__.main`: interrupts handled from the first moment)."""
    from keymgr.__main__ import main as run

    run()
