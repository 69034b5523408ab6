"""A real token's PIN lockout and its removal and return, on the software TPM.

The TPM locks after 3 wrong PINs (then even the right PIN gets CKR_PIN_LOCKED)
and never changes the token's PIN flags, so keymgr must say "the token does not
report tries left" and report the lockout as locked. Wrong-PIN tests run in a
fresh process each: this process is logged in to the TPM already, and login
is per process (STACK-FACTS.md 2). The TPM's own dictionary-attack counter
shows that keymgr spends exactly the tries its caller asked for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import keymgr
from keymgr.files import atomic_output
from keymgr.hsm import asym, open_token
from keymgr.recipients import pubkey
from tests.conftest import TokenUnderTest, tpm_state_dir
from tests.tokens.tpm import lockout_counter, start_tpm, stop_tpm, unlock_tpm

REPO = Path(__file__).resolve().parents[2]

# Tries each PIN in a fresh process, one keymgr call per PIN, and prints what keymgr said.
_TRY_PINS = """
import json, sys
from keymgr import errors
from keymgr.hsm import objects, open_token
base, pins = sys.argv[1], sys.argv[2:]
out = []
for pin in pins:
    try:
        ts = open_token(base + "&pin-value=" + pin)
        objects.random_bytes(ts, 8)
        ts.run("drop the session", lambda s: s.close())   # lost session: keymgr logs in again
        objects.random_bytes(ts, 8)
        out.append({"ok": True})
        ts.close()
    except errors.KeymgrError as exc:
        out.append({"error": type(exc).__name__, "tries_left": getattr(exc, "tries_left", None),
                    "message": str(exc)})
print(json.dumps(out))
"""


def _try_pins(tpm: TokenUnderTest, *pins: str) -> list[dict[str, object]]:
    proc = subprocess.run([sys.executable, "-c", _TRY_PINS, tpm.uri(pin=False), *pins], cwd=REPO,
                          env={**os.environ, **tpm.env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture
def tpm_dir(tpm: TokenUnderTest) -> Iterator[Path]:
    """The TPM's state directory; its wrong-PIN counter is cleared before and after the test."""
    state = tpm_state_dir()
    unlock_tpm(state)
    try:
        yield state
    finally:
        unlock_tpm(state)


def test_wrong_pin_is_reported_once_without_tries_left(tpm: TokenUnderTest, tpm_dir: Path) -> None:
    assert lockout_counter(tpm_dir) == 0
    (result,) = _try_pins(tpm, "9999")
    assert result["error"] == "PinIncorrectError"
    assert result["tries_left"] == "unknown"
    message = str(result["message"])
    assert "the token does not report tries left" in message and "did not retry" in message
    assert "9999" not in message
    # the TPM counted exactly the one try the caller made: keymgr spent none of its own
    assert lockout_counter(tpm_dir) == 1


def test_right_pin_and_relogin_spend_no_tries(tpm: TokenUnderTest, tpm_dir: Path) -> None:
    assert _try_pins(tpm, tpm.user_pin) == [{"ok": True}]
    assert lockout_counter(tpm_dir) == 0


def test_lockout_is_reported_as_locked_with_how_to_unlock(tpm: TokenUnderTest, tpm_dir: Path) -> None:
    results = _try_pins(tpm, "1111", "2222", "3333", tpm.user_pin)
    assert [r.get("error") for r in results[:3]] == ["PinIncorrectError"] * 3
    locked = results[3]
    assert locked["error"] == "PinLockedError", locked
    assert "locked" in str(locked["message"]) and "tpm2_dictionarylockout" in str(locked["message"])
    unlock_tpm(tpm_dir)
    assert _try_pins(tpm, tpm.user_pin) == [{"ok": True}]


@pytest.mark.slow
def test_removed_token_fails_cleanly_then_comes_back(tpm: TokenUnderTest, tmp_path: Path) -> None:
    """Token gone: TokenRemovedError, nothing written. Token back: the same process, the same
    objects, no restart (the module is re-initialised; tpm2-pkcs11 needs its bus kept)."""
    ts = open_token(tpm.uri())
    key = pubkey.TokenPrivateKey(ts, asym.find_keypair(ts, label="rsa-kek"))
    blob = pubkey.encrypt_to(b"survives removal", [key.recipient()])
    assert pubkey.decrypt_with(blob, [key]) == b"survives removal"
    state = tpm_state_dir()
    target = tmp_path / "plain.txt"
    stop_tpm(state, keep_bus=True)
    try:
        with pytest.raises(keymgr.TokenRemovedError) as caught, atomic_output(target) as out:
            out.write(pubkey.decrypt_with(blob, [key]))
        assert "keymgr-tpm" in str(caught.value) and "Reconnect" in str(caught.value)
        assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left
        with pytest.raises(keymgr.TokenRemovedError):  # still gone: the same clear error
            asym.sign(ts, key.ref, b"x")
    finally:
        start_tpm(state)
    assert pubkey.decrypt_with(blob, [key]) == b"survives removal"
    assert asym.find_keypair(ts, label="rsa-kek") == key.ref


def test_cli_with_the_tpm_service_down_says_what_is_down(tpm: TokenUnderTest) -> None:
    """A fresh CLI process whose module cannot initialise (TPM and its resource manager stopped)
    exits non-zero with one line naming C_Initialize and the service behind the module, not a
    bare exception class (it said only "GeneralError")."""
    state = tpm_state_dir()
    stop_tpm(state, keep_bus=True)  # the bus stays: this test process's own module connection survives
    try:
        proc = subprocess.run([sys.executable, "-m", "keymgr", "--token", tpm.uri(), "key", "list"], cwd=REPO,
                              env={**os.environ, **tpm.env}, capture_output=True, text=True, timeout=120)
    finally:
        start_tpm(state)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("keymgr:")]
    assert proc.returncode != 0 and len(ours) == 1, proc.stderr[-2000:]
    assert "C_Initialize failed (CKR_GENERAL_ERROR)" in ours[0] and "tpm2-abrmd" in ours[0]
    assert "Traceback" not in proc.stderr and "pin-value" not in proc.stderr
