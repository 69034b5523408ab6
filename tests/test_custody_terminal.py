"""The interactive restore at a real terminal (a pty, driven by pexpect), as a custodian sees it.

Checks that the prompts come in the documented order (custodian name, token,
that custodian's PIN, for each of the M custodians) and that no PIN typed is
echoed back.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pexpect
import pytest

from keymgr.custody.ceremony import backup_keys
from keymgr.hsm.pins import Pin
from tests.conftest import USER_PIN, softhsm_token
from tests.custody_helpers import approvals, guarded_key, hsm, party, request, so_pin

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def backup_path(tmp_path: Path, key_name: str) -> tuple[str, Path]:
    a = hsm("keymgr-A")
    guarded_key(a, key_name)
    req = request(a, "backup", key_name, versions=None)
    result = backup_keys(a.keyring, key_name, so_pin=Pin(so_pin()), request=req, approvals=approvals(a, req, 1, 2))
    path = tmp_path / "orders.backup"
    path.write_bytes(result.backup)
    return key_name, path


def _spawn(args: list[str], cwd: Path) -> pexpect.spawn:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["COLUMNS"] = "200"
    return pexpect.spawn(sys.executable, ["-m", "keymgr", *args], cwd=str(cwd), env=env, encoding="utf-8",
                         timeout=60, dimensions=(50, 200))


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
            child.expect(rf"PIN for token 'custodian-{number}' \(custodian '{p.name}'\): ")
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


def test_interactive_restore_with_one_custodian_stops_cleanly(tmp_path: Path, key_name: str) -> None:
    a = hsm("keymgr-A")
    guarded_key(a, key_name)
    req = request(a, "backup", key_name, versions=None)
    path = tmp_path / "b.backup"
    path.write_bytes(backup_keys(a.keyring, key_name, so_pin=Pin(so_pin()), request=req,
                                 approvals=approvals(a, req, 2, 3)).backup)
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
