"""``keymgr init`` and ``keymgr tokens``: the local token, and what tokens exist."""

from __future__ import annotations

import os
from typing import Any

import click

from keymgr import errors
from keymgr.cli._common import CliState, emit_json, pass_state

__all__ = ["init_command", "tokens_command"]


@click.command("init")
@click.option("--prompt-pin", is_flag=True,
              help="Choose the user PIN and the SO PIN at prompts; neither is kept on disk (later commands ask "
                   "for the PIN at a terminal, or read KEYMGR_PIN).")
@click.option("--keep-so-pin", is_flag=True,
              help="Keep the SO PIN in a 0600 file beside the user PIN (a development machine) instead of "
                   "showing it once.")
@pass_state
def init_command(state: CliState, prompt_pin: bool, keep_so_pin: bool) -> None:
    """Create the local SoftHSM token (idempotent) and print its URI.

    By default the user PIN is generated into a 0600 file the URI names, and the
    SO PIN is generated and shown once on standard error, not kept: write it down
    (it unlocks a locked user PIN and authorises backups)."""
    from keymgr.hsm.local import LocalToken

    local = LocalToken.default()
    pin = so_pin = None
    if prompt_pin and not local.is_initialised():
        limits = local.pin_limits()  # before any PIN is typed: a wrong length is asked again, never half-set
        pin = _new_pin("New user PIN", limits)
        so_pin = _new_pin("New SO PIN", limits)
        if so_pin == pin:
            raise errors.ConfigurationError("the SO PIN must differ from the user PIN; nothing was created")
    result = local.init(pin, so_pin=so_pin, keep_so_pin=keep_so_pin)
    if result.so_pin is not None:
        click.echo(f"SO PIN of the local token (shown once, kept nowhere; write it down): {result.so_pin.reveal()}",
                   err=True)
        result.so_pin.wipe()
    uri = local.uri()
    if state.json_output:
        emit_json({"created": result.created, "home": str(local.home), "token_uri": uri,
                   "pin_file": str(local.pin_path) if local.pin_kept else None,
                   "so_pin_file": str(local.so_pin_path) if local.so_pin_path.is_file() else None})
        return
    verb = "Created" if result.created else "Already initialised:"
    click.echo(f"{verb} local token 'keymgr' in {local.home}")
    if local.pin_kept:
        click.echo(f"  user PIN kept in {local.pin_path} (mode 0600)")
    else:
        click.echo("  user PIN kept nowhere: commands ask for it at a terminal, or read KEYMGR_PIN")
    if local.so_pin_path.is_file():
        click.echo(f"  SO PIN kept in {local.so_pin_path} (mode 0600)")
    click.echo(f"  token URI: {uri}")


def _new_pin(prompt: str, limits: tuple[int, int]) -> str:
    """A new PIN typed twice, asked again while its length is outside the token's ``limits``."""
    import sys

    from keymgr.terminal import discard_typed_ahead

    low, high = limits
    while True:
        typed = str(click.prompt(prompt, hide_input=True, confirmation_prompt=True, err=True))
        if low <= len(typed) <= high:
            return typed
        if not sys.stdin.isatty():
            raise errors.ConfigurationError(f"a PIN must have {low} to {high} characters; nothing was set")
        click.echo(f"  a PIN must have {low} to {high} characters (the token's limits); try again", err=True)
        discard_typed_ahead()


def _flag_names(flags: int, names: dict[int, str]) -> list[str]:
    return [name for bit, name in names.items() if flags & bit]


_TOKEN_FLAGS = {0x1: "rng", 0x2: "write-protected", 0x4: "login-required", 0x8: "user-pin-initialized",
                0x100: "protected-auth-path", 0x400: "token-initialized", 0x10000: "user-pin-count-low",
                0x20000: "user-pin-final-try", 0x40000: "user-pin-locked", 0x80000: "user-pin-to-be-changed"}
_SLOT_FLAGS = {0x1: "token-present", 0x2: "removable", 0x4: "hardware"}


def _describe_token(found: Any, probe_caps: bool, logged_in: list[Any]) -> dict[str, Any]:
    from keymgr.hsm import open_token, probe
    from keymgr.hsm.sessions import tries_left_state

    info: dict[str, Any] = {
        "module": found.module.path, "library": found.module.description, "slot_id": found.slot_id,
        "slot": found.slot_description, "label": found.label, "manufacturer": found.manufacturer,
        "model": found.model, "serial": found.serial,
        "flags": _flag_names(found.flags, _TOKEN_FLAGS),
        "slot_flags": _flag_names(found.slot_flags, _SLOT_FLAGS),
        "pin_state": "locked" if tries_left_state(found.flags) == "locked" else tries_left_state(found.flags),
        "uri": found.uri(),
        "initialized": bool(found.flags & 0x400),
    }
    if probe_caps and info["initialized"]:  # tpm2-pkcs11 shows an empty slot for the next token
        try:
            selected = [ts for ts in logged_in if ts.found.module is found.module and ts.serial == found.serial
                        and ts.label == found.label]
            ts = selected[0] if selected else open_token(found.uri(), login=False)
            caps = probe(ts)
            info["capabilities"] = sorted(caps.supported)
            info["schemes"] = list(caps.schemes)
            info["probed_logged_in"] = ts.logged_in
            if not ts.logged_in and not caps.supported & {"rsa-keygen", "ec-keygen"}:
                # a TPM or a card makes key pairs only after C_Login: "no schemes" would be a lie
                info["probe_note"] = "key pairs not probed without a login: keymgr tokens --login URI"
        except errors.KeymgrError as exc:
            info["capabilities"] = []
            info["schemes"] = []
            info["probe_error"] = str(exc)
    return info


@click.command("tokens")
@click.option("--module", "modules", multiple=True, metavar="PATH", help="Also list this PKCS#11 module.")
@click.option("--no-probe", is_flag=True, help="Do not probe mechanisms (faster).")
@click.option("--login", "logins", multiple=True, metavar="URI",
              help="Log in to this token (PIN from the URI) so the probe can try key pairs too.")
@click.option("--wide", is_flag=True, help="One table row per token however wide the terminal is.")
@pass_state
def tokens_command(state: CliState, modules: tuple[str, ...], no_probe: bool, logins: tuple[str, ...],
                   wide: bool) -> None:
    """List modules, slots and tokens, their flags, PIN state and supported schemes.

    Tokens are probed without a login unless named by ``--token`` or ``--login``;
    without one, tokens that keep key pairs only as private objects (a TPM, a
    smart card) show fewer schemes than they have (``probed_logged_in: false``).
    Token labels are never cut: where the table would cut one (a narrow terminal),
    each token is listed as lines instead; ``--wide`` keeps the table.
    """
    from keymgr.hsm import list_tokens, load_module, open_token, registered_modules
    from keymgr.hsm.local import LocalToken

    logged_in = [open_token(uri) for uri in ((state.token_uri,) if state.token_uri else ()) + logins]
    paths = list(modules)
    if logged_in:
        paths[:0] = [ts.module.path for ts in logged_in]
    elif "SOFTHSM2_CONF" not in os.environ and LocalToken.default().conf_path.is_file():
        LocalToken.default().activate()
    paths += registered_modules()
    seen: set[str] = set()
    report: list[dict[str, Any]] = []
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        entry: dict[str, Any] = {"module": path, "tokens": []}
        try:
            module = load_module(path)
            entry["library"] = module.description
            entry["tokens"] = [_describe_token(t, not no_probe, logged_in) for t in list_tokens(module)]
        except errors.KeymgrError as exc:
            entry["error"] = str(exc)
        report.append(entry)
    if state.json_output:
        emit_json({"modules": report})
        return
    from keymgr.cli.tokens_table import print_tokens

    print_tokens(report, wide=wide)
