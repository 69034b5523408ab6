"""First steps at the terminal (issue 14, part 6): ``init``'s PINs, the URI it prints, an
unchecked ``key destroy``, the tokens table at 80 and 40 columns, the ``pin-value`` warning.

Each runs keymgr as a user does, in a subprocess (a pty through pexpect where a prompt is
involved), on a fresh local token under ``tmp_path`` or the suite's SoftHSM tokens.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from tests.conftest import TokenUnderTest

REPO = Path(__file__).resolve().parent.parent
KEYMGR = [sys.executable, "-m", "keymgr"]


def _env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a user with a fresh local token home: no suite token, no suite conf."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"SOFTHSM2_CONF", "KEYMGR_TOKEN", "KEYMGR_AUDIT_LOG", "KEYMGR_PIN"}}
    env.update(KEYMGR_HOME=str(home), PYTHONPATH=str(REPO), **extra)
    return env


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KEYMGR, *args], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)


def _spawn(env: dict[str, str], *args: str, columns: int = 200) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "keymgr", *args], env=env, encoding="utf-8", timeout=60,
                         dimensions=(50, columns), cwd=str(REPO))


def _files_holding(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def _so_login_works(home: Path, so_pin: str) -> bool:
    """Log in as SO to the local token, in a process of its own (SOFTHSM2_CONF is read once)."""
    code = ("import sys, pkcs11\nfrom keymgr.hsm.local import _softhsm_module\n"
            "t = pkcs11.lib(_softhsm_module()).get_token(token_label='keymgr')\n"
            "try:\n    t.open(rw=True, so_pin=sys.argv[1]).close()\n"
            "except pkcs11.exceptions.PinIncorrect:\n    sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code, so_pin], capture_output=True, text=True, timeout=60,
                          env={**_env(home), "SOFTHSM2_CONF": str(home / "softhsm2.conf")})
    assert proc.returncode in (0, 3), proc.stderr
    return proc.returncode == 0


@pytest.mark.slow
def test_prompt_pin_keeps_no_pin_on_disk_and_later_commands_ask(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = _env(home)
    user_pin, so_pin = "user-4711-pin", "so-0815-pin"
    child = _spawn(env, "init", "--prompt-pin")
    for prompt, answer in (("New user PIN", "12"), ("Repeat for confirmation", "12"),  # too short: asked again
                           ("New user PIN", user_pin), ("Repeat for confirmation", user_pin),
                           ("New SO PIN", so_pin), ("Repeat for confirmation", so_pin)):
        child.expect(prompt)
        assert child.waitnoecho(timeout=10)
        child.sendline(answer)
        if answer == "12" and prompt.startswith("Repeat"):
            child.expect(r"a PIN must have 4 to 255 characters \(the token's limits\); try again")
    child.expect(pexpect.EOF)
    child.close()
    shown = child.before
    assert child.exitstatus == 0, shown
    assert "user PIN kept nowhere" in shown and "KEYMGR_PIN" in shown and "SO PIN" not in shown.split("kept")[0]
    assert user_pin not in shown and so_pin not in shown
    assert not (home / "user.pin").exists() and not (home / "so.pin").exists()
    assert _files_holding(home, user_pin) == [] and _files_holding(home, so_pin) == []
    assert _so_login_works(home, so_pin)

    # no terminal, no KEYMGR_PIN: one line saying where a PIN can come from
    refused = _run(env, "key", "create", "orders")
    assert refused.returncode == 3 and "KEYMGR_PIN" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    made = _run({**env, "KEYMGR_PIN": user_pin}, "key", "create", "orders")
    assert made.returncode == 0, made.stderr  # the log begun by the refused login is adopted, not refused
    verified = _run({**env, "KEYMGR_PIN": user_pin}, "--json", "audit", "verify")
    report = json.loads(verified.stdout)
    assert report["ok"] is True and report["unauthenticated_tail"] == [], verified.stderr
    ops = [json.loads(line)["op"] for line in (home / "audit.log").read_text().splitlines()]
    assert ops == ["login", "audit-unauthenticated", "create", "create"]
    # at a terminal the PIN is asked for (no echo)
    child = _spawn(env, "key", "show", "orders")
    child.expect("PIN for token 'keymgr'")
    assert child.waitnoecho(timeout=10)
    child.sendline(user_pin)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "orders" in child.before and user_pin not in child.before
    # the URI init printed, given back with --token, is the local token for its PIN too
    uri = shown.split("token URI: ")[1].split()[0]
    listed = _run({**env, "KEYMGR_PIN": user_pin}, "--token", uri, "--json", "key", "list")
    assert listed.returncode == 0 and "orders" in listed.stdout, listed.stderr
    again = _run(env, "--json", "init")
    assert again.returncode == 0 and json.loads(again.stdout)["created"] is False
    assert json.loads(again.stdout)["pin_file"] is None and "SO PIN" not in again.stderr


def test_a_pin_of_the_wrong_length_is_refused_before_anything_and_never_written(tmp_path: Path) -> None:
    """Issue 14: a 2-character user PIN (SoftHSM's minimum is 4) used to fail halfway, as "PIN
    incorrect", with the typed SO PIN left in init.pending."""
    home = tmp_path / "home"
    so_pin = "typed-so-pin-7743"
    code = ("import sys\nfrom keymgr.hsm.local import LocalToken\nfrom keymgr import errors\n"
            "try:\n    LocalToken.default().init('12', so_pin=sys.argv[1])\n"
            "except errors.ConfigurationError as exc:\n    print(exc)\n    sys.exit(2)\n")
    proc = subprocess.run([sys.executable, "-c", code, so_pin], env=_env(home), capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "user PIN must have 4 to 255 characters" in proc.stdout, proc.stderr
    assert _files_holding(home, so_pin) == []
    assert not _so_login_works(home, so_pin)  # no PIN was set
    finished = _run(_env(home), "--json", "init")  # a later init finishes it, with generated PINs
    assert finished.returncode == 0 and json.loads(finished.stdout)["created"] is True, finished.stderr
    assert _files_holding(home, so_pin) == []


@pytest.mark.slow
def test_init_shows_the_so_pin_once_and_keeps_it_only_when_asked(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = _run(_env(home), "--json", "init")
    assert first.returncode == 0, first.stderr
    found = re.search(r"SO PIN of the local token \(shown once, kept nowhere; write it down\): (\S+)", first.stderr)
    assert found, first.stderr
    so_pin = found.group(1)
    assert so_pin not in first.stdout and json.loads(first.stdout)["so_pin_file"] is None
    assert not (home / "so.pin").exists() and _files_holding(home, so_pin) == []
    assert _so_login_works(home, so_pin) and not _so_login_works(home, so_pin + "x")
    second = _run(_env(home), "init")
    assert second.returncode == 0 and "SO PIN" not in second.stderr + second.stdout

    kept_home = tmp_path / "kept"
    kept = _run(_env(kept_home), "--json", "init", "--keep-so-pin")
    assert kept.returncode == 0 and "SO PIN" not in kept.stderr, kept.stderr
    so_file = Path(json.loads(kept.stdout)["so_pin_file"])
    assert so_file == kept_home / "so.pin" and stat.S_IMODE(so_file.stat().st_mode) == 0o600
    assert _so_login_works(kept_home, so_file.read_text().strip())


@pytest.mark.slow
def test_the_uri_init_prints_works_given_back_anywhere(tmp_path: Path, softhsm: TokenUnderTest) -> None:
    """As printed, from another directory, beside another SoftHSM configuration or KEYMGR_HOME;
    with the same KEYMGR_HOME it is the local token itself (same default audit log)."""
    home = tmp_path / "home"
    env = _env(home)
    uri = json.loads(_run(env, "--json", "init").stdout)["token_uri"]
    elsewhere = {**_env(tmp_path / "other-home"), **softhsm.env}  # the suite's SoftHSM conf is the ambient one
    made = subprocess.run([*KEYMGR, "--token", uri, "key", "create", "orders"], env=elsewhere, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    listed = _run(env, "--json", "key", "list")
    assert [k["name"] for k in json.loads(listed.stdout)["keys"]] == ["orders"]
    assert _run(env, "--token", uri, "key", "create", "payroll").returncode == 0
    log = home / "audit.log"
    assert [json.loads(line)["key"] for line in log.read_text().splitlines()].count("payroll") == 2
    verified = _run(env, "--token", uri, "--json", "audit", "verify", str(log))
    assert verified.returncode == 0 and json.loads(verified.stdout)["ok"] is True, verified.stderr


@pytest.mark.slow
def test_destroy_without_paths_is_confirmed_or_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = _env(home)
    assert _run(env, "init").returncode == 0
    for args in (("key", "create", "orders"), ("key", "rotate", "orders"), ("key", "rotate", "orders")):
        assert _run(env, *args).returncode == 0
    refused = _run(env, "key", "destroy", "orders", "--version", "1", "--immediately")
    assert refused.returncode == 5 and "nothing was checked" in refused.stderr and "--yes" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    child = _spawn(env, "key", "destroy", "orders", "--version", "1", "--immediately")
    child.expect("irreversible")
    child.expect("NOTHING was checked")
    child.expect(r"Type the key name \(orders\)")
    child.sendline("order")  # a slip: nothing happens
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 5 and "not confirmed" in child.before
    for stop in ("\x04", "\x03"):  # Ctrl-D (end of input): not confirmed; Ctrl-C: interrupted
        child = _spawn(env, "key", "destroy", "orders", "--version", "1", "--immediately")
        child.expect(r"Type the key name \(orders\)")
        child.send(stop)
        child.expect(pexpect.EOF)
        child.close()
        if stop == "\x04":
            assert child.exitstatus == 5 and "not confirmed" in child.before, child.before
        else:
            assert child.signalstatus == 2 or child.exitstatus == 130, child.before
            assert "Traceback" not in child.before
    versions = {v["version"]: v["state"] for v in json.loads(_run(env, "--json", "key", "show", "orders").stdout)
                ["versions"]}
    assert versions[1] != "destroyed"

    child = _spawn(env, "key", "destroy", "orders", "--version", "1", "--immediately")
    child.expect(r"Type the key name \(orders\)")
    child.sendline("orders")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "version 1 destroyed; not checked" in child.before, child.before

    done = _run(env, "key", "destroy", "orders", "--version", "2", "--immediately", "--yes")
    assert done.returncode == 0 and "not checked for data that still needed it (no --paths)" in done.stdout


def _long_label_tokens(tmp_path: Path) -> tuple[dict[str, str], list[str]]:
    labels = ["custodian-alice-usb-2026", "bob's yubikey [spare]", "k"]
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {**_env(tmp_path / "home"), "SOFTHSM2_CONF": str(conf)}
    for label in labels:
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", "5678", "--pin",
                        "1234"], check=True, capture_output=True, env=env)
    return env, labels


@pytest.mark.slow
@pytest.mark.parametrize("columns", [80, 40])
def test_tokens_never_cuts_a_label(tmp_path: Path, columns: int) -> None:
    env, labels = _long_label_tokens(tmp_path)
    for extra in ([], ["--wide"]):
        child = _spawn(env, "tokens", "--no-probe", *extra, columns=columns)
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, child.before
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in child.before.splitlines()]
        for label in labels:  # whole, on one line, as printed (never as rich markup)
            assert any(label in line for line in lines), (label, child.before)
        if extra:
            assert any("┃" in line for line in lines)  # --wide keeps the table
        else:
            assert any(line.strip() == f"token: {labels[0]}" for line in lines)
            assert all(len(line) <= columns for line in lines if labels[0] in line)


def test_tokens_is_a_table_where_it_fits(tmp_path: Path) -> None:
    env, labels = _long_label_tokens(tmp_path)
    child = _spawn(env, "tokens", "--no-probe", columns=200)
    child.expect(pexpect.EOF)
    child.close()
    rows = [line for line in child.before.splitlines() if "│" in line and labels[0] in line]
    assert child.exitstatus == 0 and len(rows) == 1, child.before


@pytest.mark.slow
def test_pin_value_on_the_command_line_or_in_keymgr_token_is_warned(softhsm: TokenUnderTest, key_name: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("KEYMGR_ALLOW_PIN_VALUE", "KEYMGR_TOKEN")}
    env.update(softhsm.env, PYTHONPATH=str(REPO))
    for where, args, extra in (("command line", ["--token", softhsm.uri()], {}),
                               ("KEYMGR_TOKEN", [], {"KEYMGR_TOKEN": softhsm.uri()})):
        proc = subprocess.run([*KEYMGR, *args, "key", "list"], env={**env, **extra}, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        warning = [line for line in proc.stderr.splitlines() if "warning" in line]
        assert len(warning) == 1 and where in warning[0] and "pin-source=file:" in warning[0], proc.stderr
        assert softhsm.user_pin not in proc.stderr.replace("KEYMGR_ALLOW_PIN_VALUE=1", "")
        quiet = subprocess.run([*KEYMGR, *args, "key", "list"], env={**env, **extra, "KEYMGR_ALLOW_PIN_VALUE": "1"},
                               capture_output=True, text=True, timeout=120)
        assert quiet.returncode == 0 and "warning" not in quiet.stderr, quiet.stderr
    no_pin = softhsm.uri(pin=False) + "&pin-source=env:KEYMGR_PIN"
    proc = subprocess.run([*KEYMGR, "--token", no_pin, "key", "list"], env={**env, "KEYMGR_PIN": softhsm.user_pin},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("so_pin_already_set", [False, True])
def test_init_finishes_a_crashed_init_without_locking_the_so_out(tmp_path: Path, so_pin_already_set: bool) -> None:
    """A crash after softhsm2-util (throwaway PINs) and before the real PINs were set leaves
    init.pending, which holds the new SO PIN from before C_SetPIN: the next init finishes,
    whether or not C_SetPIN had run, and shows that SO PIN (never shown before the crash)."""
    home = tmp_path / "home"
    (home / "tokens").mkdir(parents=True)
    conf = home / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {home / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    new_so = "so-pin-from-before-the-crash"
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "keymgr", "--so-pin",
                    new_so if so_pin_already_set else "temp-so", "--pin", "temp-user"], check=True,
                   capture_output=True, env={**os.environ, "SOFTHSM2_CONF": str(conf)})
    (home / "init.pending").write_text(f"temp-so\ntemp-user\n{new_so}\n")
    (home / "init.pending").chmod(0o600)
    finished = _run(_env(home), "--json", "init")
    assert finished.returncode == 0 and json.loads(finished.stdout)["created"] is True, finished.stderr
    assert f"write it down): {new_so}" in finished.stderr
    assert not (home / "init.pending").exists() and _so_login_works(home, new_so)
    assert _run(_env(home), "key", "create", "orders").returncode == 0
