"""``keymgr audit repair`` / :func:`keymgr.audit.repair_log` acts only on damaged logs of the
token it was given, and records why the log failed (findings of an outside review: each test
failed on 06279a6, before the checks in keymgr/audit/repair.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keymgr import KeyManager, errors
from keymgr.audit import AuditLog, repair_log
from keymgr.hsm import open_token
from tests.conftest import TokenUnderTest, softhsm_token

REPO = Path(__file__).resolve().parents[2]


def _written_log(tok: TokenUnderTest, path: Path, entries: int = 3) -> None:
    with AuditLog(path, token=open_token(tok.uri())) as log:
        for n in range(entries):
            log.record("encrypt", key=f"k{n}")


def test_repair_refuses_a_file_that_is_no_audit_log(softhsm: TokenUnderTest, tmp_path: Path) -> None:
    """An operator who names the wrong file (an application's config, a report) must not see it moved
    to FILE.cut-TIME and replaced by a new audit log: it never was a log of this token."""
    config = tmp_path / "app.conf"
    config.write_text("important = true\n")
    ts = open_token(softhsm.uri())
    with pytest.raises(errors.KeymgrError):
        repair_log(config, ts)
    assert config.read_text() == "important = true\n"
    assert not list(tmp_path.glob("app.conf.cut-*"))


def test_repair_with_another_token_leaves_a_sound_log_alone(softhsm: TokenUnderTest, tmp_path: Path) -> None:
    """``keymgr --token B audit repair LOG`` on a log that verifies with token A (the 3 a.m. typo)
    must refuse: no entry of it verifies with B's audit key, so nothing says it lost entries."""
    log = tmp_path / "audit.log"
    _written_log(softhsm, log)
    before = log.read_bytes()
    other = softhsm_token("keymgr-B")
    ts = open_token(other.uri())
    with pytest.raises(errors.KeymgrError):
        repair_log(log, ts)
    assert log.read_bytes() == before
    ts = open_token(softhsm.uri())
    from keymgr.audit.verify import verify_log
    assert verify_log(log, token=ts).ok


def test_repair_of_a_missing_file_does_not_say_it_verifies(softhsm: TokenUnderTest, tmp_path: Path) -> None:
    """A mistyped path is not 'a log that verifies'."""
    ts = open_token(softhsm.uri())
    with pytest.raises(errors.KeymgrError) as caught:
        repair_log(tmp_path / "no-such.log", ts)
    assert "verifies" not in str(caught.value)


def test_the_repair_entry_says_an_entry_was_edited_not_only_lost(softhsm: TokenUnderTest, tmp_path: Path) -> None:
    """A PIN holder edits the entry that recorded their decryption, repairs, and deletes LOG.cut-TIME:
    the new log verifies (exit 0) and its repair entry reads like a cut ('previous_last_seq'), not
    like a forgery. The entry should keep why verification failed (the first broken entry and why)."""
    log = tmp_path / "audit.log"
    _written_log(softhsm, log, entries=5)
    lines = log.read_text().splitlines()
    edited = json.loads(lines[2])
    edited["op"] = "decrypt-stream"
    lines[2] = json.dumps(edited, separators=(",", ":"), sort_keys=True)
    log.write_text("\n".join(lines) + "\n")
    ts = open_token(softhsm.uri())
    repair = repair_log(log, ts)
    assert repair.moved_to is not None
    os.unlink(repair.moved_to)
    detail = json.loads(log.read_text().splitlines()[0])["detail"]
    assert any("MAC" in str(v) or "edited" in str(v) or "broken" in k for k, v in detail.items()), detail


def test_cli_repair_names_the_failure_before_asking(softhsm: TokenUnderTest, tmp_path: Path) -> None:
    """The confirmation only asks 'Start LOG again?': the operator is not told what is wrong with the
    log (wrong token, not a log, entries lost) before agreeing to move it aside."""
    log = tmp_path / "audit.log"
    _written_log(softhsm, log)
    other = softhsm_token("keymgr-B")
    env = {**os.environ, "PYTHONPATH": str(REPO), "KEYMGR_AUDIT_LOG": str(tmp_path / "cli.log")}
    run = subprocess.run([sys.executable, "-m", "keymgr", "--token", other.uri(), "audit", "repair", str(log)],
                         input="n\n", capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    shown = run.stdout + run.stderr
    assert "does not verify" in shown or "another token" in shown, shown


def test_known_manager_log_is_repairable_after_a_cut(softhsm: TokenUnderTest, tmp_path: Path) -> None:
    """Control: the intended case still works (a cut log of this token is repaired)."""
    log = tmp_path / "audit.log"
    with KeyManager(softhsm.uri(), audit=log) as km:
        km.list_keys()
    _written_log(softhsm, log, entries=4)
    log.write_text(log.read_text().splitlines()[0] + "\n")
    ts = open_token(softhsm.uri())
    assert repair_log(log, ts).moved_to is not None
