"""``keymgr tokens`` over SoftHSM and the TPM, and ``keymgr token keygen / pubkey / keys``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from keymgr.cli import cli
from keymgr.hsm import Pkcs11Uri, asym, open_token
from keymgr.recipients import pubkey
from tests.conftest import TokenUnderTest, softhsm_token

REPO = Path(__file__).resolve().parents[2]
#: the key pairs `keymgr token keygen` makes stay on the shared tokens, each label with a random part
pytestmark = pytest.mark.leaves_objects("cust-")


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _tokens(report: dict) -> dict[str, dict]:  # type: ignore[type-arg]
    return {(t["label"] or f"<empty slot {t['slot_id']}>"): t for m in report["modules"] for t in m["tokens"]}


@pytest.mark.slow
def test_tokens_json_lists_softhsm_and_tpm_with_schemes(softhsm: TokenUnderTest, tpm: TokenUnderTest) -> None:
    code, out, err = run("--json", "tokens", "--login", softhsm.uri(), "--login", tpm.uri())
    assert code == 0, err
    report = json.loads(out)
    tokens = _tokens(report)
    soft, tpm_info = tokens["keymgr-A"], tokens["keymgr-tpm"]
    assert {"kek-kw", "kek-gcm", "rsa-oaep", "ecdh"} <= set(soft["schemes"])
    assert tpm_info["schemes"] == ["rsa-oaep"]
    assert {"rsa-oaep-sha256", "rsa-oaep-sha1", "ecdsa-sign"} <= set(tpm_info["capabilities"])
    for info in (soft, tpm_info):
        assert info["probed_logged_in"] is True
        assert "login-required" in info["flags"] and "token-initialized" in info["flags"]
        assert info["pin_state"] == "unknown" or info["pin_state"] in {"count-low", "final-try"}
        assert "pin-value" not in info["uri"] and info["initialized"] is True
    assert "hardware" in tpm_info["slot_flags"] and tpm_info["model"].strip() == "SW   TPM".strip()
    # tpm2-pkcs11 shows an empty, uninitialised slot beside the token: listed, not probed
    empty = [t for m in report["modules"] for t in m["tokens"] if t["module"] == tpm_info["module"] and not t["label"]]
    assert empty and empty[0]["initialized"] is False and "schemes" not in empty[0]
    # every other initialised token is probed too (logged in only if this process already is)
    assert "kek-gcm" in tokens["keymgr-B"]["schemes"] and isinstance(tokens["keymgr-B"]["probed_logged_in"], bool)


@pytest.mark.known_session_leak("in-process `keymgr tokens --login` left two SoftHSM sessions open in a "
                                "`-m 'not slow'` run, not in a full run; cause not pinned down (suspect: "
                                "python-pkcs11 0.10.1 Token.open does not close its session when C_Login fails)",
                                strict=False)
def test_tokens_table_shows_both(softhsm: TokenUnderTest, tpm: TokenUnderTest) -> None:
    code, out, err = run("tokens", "--login", tpm.uri())
    assert code == 0, err
    assert "keymgr-tpm" in out and "keymgr-A" in out and "rsa-oaep" in out


def test_keygen_prints_pem_and_uri_and_pubkey_finds_it_again(softhsm: TokenUnderTest) -> None:
    tok = softhsm_token("custodian-1")
    label = f"cust-{uuid.uuid4().hex[:8]}"
    code, out, err = run("token", "keygen", "--token", tok.uri(), "--type", "ec-p256", "--label", label)
    assert code == 0, err
    public = load_pem_public_key(out.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    uri_line = [line for line in out.splitlines() if line.startswith("uri: ")][0][5:]
    key_uri = Pkcs11Uri.parse(uri_line)
    assert key_uri.object == label and key_uri.type == "private" and key_uri.pin_value is None
    # the printed URI (plus a PIN) finds the same key again
    code, out2, err = run("--json", "token", "pubkey", uri_line + f"&pin-value={tok.user_pin}")
    assert code == 0, err
    shown = json.loads(out2)
    assert load_pem_public_key(shown["public_key_pem"].encode()) == public
    assert shown["scheme"] == "ecdh" and shown["label"] == label
    # and the PEM alone is enough to encrypt to the new key
    ts = open_token(tok.uri())
    key = pubkey.TokenPrivateKey(ts, asym.find_keypair(ts, label=label))
    blob = pubkey.encrypt_to(b"for the custodian", [pubkey.public_key_recipient(out.encode())])
    assert pubkey.decrypt_with(blob, [key]) == b"for the custodian"
    code, _, err = run("token", "keygen", "--token", tok.uri(), "--type", "ec-p256", "--label", label)
    assert code == 5 and "already has a key pair" in err and len(err.strip().splitlines()) == 1


def test_keygen_on_tpm_reports_its_oaep_hash(tpm: TokenUnderTest, tmp_path) -> None:  # type: ignore[no-untyped-def]
    label = f"tpm-cust-{uuid.uuid4().hex[:8]}"
    pem_file = tmp_path / "k.pem"
    code, out, err = run("--json", "token", "keygen", "--token", tpm.uri(), "--type", "rsa-2048", "--label", label,
                         "--out", str(pem_file))
    assert code == 0, err
    info = json.loads(out)
    assert info["scheme"] == "rsa-oaep" and info["oaep_hash"] == "sha256" and info["type"] == "rsa-2048"
    assert isinstance(load_pem_public_key(pem_file.read_bytes()), rsa.RSAPublicKey)
    code, _, err = run("token", "keygen", "--token", tpm.uri(), "--type", "rsa-4096", "--label", label + "-big")
    assert code == 1 and "cannot generate rsa-4096" in err


def test_existing_tpm_key_found_by_id_uri_and_listed(tpm: TokenUnderTest) -> None:
    # rsa-kek was made by tpm2_ptool, not keymgr: CKA_ID "01" as text
    uri = f"pkcs11:token={tpm.label};id=%30%31;type=private?module-path={tpm.module_path}&pin-value={tpm.user_pin}"
    code, out, err = run("--json", "token", "pubkey", uri)
    assert code == 0, err
    assert json.loads(out)["label"] == "rsa-kek"
    code, out, err = run("--json", "token", "keys", "--token", tpm.uri())
    assert code == 0, err
    kinds = {k["label"]: k["type"] for k in json.loads(out)["key_pairs"]}
    assert kinds["rsa-kek"] == "rsa-2048" and kinds["ec-kek"] == "ec-p256"
    code, _, err = run("token", "pubkey", f"pkcs11:token={tpm.label}?module-path={tpm.module_path}&pin-value=1234")
    assert code == 2 and "object=" in err


@pytest.mark.slow
def test_tokens_without_login_in_a_fresh_process(softhsm: TokenUnderTest, tpm: TokenUnderTest) -> None:
    """Plain ``keymgr --json tokens``, no PIN anywhere: SoftHSM is probed fully on public session
    objects; the TPM, which makes key pairs only after a login, says so instead of claiming none."""
    env = {**os.environ, **tpm.env, **softhsm.env}
    env.pop("KEYMGR_TOKEN", None)
    proc = subprocess.run([sys.executable, "-m", "keymgr", "--json", "tokens"], env=env, capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    tokens = _tokens(json.loads(proc.stdout))
    soft, tpm_info = tokens["keymgr-A"], tokens["keymgr-tpm"]
    assert soft["probed_logged_in"] is False and tpm_info["probed_logged_in"] is False
    assert {"kek-kw", "kek-gcm", "rsa-oaep", "ecdh"} <= set(soft["schemes"])  # keyring-metadata needs a login
    assert "probe_note" not in soft
    assert tpm_info["schemes"] == [] and "--login" in tpm_info["probe_note"]
    table = subprocess.run([sys.executable, "-m", "keymgr", "tokens"], env={**env, "COLUMNS": "400"},
                           capture_output=True, text=True, timeout=300, cwd=REPO)
    assert table.returncode == 0 and "key pairs not probed without a login" in table.stdout, table.stderr


@pytest.mark.slow
def test_a_token_file_left_short_by_a_killed_login_is_explained(tmp_path: Path) -> None:
    """SoftHSM rewrites token.object in place at every login; a process killed then leaves it
    short, and the token shows as a blank slot (STACK-FACTS 23). The error says what that blank
    slot may be and where the docs say what to do, in one line."""
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf), "XDG_STATE_HOME": str(tmp_path / "state"),
           "PYTHONPATH": str(REPO)}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "short", "--so-pin", "5678", "--pin",
                    "1234"], check=True, capture_output=True, env=env)
    [token_file] = tokens.glob("*/token.object")
    token_file.write_bytes(token_file.read_bytes()[:40])  # what a kill mid-rewrite leaves
    uri = f"pkcs11:token=short?module-path={softhsm_token().module_path}&pin-value=1234"
    proc = subprocess.run([sys.executable, "-m", "keymgr", "--token", uri, "key", "list"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("keymgr: error")]
    assert len(lines) == 1 and "no token matches" in lines[0] and "killed during its login" in lines[0], proc.stderr


def test_keygen_is_recorded_in_the_audit_log(softhsm: TokenUnderTest, tmp_path: Path, monkeypatch) -> None:
    """A key pair made on a token is a key operation: `keygen` in the default audit log, with its
    type, label, token and CKA_ID; a refused keygen (the label exists) is recorded as refused."""
    from keymgr.audit import read_entries

    log = tmp_path / "audit.log"
    monkeypatch.setenv("KEYMGR_AUDIT_LOG", str(log))
    tok = softhsm_token("custodian-1")
    label = f"cust-{uuid.uuid4().hex[:8]}"
    code, out, err = run("token", "keygen", "--token", tok.uri(), "--type", "ec-p256", "--label", label)
    assert code == 0, err
    code, _, err = run("token", "keygen", "--token", tok.uri(), "--type", "ec-p256", "--label", label)
    assert code == 5
    made, refused = [e for _, e in read_entries(log) if e.op == "keygen"]
    assert made.outcome == "ok" and made.detail["label"] == label and made.detail["type"] == "ec-p256"
    assert made.detail["token"] == "custodian-1" and len(str(made.detail["key_id"])) == 32
    assert refused.outcome != "ok" and refused.detail["label"] == label
