"""Asking M custodians for their tokens at the terminal, forgiving the slips people make.

A restore (or a quorum decrypt) brings M people to one terminal, one after
another, often under time pressure. A slip used to end the whole ceremony, and
the next custodian's PIN, typed ahead, went to the shell. Here a slip re-asks
only what was wrong:

* a name that is not one of the custodians, or a custodian named twice: the
  name again;
* a token that is not there (a label typo), the target HSM itself, a token
  already used for another custodian, or one that does not hold this
  custodian's registered key: the token again. Where the token shows its
  public keys without login (SoftHSM, most USB keys), the key is checked
  *before* the PIN is asked; otherwise right after the login;
* a wrong PIN: the PIN once more, with what the token itself reports about
  tries left (:func:`keymgr.hsm.pins.tries_left_note`: PKCS#11 tokens report
  states, never counts). A second wrong PIN, or a locked one, ends the
  ceremony: keymgr does not spend a token's tries on guesses.

Ctrl-C or Ctrl-D at any prompt ends the ceremony with one line and status 130
(:class:`keymgr.cli._common.GuardedGroup`); tokens opened so far are closed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import click

from keymgr import errors
from keymgr.cli._custody_common import custodian_uri, pin_prompt
from keymgr.custody.custodian_token import CustodianToken, check_shown_key
from keymgr.custody.custodians import Custodian
from keymgr.hsm.discovery import list_tokens, module_for_uri
from keymgr.hsm.pins import tries_left_note
from keymgr.hsm.sessions import TokenSession, open_token
from keymgr.hsm.uri import Pkcs11Uri
from keymgr.terminal import discard_typed_ahead

if TYPE_CHECKING:
    from keymgr.manager import TokenInfo

__all__ = ["ask_custodians"]

#: Logins per custodian: the PIN as typed, and once more after a typo.
PIN_ATTEMPTS = 2


def _say(message: str) -> None:
    click.echo(f"  {message}", err=True)


def _say_again(message: str) -> None:
    """Say why a prompt is asked again, and drop what was typed ahead meanwhile: it was meant for
    the next prompt (a PIN, perhaps), and would be taken as the answer and echoed in an error."""
    _say(message)
    discard_typed_ahead()


def ask_custodians(candidates: Sequence[Custodian], threshold: int, module_path: str, what: str, *,
                   target: TokenInfo | None = None) -> list[CustodianToken]:
    """Up to ``threshold`` custodians' tokens, asked in turn (name, token, PIN); an empty name stops
    early. ``target``: the HSM the ceremony works on, which is never a custodian's token."""
    by_name = {c.name: c for c in candidates}
    click.echo(f"This {what} needs {threshold} of its custodians: {', '.join(by_name)}.", err=True)
    tokens: list[CustodianToken] = []
    try:
        for turn in range(1, threshold + 1):
            custodian = _ask_name(turn, threshold, by_name, tokens, what)
            if custodian is None:
                break
            token = _ask_token(custodian, module_path, target, tokens)
            tokens.append(token)
            _say(f"custodian {custodian.name!r}: token {token.ts.label!r} holds the registered key")
        return tokens
    except BaseException:
        for token in tokens:
            token.close()
        raise


def _ask_name(turn: int, threshold: int, by_name: dict[str, Custodian], taken: Sequence[CustodianToken],
              what: str) -> Custodian | None:
    while True:
        name = click.prompt(f"Custodian {turn} of {threshold}, name (empty to stop)", default="",
                            show_default=False, err=True).strip()
        if not name:
            return None
        if any(t.custodian.name == name for t in taken):
            _say_again(f"custodian {name!r} has taken part already; each custodian counts once: name another")
        elif name not in by_name:
            _say_again(f"{name!r} is not one of the custodians of this {what} ({', '.join(by_name)}); try again")
        else:
            return by_name[name]


def _ask_token(custodian: Custodian, module_path: str, target: TokenInfo | None,
               taken: Sequence[CustodianToken]) -> CustodianToken:
    while True:
        answer = click.prompt(f"Token of custodian {custodian.name!r} (token label or pkcs11: URI)", err=True)
        try:
            uri = custodian_uri(answer, module_path)
            _check_token(open_token(uri, login=False), custodian, target, taken)
            return _log_in(custodian, uri)
        except errors.TokenNotFoundError as exc:
            _say_again(f"{_not_found(answer.strip(), module_path) or exc}; try again")
        except (errors.ConfigurationError, errors.PolicyError) as exc:
            _say_again(f"{exc}; try again")


def _not_found(label: str, module_path: str) -> str | None:
    """For a label typo: the labels there are, short enough to spot the typo (None for a URI)."""
    if label.startswith("pkcs11:"):
        return None
    try:
        found = list_tokens(module_for_uri(Pkcs11Uri.parse(f"pkcs11:?module-path={module_path}")))
    except errors.KeymgrError:
        return None
    labels = ", ".join(repr(t.label) for t in found if t.label) or "none"
    return f"no token labelled {label!r} is present (tokens: {labels})"


def _check_token(ts: TokenSession, custodian: Custodian, target: TokenInfo | None,
                 taken: Sequence[CustodianToken]) -> None:
    """Before any PIN: not the target, not a token already in this ceremony, and (where the token
    shows public keys) one that holds this custodian's registered key."""
    if target is not None and _same_token(ts, target):
        raise errors.PolicyError(f"token {ts.label!r} is the target HSM, not a custodian's token")
    for other in taken:
        if other.ts is ts:
            raise errors.PolicyError(f"token {ts.label!r} was given for custodian {other.custodian.name!r} "
                                     "already; each custodian brings their own")
    check_shown_key(ts, custodian.name, custodian.fingerprint)


def _same_token(ts: TokenSession, target: TokenInfo) -> bool:
    """Whether ``ts`` is the token ``target`` describes: one serial in one module (by its real path)."""
    return ts.serial == target.serial and os.path.realpath(ts.module.path) == os.path.realpath(target.module_path)


def _log_in(custodian: Custodian, uri: str) -> CustodianToken:
    """The custodian's PIN, asked again once after a wrong one; a second wrong PIN ends the ceremony."""
    for attempt in range(1, PIN_ATTEMPTS + 1):
        try:
            return CustodianToken.open(custodian, uri, pin_callback=pin_prompt(custodian.name))
        except errors.PinIncorrectError as exc:
            note = tries_left_note(exc.tries_left)
            if attempt == PIN_ATTEMPTS:
                raise errors.PinIncorrectError(
                    f"wrong PIN for token {exc.token!r} again ({note}); stopping here rather than spend the "
                    f"token's tries: custodian {custodian.name!r} should check their PIN, then start over",
                    token=exc.token, tries_left=exc.tries_left) from None
            _say_again(f"wrong PIN for token {exc.token!r} ({note}); once more")
    raise AssertionError("unreachable")  # pragma: no cover
