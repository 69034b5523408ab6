"""The interactive restore at a real terminal (a pty, driven by pexpect), as a custodian sees it.

Checks that the prompts come in the documented order (custodian name, token,
that custodian's PIN, for each of the M custodians), that no PIN typed is
echoed back, and that a slip (a name or label typo, a custodian named twice,
the wrong token, a PIN typo) re-asks that custodian instead of ending the
restore. Ctrl-C at each prompt and typed-ahead input are in
``test_terminal_shell.py``.
"""

from __future__ import annotations

from pathlib import Path

import pexpect
import pytest

from tests._pty import spawn_keymgr
from tests.conftest import USER_PIN, softhsm_token
from tests.custody_helpers import backup_file, party


@pytest.fixture
def backup_path(tmp_path: Path, key_name: str) -> tuple[str, Path]:
    return key_name, backup_file(tmp_path / "orders.backup", key_name)


def _spawn(args: list[str], cwd: Path) -> pexpect.spawn:
    return spawn_keymgr(args, cwd)


@pytest.mark.slow
def test_interactive_restore_prompts_in_order_and_hides_pins(backup_path: tuple[str, Path], tmp_path: Path) -> None:
    name, path = backup_path
    target = softhsm_token("keymgr-B").uri()
    child = _spawn(["--token", target, "restore", str(path)], tmp_path)
    transcript = []
    try:
        child.expect(r"needs 2 of 3")
        child.expect(r"This backup needs 2 of its custodians")
        for turn, number in ((1, 1), (2, 3)):
            p = party(number)
            child.expect(rf"Custodian {turn} of 2, name \(empty to stop\): ")
            child.sendline(p.name)
            child.expect(rf"Token of custodian '{p.name}' \(token label or pkcs11: URI\): ")
            child.sendline(f"custodian-{number}")
            child.expect(rf"PIN for token 'custodian-{number}' \(custodian '{p.name}'\)( \[[^\]]*\])?: ")
            # the prompt turned the terminal's echo off (pexpect reads the pty's termios)
            assert child.waitnoecho(timeout=10), "terminal echo is on at the PIN prompt"
            child.sendline(USER_PIN)
            child.expect(rf"custodian '{p.name}': token 'custodian-{number}' holds the registered key")
            transcript.append(child.before)  # what the terminal showed after the PIN was typed
        child.expect(rf"restored key '{name}' versions 1 into token 'keymgr-B'")
        child.expect("signed transcript: ")
        child.expect(pexpect.EOF)
        rest = child.before  # names a temporary path, which may contain any digits: not checked for the PIN
    finally:
        child.close()
    assert child.exitstatus == 0, "".join(transcript) + rest
    for echoed in transcript:
        assert USER_PIN not in echoed, "a PIN was echoed to the terminal"
    assert list(tmp_path.glob("restore-*.transcript.p7s"))


@pytest.mark.slow
def test_interactive_restore_with_one_custodian_stops_cleanly(tmp_path: Path, key_name: str) -> None:
    path = backup_file(tmp_path / "b.backup", key_name, approvers=(2, 3))
    child = _spawn(["--token", softhsm_token("keymgr-B").uri(), "restore", str(path)], tmp_path)
    try:
        child.expect(r"Custodian 1 of 2, name")
        child.sendline(party(2).name)
        child.expect("Token of custodian")
        child.sendline("custodian-2")
        child.expect("PIN for token 'custodian-2'")
        child.sendline(USER_PIN)
        child.expect(r"Custodian 2 of 2, name")
        child.sendline("")
        child.expect(r"keymgr: error: .*only 1 took part")
        child.expect(pexpect.EOF)
        assert USER_PIN not in child.before
    finally:
        child.close()
    assert child.exitstatus == 5


@pytest.mark.slow
def test_restore_forgives_typos_duplicates_and_the_wrong_token(backup_path: tuple[str, Path], tmp_path: Path) -> None:
    """Issue 14's must-show: a name typo, a label typo, the wrong token, a PIN typo and a custodian
    named twice each re-ask that custodian, and the restore completes."""
    name, path = backup_path
    first, second = party(1), party(3)
    child = _spawn(["--token", softhsm_token("keymgr-B").uri(), "restore", str(path)], tmp_path)
    shown = []
    try:
        child.expect(r"Custodian 1 of 2, name \(empty to stop\): ")
        child.sendline(f"{first.name}x")  # a name typo
        child.expect(rf"'{first.name}x' is not one of the custodians of this backup .*; try again")
        child.expect(r"Custodian 1 of 2, name \(empty to stop\): ")
        child.sendline(first.name)
        child.expect(rf"Token of custodian '{first.name}' \(token label or pkcs11: URI\): ")
        child.sendline("custodian-l")  # a label typo: no such token
        child.expect(r"no token labelled 'custodian-l' is present \(tokens: [^)]*'custodian-1'[^)]*\); try again")
        child.expect(rf"Token of custodian '{first.name}' \(token label or pkcs11: URI\): ")
        child.sendline("keymgr-B")  # the target HSM
        child.expect(r"token 'keymgr-B' is the target HSM, not a custodian's token; try again")
        child.expect(rf"Token of custodian '{first.name}'")
        child.sendline("custodian-2")  # someone else's token: refused before any PIN is asked
        index = child.expect([rf"token 'custodian-2' does not hold the registered key of custodian "
                              rf"'{first.name}'; try again", "PIN for token"])
        assert index == 0, "a PIN was asked for a token that does not hold the custodian's key"
        child.expect(rf"Token of custodian '{first.name}'")
        child.sendline("custodian-1")
        # (a note in brackets if an earlier test left a wrong PIN on the token's counter)
        child.expect(rf"PIN for token 'custodian-1' \(custodian '{first.name}'\)( \[[^\]]*\])?: ")
        child.sendline("99999")  # a PIN typo
        child.expect(r"wrong PIN for token 'custodian-1' \(([^)]*)\); once more")
        note = child.match.group(1)
        # SoftHSM sets CKF_USER_PIN_COUNT_LOW after one wrong PIN: said as the token says it, never a count
        assert note == "the token reports few tries left", note
        child.expect(rf"PIN for token 'custodian-1' \(custodian '{first.name}'\) "
                     r"\[the token reports few tries left\]: ")
        assert child.waitnoecho(timeout=10)
        child.sendline(USER_PIN)
        child.expect(rf"custodian '{first.name}': token 'custodian-1' holds the registered key")
        shown.append(child.before)
        child.expect(r"Custodian 2 of 2, name \(empty to stop\): ")
        child.sendline(first.name)  # named twice
        child.expect(rf"custodian '{first.name}' has taken part already; each custodian counts once")
        child.expect(r"Custodian 2 of 2, name \(empty to stop\): ")
        child.sendline(second.name)
        child.expect(rf"Token of custodian '{second.name}'")
        child.sendline("custodian-1")  # the first custodian's token again
        child.expect(rf"token 'custodian-1' was given for custodian '{first.name}' already")
        child.expect(rf"Token of custodian '{second.name}'")
        child.sendline("custodian-3")
        child.expect(rf"PIN for token 'custodian-3' \(custodian '{second.name}'\): ")
        child.sendline(USER_PIN)
        child.expect(rf"custodian '{second.name}': token 'custodian-3' holds the registered key")
        shown.append(child.before)
        child.expect(rf"restored key '{name}' versions 1 into token 'keymgr-B'")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert all(USER_PIN not in text and "99999" not in text for text in shown), "a PIN was echoed"
    assert "Traceback" not in "".join(shown)
    assert len(list(tmp_path.glob("restore-*.transcript.p7s"))) == 1


@pytest.mark.slow
def test_a_second_wrong_pin_ends_the_restore(backup_path: tuple[str, Path], tmp_path: Path) -> None:
    """A PIN is retried once, never more: keymgr does not spend a token's tries on guesses."""
    _, path = backup_path
    first = party(1)
    child = _spawn(["--token", softhsm_token("keymgr-B").uri(), "restore", str(path)], tmp_path)
    try:
        child.expect(r"Custodian 1 of 2, name")
        child.sendline(first.name)
        child.expect("Token of custodian")
        child.sendline("custodian-1")
        for _ in range(2):
            child.expect("PIN for token 'custodian-1'")
            child.sendline("99999")
        child.expect(r"keymgr: error: wrong PIN for token 'custodian-1' again \(the token reports few tries "
                     r"left\); stopping here")
        child.expect(pexpect.EOF)
        assert "PIN for token" not in child.before
    finally:
        child.close()
    assert child.exitstatus == 3
    assert not list(tmp_path.glob("restore-*"))
