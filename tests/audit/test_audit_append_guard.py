"""The audit writer appends only where the token agrees, and fails closed.

A log cut, rolled back to an older copy, stripped of its last line end, deleted, or moved to
another token must make the next operation refuse (naming what happened) instead of being
continued, after which `keymgr audit verify` would pass with entries gone. A log that cannot
be written stops operations that change key state before they act, and stops encrypt and
decrypt after a failed flush of aggregated counts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import keymgr
from keymgr.audit import AuditLog, verify_log, verify_logs
from tests._internals import token_of
from tests.conftest import TokenUnderTest

REPO = Path(__file__).resolve().parents[2]


def _manager(token: TokenUnderTest, log: Path, **options: object) -> keymgr.KeyManager:
    return keymgr.KeyManager(token.uri(), audit=AuditLog(log, **options))  # type: ignore[arg-type]


def _lines(log: Path) -> list[bytes]:
    return log.read_bytes().splitlines(keepends=True)


def test_a_cut_log_refuses_the_next_operation_and_still_fails_verify(softhsm: TokenUnderTest, key_name: str,
                                                                      tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    with _manager(softhsm, log) as km:
        km.create_key(key_name)
        km.rotate(key_name)
        km.rotate(key_name)
    lines = _lines(log)
    log.write_bytes(b"".join(lines[:-4]))  # the two rotations (intent and outcome entries) cut off
    cut = r"ends at entry \d+.*checkpointed entry \d+.*cut off"
    with _manager(softhsm, log) as km, pytest.raises(keymgr.IntegrityError, match=cut):
        km.encrypt(b"x", key=key_name)
    assert log.read_bytes() == b"".join(lines[:-4])  # nothing appended
    with keymgr.KeyManager(softhsm.uri(), audit=False) as km:
        report = verify_log(log, token=token_of(km))
    assert not report.ok and "cut off" in str(report.broken)


def test_a_log_rolled_back_to_an_older_copy_refuses(softhsm: TokenUnderTest, key_name: str, tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    with _manager(softhsm, log) as km:
        km.create_key(key_name)
        shutil.copy(log, tmp_path / "old.log")
        km.rotate(key_name)
    shutil.copy(tmp_path / "old.log", log)
    with _manager(softhsm, log) as km, pytest.raises(keymgr.IntegrityError, match="rolled back"):
        km.rotate(key_name)
    with keymgr.KeyManager(softhsm.uri(), audit=False) as km:
        assert len(km.describe_key(key_name).versions) == 2  # the refused rotation did nothing
        assert not verify_log(log, token=token_of(km)).ok


def test_a_stripped_last_line_end_refuses_and_fails_verify(softhsm: TokenUnderTest, key_name: str,
                                                            tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    with _manager(softhsm, log) as km:
        km.create_key(key_name)
    data = log.read_bytes()
    log.write_bytes(data[:-1])
    with _manager(softhsm, log) as km, pytest.raises(keymgr.IntegrityError, match="lost its line end"):
        km.encrypt(b"x", key=key_name)
    assert log.read_bytes() == data[:-1]  # the checkpointed entry was not "repaired" away
    with keymgr.KeyManager(softhsm.uri(), audit=False) as km:
        report = verify_log(log, token=token_of(km))
    assert not report.ok and "line end" in str(report.broken)


def test_a_deleted_log_refuses_until_repaired(softhsm: TokenUnderTest, key_name: str, tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    with _manager(softhsm, log) as km:
        km.create_key(key_name)
    log.unlink()
    with _manager(softhsm, log) as km, pytest.raises(keymgr.IntegrityError, match="deleted, emptied or replaced"):
        km.encrypt(b"x", key=key_name)
    assert not log.exists() or log.stat().st_size == 0
    env = {**os.environ, **softhsm.env, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "keymgr", "--token", softhsm.uri(), "audit", "repair", str(log),
                           "--yes"], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    with _manager(softhsm, log) as km:
        km.encrypt(b"x", key=key_name)
    assert b'"audit-repair"' in _lines(log)[0]


def test_a_log_of_another_token_is_refused(softhsm: TokenUnderTest, key_name: str, tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    with _manager(softhsm, log) as km:
        km.create_key(key_name)
    other = TokenUnderTest(softhsm.kind, softhsm.module_path, "keymgr-B", softhsm.user_pin, softhsm.so_pin,
                           softhsm.env)
    with _manager(other, log) as km, pytest.raises(keymgr.IntegrityError, match="belongs to another token"):
        km.create_key(key_name)


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (not root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def _fill(disk: Path) -> None:
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_rotate_on_a_full_log_disk_changes_nothing(softhsm: TokenUnderTest, key_name: str, small_disk: Path) -> None:
    with keymgr.KeyManager(softhsm.uri(), audit=False) as km:
        km.create_key(key_name)
    _fill(small_disk)  # the log's first page cannot be allocated
    with _manager(softhsm, small_disk / "audit.log") as km, pytest.raises(keymgr.StorageError, match="audit log"):
        km.rotate(key_name)
    with keymgr.KeyManager(softhsm.uri(), audit=False) as km:
        assert len(km.describe_key(key_name).versions) == 1


@pytest.mark.parametrize("cache", [False, True])
def test_encrypt_refuses_after_a_failed_flush(softhsm: TokenUnderTest, key_name: str, small_disk: Path,
                                              cache: bool) -> None:
    log = small_disk / "audit.log"
    with keymgr.KeyManager(softhsm.uri(), audit=False) as km:
        km.create_key(key_name)
    km = keymgr.KeyManager(softhsm.uri(), cache=cache, audit=AuditLog(log, aggregate_interval=3600))
    try:
        km.encrypt(b"counted", key=key_name)
        _fill(small_disk)
        with pytest.raises(keymgr.StorageError, match="audit log"):
            km._audit.log.flush()  # type: ignore[union-attr]  # the interval's flush, made now
        for _ in range(3):
            with pytest.raises(keymgr.StorageError, match=f"audit log {log}"):
                km.encrypt(b"refused", key=key_name)
        (small_disk / "filler").unlink()
        km.encrypt(b"written again", key=key_name)  # the log recovered: operations go on
    finally:
        km.close()


@pytest.mark.slow
def test_cli_names_the_audit_log_not_the_output_file(softhsm: TokenUnderTest, key_name: str, small_disk: Path,
                                                     tmp_path: Path) -> None:
    log = small_disk / "audit.log"
    with keymgr.KeyManager(softhsm.uri(), audit=False) as km:
        km.create_key(key_name)
    _fill(small_disk)
    (tmp_path / "in.txt").write_bytes(b"hello")
    env = {**os.environ, **softhsm.env, "PYTHONPATH": str(REPO), "KEYMGR_AUDIT_LOG": str(log)}
    proc = subprocess.run([sys.executable, "-m", "keymgr", "--token", softhsm.uri(), "key", "rotate", key_name],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert proc.returncode != 0
    assert "audit log" in proc.stderr and str(log) in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "keymgr", "--token", softhsm.uri(), "encrypt", "--key", key_name,
                           str(tmp_path / "in.txt"), "-o", str(tmp_path / "out.kmg")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert proc.returncode != 0 and "out.kmg" not in proc.stderr.split("audit log")[0], proc.stderr
    assert not (tmp_path / "out.kmg").exists()


def test_logs_of_several_writers_verify_together_and_a_deleted_one_is_missing(
        softhsm: TokenUnderTest, key_name: str, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    for host in range(3):
        with _manager(softhsm, logs / f"host{host}.log") as km:
            if host == 0:
                km.create_key(key_name)
            km.encrypt(b"x", key=key_name)
    # the shared test token also checkpoints other tests' logs: only these three are ours
    with keymgr.KeyManager(softhsm.uri(), audit=False) as km:
        together = verify_logs([logs], token=token_of(km))
        ours = {r.chain for r in together.reports}
        assert len(ours) == 3 and all(r.ok for r in together.reports)
        assert not [m for m in together.missing if str(logs) in m.path]
        (logs / "host1.log").unlink()
        after = verify_logs([logs], token=token_of(km))
    missing = [m for m in after.missing if str(logs) in m.path]
    assert not after.ok and len(missing) == 1 and missing[0].path.endswith("host1.log") and missing[0].chain in ours


def test_an_unmaced_line_appended_by_hand_is_named_not_blessed(softhsm: TokenUnderTest, key_name: str,
                                                                tmp_path: Path) -> None:
    """Someone without the PIN appends a well-chained entry with no MAC (framing a user). The next
    writer continues the chain, but first writes a MACed entry naming it as unauthenticated."""
    import dataclasses
    import json

    from keymgr.audit._entry import line_digest, parse_line

    log = tmp_path / "audit.log"
    with _manager(softhsm, log) as km:
        km.create_key(key_name)
    last = _lines(log)[-1].rstrip(b"\n")
    entry = parse_line(last)
    forged = dataclasses.replace(entry, seq=entry.seq + 1, prev=line_digest(last), op="decrypt", outcome="ok",
                                 mac=None, detail={"aggregated": True, "count": 99999, "first": entry.time,
                                                   "last": entry.time})
    with open(log, "ab") as handle:
        handle.write(forged.line() + b"\n")
    with _manager(softhsm, log, aggregate=()) as km:
        km.encrypt(b"x", key=key_name)
    rows = [json.loads(line) for line in _lines(log)]
    marker = next(r for r in rows if r["op"] == "audit-unauthenticated")
    assert marker["detail"]["first"] == forged.seq and marker["mac"]
    with keymgr.KeyManager(softhsm.uri(), audit=False) as km:
        report = verify_log(log, token=token_of(km))
    assert report.ok and forged.seq in report.unmaced


def test_a_same_size_reorder_is_seen_by_a_running_writer(softhsm: TokenUnderTest, key_name: str,
                                                         tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    with _manager(softhsm, log) as km:
        km.create_key(key_name)
        km.rotate(key_name)
        lines = _lines(log)
        log.write_bytes(b"".join(lines[:-2] + [lines[-1], lines[-2]]))  # same size, last two swapped
        with pytest.raises(keymgr.IntegrityError):
            km.rotate(key_name)
    with keymgr.KeyManager(softhsm.uri(), audit=False) as km:
        assert len(km.describe_key(key_name).versions) == 2


def test_a_log_swapped_for_another_log_of_the_token_is_refused(softhsm: TokenUnderTest, key_name: str,
                                                               tmp_path: Path) -> None:
    one, two = tmp_path / "h1.log", tmp_path / "h2.log"
    with _manager(softhsm, one) as km:
        km.create_key(key_name)
    with _manager(softhsm, two) as km:
        km.rotate(key_name)
    shutil.copy(two, one)
    with _manager(softhsm, one) as km, pytest.raises(keymgr.IntegrityError, match="replaced by another log"):
        km.rotate(key_name)
