"""The keymgr CLI, through click's runner and as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from keymgr.cli import cli
from tests.conftest import TokenUnderTest

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_key_create_list_show_json(softhsm: TokenUnderTest, key_name: str) -> None:
    code, out, err = run("--token", softhsm.uri(), "--json", "key", "create", key_name)
    assert code == 0, err
    created = json.loads(out)
    assert created["name"] == key_name and created["versions"][0]["version"] == 1
    code, out, _ = run("--token", softhsm.uri(), "--json", "key", "list")
    listed = {k["name"]: k for k in json.loads(out)["keys"]}
    assert listed[key_name]["versions"][0]["id"] == created["versions"][0]["id"]
    code, out, _ = run("--token", softhsm.uri(), "key", "show", key_name)
    assert code == 0 and key_name in out and created["versions"][0]["id"] in out


def test_wrong_pin_is_one_line_with_state(softhsm: TokenUnderTest) -> None:
    # a subprocess, as a user runs it: this test process may be logged in to the token already
    # (login is per process, and a logged-in process is not asked for the PIN again)
    uri = f"pkcs11:token=lockout?module-path={softhsm.module_path}&pin-value=9999"
    proc = subprocess.run([sys.executable, "-m", "keymgr", "--token", uri, "key", "list"], capture_output=True,
                          text=True, env={**os.environ, **softhsm.env}, timeout=60)
    code, err = proc.returncode, proc.stderr
    assert code == 3, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keymgr: error:")
    assert "lockout" in lines[0] and "few tries left" in lines[0]
    assert "9999" not in err and "Traceback" not in err


def test_unknown_token_lists_existing_tokens(softhsm: TokenUnderTest) -> None:
    uri = f"pkcs11:token=nope?module-path={softhsm.module_path}&pin-value=1234"
    code, _, err = run("--token", uri, "key", "list")
    assert code == 6
    assert "no token matches" in err and "keymgr-A" in err and "custodian-1" in err
    assert len(err.strip().splitlines()) == 1


def test_malformed_uri_is_a_usage_error(softhsm: TokenUnderTest) -> None:
    code, _, err = run("--token", "pkcs11:token=%zz", "key", "list")
    assert code == 2 and err.startswith("keymgr: error:") and "Traceback" not in err


def test_missing_module_is_one_line() -> None:
    code, _, err = run("--token", "pkcs11:token=x?module-path=/nonexistent/lib.so", "key", "list")
    assert code == 1 and "not found" in err and len(err.strip().splitlines()) == 1


def test_unknown_key_exit_code(softhsm: TokenUnderTest) -> None:
    code, _, err = run("--token", softhsm.uri(), "key", "show", "no-such-key")
    assert code == 6 and "no-such-key" in err


@pytest.mark.slow
def test_tokens_json_lists_softhsm_tokens(softhsm: TokenUnderTest) -> None:
    # a subprocess: `keymgr tokens` loads every module p11-kit registers, and tpm2-pkcs11 loaded
    # here before the TPM fixture sets its environment would stay blind for the rest of the run
    proc = subprocess.run([sys.executable, "-m", "keymgr", "--token", softhsm.uri(), "--json", "tokens"],
                          capture_output=True, text=True, env={**os.environ, **softhsm.env}, timeout=300)
    code, out, err = proc.returncode, proc.stdout, proc.stderr
    assert code == 0, err
    report = json.loads(out)
    labels = {t["label"]: t for m in report["modules"] for t in m["tokens"]}
    assert {"keymgr-A", "keymgr-B", "custodian-1"} <= set(labels)
    assert "kek-kw" in labels["keymgr-A"]["schemes"] and "kek-gcm" in labels["keymgr-A"]["schemes"]
    assert "login-required" in labels["keymgr-A"]["flags"]


def _subprocess_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"SOFTHSM2_CONF", "KEYMGR_TOKEN"}}
    env["KEYMGR_HOME"] = str(tmp_path / "home")
    return env


@pytest.mark.slow
def test_init_is_idempotent_and_default_token_works(tmp_path: Path, key_name: str) -> None:
    env = _subprocess_env(tmp_path)
    keymgr_cmd = [sys.executable, "-m", "keymgr"]
    first = subprocess.run([*keymgr_cmd, "--json", "init"], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["created"] is True
    pin_file = Path(json.loads(first.stdout)["pin_file"])
    assert oct(pin_file.stat().st_mode & 0o777) == "0o600"
    second = subprocess.run([*keymgr_cmd, "--json", "init"], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and json.loads(second.stdout)["created"] is False
    made = subprocess.run([*keymgr_cmd, "key", "create", key_name], env=env, capture_output=True, text=True,
                          timeout=120)
    assert made.returncode == 0, made.stderr
    listed = subprocess.run([*keymgr_cmd, "--json", "key", "list"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert key_name in [k["name"] for k in json.loads(listed.stdout)["keys"]]
    # the PIN itself never appears in any output
    pin = pin_file.read_text().strip()
    for proc in (first, second, made, listed):
        assert pin not in proc.stdout and pin not in proc.stderr


def test_error_in_subprocess_has_no_traceback(tmp_path: Path) -> None:
    env = _subprocess_env(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "keymgr", "key", "list"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.startswith("keymgr: error:") and "keymgr init" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_json_flag_after_subcommand(softhsm: TokenUnderTest, key_name: str) -> None:
    code, out, err = run("--token", softhsm.uri(), "key", "create", key_name, "--json")
    assert code == 0, err
    assert json.loads(out)["name"] == key_name
    code, out, _ = run("--token", softhsm.uri(), "key", "list", "--json")
    assert key_name in [k["name"] for k in json.loads(out)["keys"]]


def test_pkcs11_tool_reads_key_back_sensitive_and_not_extractable(softhsm: TokenUnderTest, key_name: str) -> None:
    """An independent PKCS#11 client (OpenSC's pkcs11-tool) sees what keymgr promised."""
    code, out, err = run("--token", softhsm.uri(), "--json", "key", "create", key_name)
    assert code == 0, err
    key_id = json.loads(out)["versions"][0]["id"]
    proc = subprocess.run(["pkcs11-tool", "--module", softhsm.module_path, "--token-label", softhsm.label,
                           "--login", "--pin", softhsm.user_pin, "--list-objects", "--type", "secrkey",
                           "--id", key_id], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # pkcs11-tool 0.23 ignores --id when listing and prints every secret key, in the token's
    # order: read the one object whose ID is ours
    objects = proc.stdout.split("Secret Key Object")
    block = next(obj for obj in objects if f"ID:         {key_id}" in obj)
    assert f"{key_name}/v1" in block and key_id in block
    access = next(line for line in block.splitlines() if "Access:" in line)
    assert "sensitive" in access and "never extractable" in access
    assert "extractable" not in access.replace("never extractable", "")
    usage = next(line for line in block.splitlines() if "Usage:" in line)
    assert "wrap" in usage and "decrypt" not in usage and "encrypt" not in usage


def test_unknown_path_attribute_matches_no_token(softhsm: TokenUnderTest) -> None:
    """A typo such as ``tokn=`` must not select "any token" (RFC 7512 2.4)."""
    code, _, err = run("--token", f"pkcs11:tokn=keymgr-A?module-path={softhsm.module_path}&pin-value=1234",
                       "key", "list")
    assert code == 6 and "no token matches" in err
