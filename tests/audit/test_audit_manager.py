"""KeyManager's audit wiring (keymgr.audit._guard): what each operation records, on a real SoftHSM token."""

from __future__ import annotations

import json
import subprocess
import sys
import timeit
from pathlib import Path

import pytest

import keymgr
from keymgr import errors
from keymgr.audit import AuditLog, acting_as, read_entries, verify_log
from keymgr.hsm import open_token
from tests._internals import token_of
from tests.conftest import TokenUnderTest, softhsm_token


def _entries(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def audited(tmp_path: Path, softhsm: TokenUnderTest):
    path = tmp_path / "audit.log"
    with keymgr.KeyManager(softhsm.uri(), audit=path) as km:
        yield km, path


def test_create_encrypt_decrypt_are_recorded_with_versions(audited, key_name: str) -> None:
    km, path = audited
    km.create_key(key_name, profile="gcm")
    blobs = [km.encrypt(b"x" * 10, key=key_name, context={"tenant": "acme"}) for _ in range(3)]
    with acting_as("billing"):
        for blob in blobs:
            assert km.decrypt(blob, context={"tenant": "acme"}) == b"x" * 10
    km.close()
    rows = _entries(path)
    create = [r for r in rows if r["op"] == "create"]
    # a state change: its intent entry is written before it acts, then its outcome
    assert [(r["key"], r["version"], r["outcome"]) for r in create] == [(key_name, 1, "intent"), (key_name, 1, "ok")]
    enc = [r for r in rows if r["op"] == "encrypt"]
    dec = [r for r in rows if r["op"] == "decrypt"]
    assert [(r["key"], r["version"], r["detail"]["count"], r["actor"]["principal"]) for r in enc] == \
        [(key_name, 1, 3, None)]
    assert [(r["key"], r["version"], r["detail"]["count"], r["actor"]["principal"]) for r in dec] == \
        [(key_name, 1, 3, "billing")]
    assert all(r["mac"] is not None for r in rows)
    assert verify_log(path, token=km_token()).ok


def km_token():
    return open_token(softhsm_token().uri())


def test_failures_and_refusals_are_individual_entries(audited, key_name: str) -> None:
    km, path = audited
    km.create_key(key_name)
    blob = km.encrypt(b"secret plaintext", key=key_name, context={"tenant": "acme"})
    with pytest.raises(errors.IntegrityError):
        km.decrypt(blob, context={"tenant": "other"})
    km.suspend(key_name, 1)
    with pytest.raises(errors.PolicyError):
        km.decrypt(blob, context={"tenant": "acme"})
    with pytest.raises(errors.PolicyError):
        km.encrypt(b"more", key=key_name)
    km.close()
    rows = [r for r in _entries(path) if r["op"] in ("decrypt", "encrypt") and r["outcome"] != "ok"]
    assert [(r["op"], r["outcome"], r["error"], r["key"], r["version"]) for r in rows] == [
        ("decrypt", "failed", "IntegrityError", key_name, 1), ("decrypt", "refused", "PolicyError", key_name, 1),
        ("encrypt", "refused", "PolicyError", key_name, 1)]  # the version refused is named
    assert "suspended" in rows[2]["detail"]["why"]  # and why, for the reviewer


def test_failed_login_is_recorded_without_mac(tmp_path: Path) -> None:
    """In a fresh process: this one may be logged in to the token already (the login is per process)."""
    tok = softhsm_token("lockout")
    path = tmp_path / "audit.log"
    bad = f"pkcs11:token={tok.label}?module-path={tok.module_path}&pin-value=97531"
    script = ("import sys, keymgr\n"
              "try:\n    keymgr.KeyManager(sys.argv[1], audit=sys.argv[2])\n"
              "except keymgr.AuthenticationError as exc:\n    print(type(exc).__name__)\n"
              "keymgr.KeyManager(sys.argv[3], audit=False)\n")  # the right PIN: the token's counter resets
    done = subprocess.run([sys.executable, "-c", script, bad, str(path), tok.uri()], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "PinIncorrectError"
    (row,) = _entries(path)
    assert (row["op"], row["outcome"], row["error"], row["mac"]) == ("login", "failed", "PinIncorrectError", None)
    assert row["detail"] == {"token": "lockout"}
    assert "97531" not in path.read_text()
    report = verify_log(path)  # chain only: logging in to 'lockout' here would change other tests' logins
    assert report.ok and report.entries == 1 and report.unmaced == [1]


def test_audit_false_writes_nothing(tmp_path: Path, softhsm: TokenUnderTest, key_name: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """audit=False records none of the manager's operations, anywhere: only that auditing was
    turned off, as one audit-off entry in the token's default log (not in KEYMGR_AUDIT_LOG's)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # this test's own default logs
    monkeypatch.setenv("KEYMGR_AUDIT_LOG", str(tmp_path / "env.log"))
    with keymgr.KeyManager(softhsm.uri(), audit=False) as km:
        km.create_key(key_name)
        serial = token_of(km).serial
    assert not (tmp_path / "env.log").exists()
    default = tmp_path / "state" / "keymgr" / "audit" / f"{serial}.log"
    assert [p for p in (tmp_path / "state").rglob("*") if p.is_file()] == [default]
    (off,) = _entries(default)
    assert (off["op"], off["key"], off["outcome"], off["detail"]) == ("audit-off", None, "ok", {"by": "audit=False"})
    assert off["mac"] is not None
    with keymgr.KeyManager(softhsm.uri()) as km:  # the env var is the default
        km.create_key(key_name + "b")
    assert [(r["key"], r["outcome"]) for r in _entries(tmp_path / "env.log")] == \
        [(key_name + "b", "intent"), (key_name + "b", "ok")]
    assert [r["op"] for r in _entries(default)] == ["audit-off"]  # nothing more in the default log
    monkeypatch.setenv("KEYMGR_AUDIT_LOG", "off")  # off through the environment: recorded the same way
    with keymgr.KeyManager(softhsm.uri()) as km:
        km.create_key(key_name + "c")
    assert [r["key"] for r in _entries(tmp_path / "env.log")] == [key_name + "b"] * 2
    assert [(r["op"], r["key"], r["detail"]) for r in _entries(default)] == \
        [("audit-off", None, {"by": "audit=False"}), ("audit-off", None, {"by": "KEYMGR_AUDIT_LOG"})]


def test_given_log_is_flushed_not_closed(tmp_path: Path, softhsm: TokenUnderTest, key_name: str) -> None:
    log = AuditLog(tmp_path / "shared.log", aggregate=("encrypt",))
    with keymgr.KeyManager(softhsm.uri(), audit=log) as km:
        km.create_key(key_name)
        km.encrypt(b"a", key=key_name)
    assert log.pending == 0  # flushed at the manager's close
    log.record("note", detail={"still": "open"})
    log.close()
    ops = [(e.op, e.outcome) for _, e in read_entries(tmp_path / "shared.log")]
    assert ops == [("create", "intent"), ("create", "ok"), ("encrypt", "ok"), ("note", "ok")]


def test_hot_path_overhead_is_small(tmp_path: Path, softhsm: TokenUnderTest, key_name: str) -> None:
    """Aggregated encrypts touch neither the file nor the token per message. The cost is printed
    for the record, not asserted (timings belong in bench/: bench/audit_append.py measures it)."""
    data = b"x" * 1024
    path = tmp_path / "a.log"
    with keymgr.KeyManager(softhsm.uri(), audit=False) as plain, \
            keymgr.KeyManager(softhsm.uri(), audit=AuditLog(path, aggregate_interval=3600)) as km:
        plain.create_key(key_name, profile="gcm")
        km.encrypt(data, key=key_name)
        size = path.stat().st_size if path.exists() else 0
        base, audited = [], []
        for _ in range(5):
            base.append(min(timeit.repeat(lambda: plain.encrypt(data, key=key_name), number=100, repeat=3)) / 100)
            audited.append(min(timeit.repeat(lambda: km.encrypt(data, key=key_name), number=100, repeat=3)) / 100)
        assert (path.stat().st_size if path.exists() else 0) == size  # nothing written per message
        assert km._audit.log.pending == 1 + 5 * 3 * 100
    print(f"1 KiB gcm encrypt: {min(base) * 1e6:.1f} us without audit, {min(audited) * 1e6:.1f} us with")


def test_no_secret_in_any_entry(tmp_path: Path, softhsm: TokenUnderTest, key_name: str) -> None:
    """Plaintexts, context values (and keys), and the PIN never reach the log, on any path."""
    path = tmp_path / "audit.log"
    plaintext = b"plaintext-canary-4111111111111111"
    context = {"ctxkey-canary": "ctxvalue-canary"}
    with keymgr.KeyManager(softhsm.uri(), audit=AuditLog(path, aggregate=())) as km:
        km.create_key(key_name)
        blob = km.encrypt(plaintext, key=key_name, context=context)
        assert km.decrypt(blob, context=context) == plaintext
        for wrong in ({"ctxkey-canary": "other-canary"}, None):
            with pytest.raises(errors.IntegrityError):
                km.decrypt(blob, context=wrong)
        with pytest.raises(errors.IntegrityError):
            km.decrypt(blob[:-5] + b"canry", context=context)
        with pytest.raises(errors.KeymgrError):
            km.encrypt(plaintext, key="missing-" + key_name, context=context)
    text = path.read_text()
    for secret in ("canary", softhsm.user_pin + '"', plaintext.hex(), "4111111111111111"):
        assert secret not in text
    ops = [(r["op"], r["outcome"], r["error"]) for r in _entries(path)]
    assert ops == [("create", "intent", None), ("create", "ok", None), ("encrypt", "ok", None),
                   ("decrypt", "ok", None), ("decrypt", "failed", "IntegrityError"),
                   ("decrypt", "failed", "IntegrityError"), ("decrypt", "failed", "IntegrityError"),
                   ("encrypt", "failed", "KeyNotFoundError")]
