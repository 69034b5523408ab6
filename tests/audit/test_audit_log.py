"""keymgr.audit.AuditLog, the writer: concurrent appends from many processes, fork, aggregation,
sinks, checkpoints, entries made without the token. Real SoftHSM tokens throughout."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keymgr import errors
from keymgr.audit import AuditLog, acting_as, verify_log
from keymgr.audit._token import AuditKey
from keymgr.hsm import TokenSession, open_token
from tests.audit_helpers import truncated, write_lines
from tests.conftest import TokenUnderTest


@pytest.fixture
def ts(softhsm: TokenUnderTest) -> TokenSession:
    return open_token(softhsm.uri())


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


_WRITER = """
import pathlib, sys, time
from keymgr.audit import AuditLog
from keymgr.hsm import open_token
ts = open_token(sys.argv[1])
pathlib.Path(sys.argv[4]).touch()  # ready: SoftHSM has read its tokens (a token being written may be skipped)
while not pathlib.Path(sys.argv[5]).exists():
    time.sleep(0.01)
with AuditLog(sys.argv[2], token=ts, aggregate=()) as log:
    for i in range(int(sys.argv[3])):
        log.record("decrypt", key="orders", version=1, outcome="refused", detail={"i": i})
"""


@pytest.mark.slow
def test_concurrent_processes_append_one_valid_chain(tmp_path: Path, softhsm: TokenUnderTest,
                                                     ts: TokenSession) -> None:
    path, per_process, processes = tmp_path / "shared.log", 200, 4
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(processes)]
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, softhsm.uri(), str(path), str(per_process),
                               str(mark), str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for mark in ready]
    deadline = time.monotonic() + 120
    while not all(mark.exists() for mark in ready) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate()[1].decode() for p in procs if p.poll()]
        time.sleep(0.02)
    go.touch()  # all at once, each process already logged in
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    rows = _rows(path)
    assert len(rows) == processes * per_process
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    assert len({r["actor"]["pid"] for r in rows}) == processes
    assert len({r["chain"] for r in rows}) == 1 and all(r["mac"] for r in rows)
    report = verify_log(path, token=ts)
    assert report.ok, report.broken
    assert report.checkpoint is not None and report.checkpoint[0] == len(rows)


def test_forked_children_reopen_the_file_and_share_the_lock(tmp_path: Path) -> None:
    """A child shares its parent's open file description, so flock would not separate them:
    the sink reopens the file after fork (no token here: entries are chain-only)."""
    path = tmp_path / "fork.log"
    log = AuditLog(path, aggregate=())
    log.record("create", key="before-fork")
    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                for i in range(50):
                    log.record("create", key=f"child-{os.getpid()}", detail={"i": i})
                log.close()
            except BaseException:  # noqa: BLE001
                code = 1
            os._exit(code)
        children.append(pid)
    for i in range(50):
        log.record("create", key="parent", detail={"i": i})
    for pid in children:
        assert os.waitpid(pid, 0)[1] == 0
    log.close()
    report = verify_log(path)
    assert report.ok and report.entries == 151, report.broken


def test_aggregated_counts_are_written_at_interval_without_close(tmp_path: Path, ts: TokenSession) -> None:
    path = tmp_path / "agg.log"
    log = AuditLog(path, token=ts, aggregate_interval=0.2)
    for _ in range(5):
        log.record("encrypt", key="orders", version=2)
    with acting_as("billing"):
        log.record("decrypt", key="orders", version=2)
    log.record("decrypt", key="orders", version=2, outcome="failed", error=errors.IntegrityError("x"))
    deadline = time.monotonic() + 10
    while len(_rows(path)) < 3 and time.monotonic() < deadline:  # the flusher thread writes them
        time.sleep(0.05)
    rows = _rows(path)
    assert log.pending == 0
    assert [(r["op"], r["outcome"]) for r in rows][0] == ("decrypt", "failed")  # failures are never aggregated
    counts = sorted((r["op"], r["detail"]["count"], r["actor"]["principal"]) for r in rows[1:])
    assert counts == [("decrypt", 1, "billing"), ("encrypt", 5, None)]
    assert all(r["detail"]["aggregated"] is True and r["detail"]["first"] <= r["detail"]["last"] for r in rows[1:])
    log.close()
    assert verify_log(path, token=ts).ok


def test_counts_survive_a_failed_flush(tmp_path: Path) -> None:
    path = tmp_path / "agg.log"
    log = AuditLog(path, aggregate_interval=3600)
    log.record("create", key="first")
    for _ in range(3):
        log.record("encrypt", key="orders")
    good = path.read_bytes()
    path.write_bytes(good + b"not an entry\n")
    with pytest.raises(errors.IntegrityError, match="not an audit entry"):
        log.flush()
    assert log.pending == 3  # kept for the next flush
    path.write_bytes(good)
    log.close()
    assert [(r["op"], r["detail"].get("count")) for r in _rows(path)] == [("create", None), ("encrypt", 3)]


def test_logging_and_syslog_sinks_get_the_same_lines(tmp_path: Path, ts: TokenSession,
                                                     caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import syslog

    sent: list[str] = []
    monkeypatch.setattr(syslog, "syslog", lambda priority, text: sent.append(text))
    path = tmp_path / "a.log"
    with caplog.at_level(logging.INFO, logger="keymgr.audit"), \
            AuditLog(path, token=ts, logger="keymgr.audit", syslog=True, aggregate=()) as log:
        log.record("create", key="orders")
        log.record("rotate", key="orders", version=2)
    lines = path.read_text().splitlines()
    assert [r.getMessage() for r in caplog.records if r.name == "keymgr.audit"] == lines == sent


def test_logger_only_log_is_chained_and_maced(ts: TokenSession, caplog: pytest.LogCaptureFixture,
                                              tmp_path: Path) -> None:
    with caplog.at_level(logging.INFO, logger="keymgr.audit.only"), \
            AuditLog(None, token=ts, logger="keymgr.audit.only", aggregate=()) as log:
        for i in range(3):
            log.record("create", key=f"k{i}")
    lines = [r.getMessage() for r in caplog.records if r.name == "keymgr.audit.only"]
    write_lines(tmp_path / "collected.log", [line.encode() for line in lines])
    assert verify_log(tmp_path / "collected.log", token=ts).ok
    with pytest.raises(errors.ConfigurationError):
        AuditLog(None)


def test_entries_without_the_token_have_no_mac_and_are_covered_later(tmp_path: Path, ts: TokenSession) -> None:
    path = tmp_path / "a.log"
    log = AuditLog(path, aggregate=())
    log.record("login", outcome="failed", error=errors.PinIncorrectError("x", token="t", tries_left="unknown"))
    log.attach(ts)
    log.record("create", key="orders")
    log.close()
    rows = _rows(path)
    assert [r["mac"] is None for r in rows] == [True, False]
    report = verify_log(path, token=ts)
    assert report.ok and report.unmaced == [1] and report.unauthenticated_tail == []
    forged = json.loads(path.read_text().splitlines()[0])
    forged["error"] = "NothingHappened"
    from keymgr._canonical import canonical_json as canonical

    write_lines(path, [canonical(forged), path.read_bytes().splitlines()[1]])
    report = verify_log(path, token=ts)  # the unMACed entry was edited: the MACed one after it no longer chains
    assert (report.broken.line, report.broken.seq) == (1, 1)


def test_batched_checkpoint_leaves_a_documented_window(tmp_path: Path, ts: TokenSession) -> None:
    path = tmp_path / "a.log"
    log = AuditLog(path, token=ts, checkpoint_every=5, aggregate=())
    for i in range(12):
        log.record("create", key=f"k{i}")
    chain = verify_log(path).chain
    assert AuditKey(ts).checkpoint(chain)[0] == 10
    lines = path.read_bytes().splitlines()
    write_lines(path, truncated(lines, 2))
    assert verify_log(path, token=ts).ok  # seq 11-12 were past the last checkpoint: the window
    write_lines(path, truncated(lines, 3))
    assert verify_log(path, token=ts).broken.seq == 10
    write_lines(path, lines)
    log.close()  # close checkpoints the newest entry
    assert AuditKey(ts).checkpoint(chain)[0] == 12


def test_bad_arguments_are_configuration_errors(tmp_path: Path) -> None:
    for kwargs in ({"fsync": "sometimes"}, {"checkpoint_every": 0}, {"aggregate_interval": 0},
                   {"aggregate": ("Not An Op",)}):
        with pytest.raises(errors.ConfigurationError):
            AuditLog(tmp_path / "x.log", **kwargs)
    with AuditLog(tmp_path / "x.log", fsync="none") as log:
        log.record("create", key="bad name with spaces", detail={"Bad-Key": object()})
    (row,) = _rows(tmp_path / "x.log")
    assert row["key"] is None and row["detail"] == {"invalid_detail": True}


def test_a_multiprocessing_child_writes_its_aggregated_counts_as_it_ends(softhsm: TokenUnderTest, key_name: str,
                                                                        tmp_path: Path) -> None:
    """Encryptions are counted and written once per aggregate_interval (60 s): a fork child that
    ended before then lost its counts (os._exit runs no atexit handler). multiprocessing runs its
    children's finalizers, so the log gets them, MACed by the token."""
    import multiprocessing

    import keymgr

    log = tmp_path / "audit.log"
    with keymgr.KeyManager(softhsm.uri(), audit=str(log)) as km:
        km.create_key(key_name)
        def in_child() -> None:  # the parent's manager, as a fork pool's worker uses it
            blobs = [km.encrypt(b"in the child", key=key_name) for _ in range(3)]
            km.decrypt(blobs[0])

        child = multiprocessing.get_context("fork").Process(target=in_child)
        child.start()
        child.join(60)
        assert child.exitcode == 0
        mine = [r for r in _rows(log) if r["actor"]["pid"] == child.pid]
    counts = {r["op"]: r["detail"]["count"] for r in mine if (r.get("detail") or {}).get("aggregated")}
    assert counts == {"encrypt": 3, "decrypt": 1}
    assert all(r["mac"] for r in mine)
    assert verify_log(log, token=open_token(softhsm.uri())).ok
