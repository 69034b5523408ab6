"""Second outside review of keymgr.audit.repair_log (after the first review's fixes)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keymgr import errors
from keymgr.audit import AuditLog, verify_log
from keymgr.audit.repair import repair_log
from keymgr.hsm import open_token


@pytest.fixture
def ts(softhsm: Any) -> Iterator[Any]:
    session = open_token(softhsm.uri())
    yield session
    session.close()


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

    def other_operator_repairs_first() -> bool:
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
