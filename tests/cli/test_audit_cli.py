"""``keymgr audit verify`` and ``keymgr audit show``, through click's runner and as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from keymgr.audit import AuditLog
from keymgr.cli import cli
from keymgr.hsm import TokenSession, open_token
from tests.audit.test_audit_verify import CASES
from tests.audit_helpers import ENTRIES, honest_log, write_lines
from tests.conftest import TokenUnderTest


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def ts(softhsm: TokenUnderTest) -> TokenSession:
    return open_token(softhsm.uri())


def test_verify_honest_log(tmp_path: Path, softhsm: TokenUnderTest, ts: TokenSession) -> None:
    path = tmp_path / "a.log"
    honest_log(path, ts)
    code, out, err = _run("--token", softhsm.uri(), "audit", "verify", str(path))
    assert code == 0, err
    assert f"ok: {path}: {ENTRIES} entries" in out and "MACs verified" in out and f"checkpoint: seq {ENTRIES}" in out
    code, out, _ = _run("--token", softhsm.uri(), "--json", "audit", "verify", str(path))
    assert code == 0 and json.loads(out)["ok"] is True


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(CASES))
def test_verify_names_the_first_broken_entry(tmp_path: Path, softhsm: TokenUnderTest, ts: TokenSession,
                                             kind: str) -> None:
    tamper, (line, seq), _chain_line, reason = CASES[kind]
    path = tmp_path / "a.log"
    write_lines(path, tamper(honest_log(path, ts)))
    code, out, err = _run("--token", softhsm.uri(), "audit", "verify", str(path))
    assert code == 4
    assert f"broken at line {line} (seq {seq})" in err and reason in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, out, _ = _run("--token", softhsm.uri(), "audit", "verify", "--json", str(path))
    report = json.loads(out)
    assert code == 4 and report["ok"] is False and (report["broken"]["line"], report["broken"]["seq"]) == (line, seq)


def test_verify_without_token_checks_the_chain(tmp_path: Path, ts: TokenSession) -> None:
    path = tmp_path / "a.log"
    lines = honest_log(path, ts)
    code, out, _ = _run("audit", "verify", "--no-token", str(path))
    assert code == 0 and "hash chain only" in out
    write_lines(path, lines[:3] + lines[4:])
    code, _, err = _run("audit", "verify", "--no-token", str(path))
    assert code == 4 and "line 4 (seq 5)" in err


def test_show_filters(tmp_path: Path, ts: TokenSession) -> None:
    path = tmp_path / "a.log"
    with AuditLog(path, token=ts, aggregate=(), principal="batch") as log:
        log.record("create", key="orders", version=1)
        log.record("decrypt", key="orders", version=1, outcome="refused", error=PermissionError())
        log.record("create", key="payroll", version=1, principal="hr-app")
    code, out, _ = _run("--json", "audit", "show", str(path), "--key", "orders")
    assert code == 0 and [(e["op"], e["line"]) for e in json.loads(out)] == [("create", 1), ("decrypt", 2)]
    code, out, _ = _run("--json", "audit", "show", str(path), "--actor", "hr-app")
    assert [e["key"] for e in json.loads(out)] == ["payroll"]
    code, out, _ = _run("--json", "audit", "show", str(path), "--op", "decrypt", "--outcome", "refused")
    assert [e["error"] for e in json.loads(out)] == ["PermissionError"]
    code, out, _ = _run("--json", "audit", "show", str(path), "--since", "2000-01-01", "--until", "2001-01-01")
    assert json.loads(out) == []
    code, out, _ = _run("--json", "audit", "show", str(path), "--since", "2000-01-01T00:00Z")
    assert len(json.loads(out)) == 3
    code, out, _ = _run("audit", "show", str(path), "--actor", "batch")
    assert code == 0 and "orders" in out and "payroll" not in out
    code, _, err = _run("audit", "show", str(path), "--since", "yesterday")
    assert code == 2 and "ISO 8601" in err


@pytest.mark.slow
def test_local_token_logs_by_default_and_verifies_in_a_subprocess(tmp_path: Path, key_name: str) -> None:
    """`keymgr init` + `key create` with no configuration: the log is $KEYMGR_HOME/audit.log."""
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "KEYMGR_TOKEN", "KEYMGR_AUDIT_LOG")}
    env["KEYMGR_HOME"] = str(tmp_path / "home")
    keymgr_cmd = [sys.executable, "-m", "keymgr"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*keymgr_cmd, *args], env=env, capture_output=True, text=True, timeout=120)

    assert run("init").returncode == 0
    made = run("key", "create", key_name)
    assert made.returncode == 0, made.stderr
    log = tmp_path / "home" / "audit.log"

    def rows() -> list[tuple[str, str | None, str]]:
        return [(r["op"], r["key"], r["outcome"]) for r in map(json.loads, log.read_text().splitlines())]

    assert rows() == [("create", key_name, "intent"), ("create", key_name, "ok")]
    verified = run("audit", "verify")
    assert verified.returncode == 0 and f"ok: {log}: 2 entries" in verified.stdout, verified.stderr
    assert run("key", "create", key_name + "-2").returncode == 0
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:3]))  # the last entry cut off
    verified = run("audit", "verify")
    assert verified.returncode == 4 and "line 4 (seq 4)" in verified.stderr and "cut off" in verified.stderr
    log.unlink()  # the whole log deleted: the next operation is refused before it acts
    refused = run("key", "create", key_name + "-3")
    assert refused.returncode == 4 and "deleted, emptied or replaced" in refused.stderr, refused.stderr
    assert not log.exists() or log.stat().st_size == 0  # nothing appended
    repaired = run("audit", "repair", str(log), "--yes")  # the deliberate way on: a new chain
    assert repaired.returncode == 0, repaired.stderr
    listed = run("--json", "key", "list")
    assert listed.returncode == 0, listed.stderr
    names = {k["name"] for k in json.loads(listed.stdout)["keys"]}
    assert {key_name, key_name + "-2"} <= names and key_name + "-3" not in names  # the refused create made nothing
    assert run("key", "create", key_name + "-3").returncode == 0
    assert rows() == [("audit-repair", None, "ok"), ("create", key_name + "-3", "intent"),
                      ("create", key_name + "-3", "ok")]
    verified = run("audit", "verify")  # --sole: the old chain's loss is acknowledged by the MACed repair entry
    assert verified.returncode == 0 and "acknowledged by `keymgr audit repair`" in verified.stdout, verified.stderr
