"""``keymgr audit repair`` / :func:`keymgr.audit.repair_log` acts only on damaged logs of the
token it was given, and records why the log failed (findings of an outside review: each test
failed on 06279a6, before the checks in keymgr/audit/repair.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from keymgr import KeyManager, errors
from keymgr.audit import AuditLog, repair_log, verify_log
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


@pytest.fixture
def ts(softhsm: TokenUnderTest) -> Any:
    return open_token(softhsm.uri())


def _damaged_log(path: Path, ts: Any) -> None:
    """A log of ``ts`` with its last entry cut off (the token checkpointed it)."""
    with AuditLog(path, token=ts) as log:
        for i in range(3):
            log.record("create", key=f"k{i}")
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))


def test_repair_refuses_a_symlink(tmp_path: Path, ts: Any) -> None:
    """A symlink is not a regular file (the docs' first check; the project's rule: never replace a
    symlink asked to write to). Today repair_log follows it for the checks, then replaces the
    symlink with a new regular log, keeps only the symlink as LOG.cut-* and leaves the damaged
    target where it was, with the token's registration of its path forgotten."""
    real, link = tmp_path / "real.log", tmp_path / "link.log"
    _damaged_log(real, ts)
    os.symlink("real.log", link)
    try:
        repair_log(link, ts)
    except (errors.PolicyError, errors.ConfigurationError):
        assert link.is_symlink() and not verify_log(real, token=ts).ok
        return
    cut = [p for p in tmp_path.iterdir() if p.name.startswith("link.log.cut-")]
    pytest.fail(f"repair followed the symlink: link.log is a symlink now: {link.is_symlink()}; "
                f"{cut[0].name} is a symlink: {cut[0].is_symlink()}; real.log still fails: "
                f"{not verify_log(real, token=ts).ok}")


def test_repair_rechecks_the_file_after_confirmation(tmp_path: Path, ts: Any) -> None:
    """The CLI asks between the checks and the move (an operator's time). A second operator's
    repair in that window leaves a log that verifies; the first repair must not then move that
    log aside and record the old damage again."""
    log = tmp_path / "audit.log"
    _damaged_log(log, ts)

    def other_operator_repairs_first(damage: str) -> bool:
        repair_log(log, ts)
        time.sleep(1.1)  # an operator reads the question: LOG.cut-TIME names differ by the second
        return True

    try:
        repair_log(log, ts, confirm=other_operator_repairs_first)
    except (errors.PolicyError, errors.ConfigurationError):
        return
    kept = sorted(p for p in tmp_path.iterdir() if p.name.startswith("audit.log.cut-"))
    verifying = [p.name for p in kept if verify_log(p, token=ts).ok]
    assert not verifying, f"a log that verified was moved aside as damaged: {verifying}"


def test_cli_repair_shows_why_before_it_asks(softhsm: TokenUnderTest, tmp_path: Path, ts: Any) -> None:
    """The reason the repair is needed (the verifier's, for the line it broke at) is printed
    before the question; answering no changes nothing."""
    log = tmp_path / "audit.log"
    _damaged_log(log, ts)
    before = log.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(REPO), "KEYMGR_AUDIT_LOG": str(tmp_path / "cli.log")}
    run = subprocess.run([sys.executable, "-m", "keymgr", "--token", softhsm.uri(), "audit", "repair", str(log)],
                         input="n\n", capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert run.returncode != 0 and "nothing was changed" in run.stderr, run.stderr
    assert f"{log} does not verify: line 3:" in run.stderr and "cut off" in run.stderr, run.stderr
    assert log.read_bytes() == before and not list(tmp_path.glob("audit.log.cut-*"))
