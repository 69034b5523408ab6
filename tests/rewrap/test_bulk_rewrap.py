"""keymgr.rewrap.bulk and ``keymgr rewrap``: trees of envelopes moved to the primary on SoftHSM.

Files are checked by what is on disk afterwards: which key id each envelope
names, that it still decrypts to its plaintext, its mode, that non-envelopes
are byte-identical, and what the journal says.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import keymgr
from keymgr.cli import cli
from keymgr.envelope.inspect import inspect_file
from keymgr.rewrap import bulk as bulk_rewrap
from keymgr.rewrap.journal import Entry, Journal, check_journal, file_digest, read_entries
from tests.conftest import TokenUnderTest

CTX = {"app": "bulk"}


@pytest.fixture
def km(softhsm: TokenUnderTest) -> Iterator[keymgr.KeyManager]:
    with keymgr.KeyManager(softhsm.uri()) as manager:
        yield manager


def _tree(km: keymgr.KeyManager, root: Path, key: str, count: int = 12) -> dict[Path, bytes]:
    """``count`` envelopes (every third a stream) in nested directories, plus two plain files."""
    plain: dict[Path, bytes] = {}
    for i in range(count):
        folder = root / f"d{i % 3}" / ("deep" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        data = os.urandom(50 + i * 300)
        if i % 3 == 0:
            out = io.BytesIO()
            km.encrypt_stream(io.BytesIO(data), out, key=key, context=CTX)
            path = folder / f"f{i}.kms"
            path.write_bytes(out.getvalue())
        else:
            path = folder / f"f{i}.cms"
            path.write_bytes(km.encrypt(data, key=key, context=CTX))
        plain[path] = data
    (root / "README.txt").write_text("not an envelope\n")
    (root / "d1" / "empty").write_bytes(b"")
    return plain


def _decrypts(km: keymgr.KeyManager, path: Path, data: bytes) -> bool:
    blob = path.read_bytes()
    info = inspect_file(path)
    assert info is not None
    if info.kind == "message":
        return km.decrypt(blob, context=CTX) == data
    out = io.BytesIO()
    km.decrypt_stream(io.BytesIO(blob), out, context=CTX)
    return out.getvalue() == data


def _primary_id(km: keymgr.KeyManager, key: str) -> bytes:
    return km.describe_key(key).primary_version.key_id


def test_tree_moves_to_primary_skips_others_keeps_mode(km: keymgr.KeyManager, key_name: str, tmp_path: Path) -> None:
    km.create_key(key_name)
    plain = _tree(km, tmp_path, key_name)
    odd = next(iter(plain))
    odd.chmod(0o600)
    km.rotate(key_name)
    km.rotate(key_name)
    journal = tmp_path.parent / f"{tmp_path.name}.journal"
    summary = bulk_rewrap.run(km.rewrapper(), [tmp_path], journal=journal)
    assert summary.counts == {"rewrapped": 12, "current": 0, "skipped": 2, "failed": 0}
    assert summary.ok and summary.total == 14
    v3 = _primary_id(km, key_name)
    km.retire(key_name, below=3, immediately=True)
    for path, data in plain.items():
        info = inspect_file(path)
        assert info is not None and info.kek_ids == (v3,)
        assert _decrypts(km, path, data)
    assert stat.S_IMODE(odd.stat().st_mode) == 0o600
    assert (tmp_path / "README.txt").read_text() == "not an envelope\n"
    assert check_journal(journal) == []
    states = [e.state for e in read_entries(journal)]
    assert states.count("begin") == states.count("done") == 12 and states.count("skipped") == 2
    again = bulk_rewrap.run(km.rewrapper(), [tmp_path], journal=journal)  # resumed: finished files stay finished
    assert again.counts["rewrapped"] == 12 and again.resumed == 12
    fresh = bulk_rewrap.run(km.rewrapper(), [tmp_path])  # no journal: every envelope is seen to be current
    assert fresh.counts == {"rewrapped": 0, "current": 12, "skipped": 2, "failed": 0}
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_failures_are_reported_and_leave_files(km: keymgr.KeyManager, key_name: str, tmp_path: Path) -> None:
    km.create_key(key_name)
    good = tmp_path / "good.cms"
    good.write_bytes(km.encrypt(b"good", key=key_name))
    truncated = tmp_path / "truncated.cms"
    truncated.write_bytes(good.read_bytes()[:-5])
    km.rotate(key_name)
    km.rotate(key_name)
    old = tmp_path / "old.cms"
    old.write_bytes(good.read_bytes())
    km.retire(key_name, below=2, immediately=True)  # good/old were written under v1: retired, cannot move either
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    summary = bulk_rewrap.run(km.rewrapper(), [tmp_path, tmp_path / "missing"])
    assert summary.counts["failed"] == 4 and not summary.ok
    reasons = {Path(f.path).name: f.reason for f in summary.failures}
    assert "retired" in reasons["good.cms"] and "announces" in reasons["truncated.cms"]
    assert "no such file" in reasons["missing"]
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_dry_run_writes_nothing(km: keymgr.KeyManager, key_name: str, tmp_path: Path) -> None:
    km.create_key(key_name)
    plain = _tree(km, tmp_path, key_name, count=4)
    km.rotate(key_name)
    digests = {p: file_digest(p) for p in plain}
    seen: list[bulk_rewrap.FileOutcome] = []
    summary = bulk_rewrap.run(km.rewrapper(), [tmp_path], dry_run=True, journal=tmp_path / "j", on_outcome=seen.append)
    assert summary.counts["rewrapped"] == 4 and summary.dry_run
    assert sorted(o.moves for o in seen if o.kind) == [(f"{key_name} v1->v2",)] * 4
    assert {p: file_digest(p) for p in plain} == digests and not (tmp_path / "j").exists()


def _locked_by_child(path: Path) -> subprocess.Popen[bytes]:
    """A process that holds ``path``'s writer lock (as atomic_output's writer does) until killed."""
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.readline() == b"locked\n"
    return child


@pytest.mark.slow
def test_leftover_temp_files_of_dead_processes_are_removed(km: keymgr.KeyManager, key_name: str,
                                                           tmp_path: Path) -> None:
    """Liveness is the writer's flock, not its pid: a SIGKILLed writer that is still a zombie (not
    reaped: its pid answers kill(pid, 0)) has released its lock, a live writer has not."""
    km.create_key(key_name)
    (tmp_path / "a.cms").write_bytes(km.encrypt(b"a", key=key_name))
    dead = tmp_path / f".a.cms.{bulk_rewrap.TEMP_TAG}.999999999.abcd1234.tmp"
    zombie = tmp_path / f".a.cms.{bulk_rewrap.TEMP_TAG}.1.zombie12.tmp"
    alive = tmp_path / f".a.cms.{bulk_rewrap.TEMP_TAG}.{os.getpid()}.abcd1234.tmp"
    for leftover in (dead, zombie, alive):
        leftover.write_bytes((tmp_path / "a.cms").read_bytes())
    killed, writer = _locked_by_child(zombie), _locked_by_child(alive)
    zombie = zombie.rename(tmp_path / f".a.cms.{bulk_rewrap.TEMP_TAG}.{killed.pid}.zombie12.tmp")  # its own pid
    try:
        killed.kill()  # not reaped: a zombie until the end of the test
        # waits until it has exited (its descriptors closed, so its flock released) and leaves it
        # unreaped (WNOWAIT): deterministic where a sleep raced with the kernel's exit
        os.waitid(os.P_PID, killed.pid, os.WEXITED | os.WNOWAIT)
        os.kill(killed.pid, 0)  # still a zombie: its pid answers, which is what the test is about
        summary = bulk_rewrap.run(km.rewrapper(), [tmp_path])
        assert summary.cleaned == 2 and not dead.exists() and not zombie.exists() and alive.exists()
        assert summary.total == 1  # no leftover was taken for input
    finally:
        writer.kill()
        writer.wait()
        killed.wait()


def test_journal_resume_rules(km: keymgr.KeyManager, key_name: str, tmp_path: Path) -> None:
    """A begin whose rename happened is finished without a token call; one whose rename did not is redone."""
    km.create_key(key_name)
    done_file, redo_file = tmp_path / "renamed.cms", tmp_path / "not-renamed.cms"
    for path in (done_file, redo_file):
        path.write_bytes(km.encrypt(path.name.encode(), key=key_name))
    km.rotate(key_name)
    old = {p: p.read_bytes() for p in (done_file, redo_file)}
    new_done = km.rewrap(old[done_file])
    done_file.write_bytes(new_done)  # as if renamed, then killed before "done"
    journal = tmp_path.parent / f"{tmp_path.name}-resume.journal"
    with Journal(journal) as j:
        for path, after in ((done_file, new_done), (redo_file, km.rewrap(old[redo_file]))):
            j.record(Entry(str(path), "begin", file_digest(path) if path == redo_file else
                           _sha(old[path]), _sha(after)), sync=True)
    with open(journal, "ab") as raw:
        raw.write(b'{"path": "/torn')  # a torn last line is cut off
    summary = bulk_rewrap.run(km.rewrapper(), [tmp_path], journal=journal)
    assert summary.counts["rewrapped"] == 2 and summary.resumed == 1
    assert done_file.read_bytes() == new_done
    assert check_journal(journal) == []
    with pytest.raises(keymgr.errors.ConfigurationError, match="in use"), Journal(journal), Journal(journal):
        pass


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@pytest.mark.slow
def test_cli_json_jobs_and_exit_code(softhsm: TokenUnderTest, km: keymgr.KeyManager, key_name: str,
                                     tmp_path: Path) -> None:
    km.create_key(key_name)
    plain = _tree(km, tmp_path, key_name, count=9)
    km.rotate(key_name)
    runner = CliRunner()
    result = runner.invoke(cli, ["--token", softhsm.uri(), "rewrap", str(tmp_path), "--jobs", "2", "--json",
                                 "--journal", str(tmp_path.parent / f"{tmp_path.name}.j")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["rewrapped"], report["current"], report["skipped"], report["failed"]) == (9, 0, 2, 0)
    v2 = _primary_id(km, key_name)
    for path, data in plain.items():
        assert inspect_file(path).kek_ids == (v2,) and _decrypts(km, path, data)  # type: ignore[union-attr]
    (tmp_path / "bad.cms").write_bytes(next(iter(plain)).read_bytes()[:40])
    human = runner.invoke(cli, ["--token", softhsm.uri(), "rewrap", str(tmp_path), "--progress"],
                          catch_exceptions=False)
    assert human.exit_code == 1
    assert "already current" in human.output and "failed:" in human.output and "bad.cms" in human.output


def test_cli_allow_compromised_for_recovery(softhsm: TokenUnderTest, km: keymgr.KeyManager, key_name: str,
                                            tmp_path: Path) -> None:
    km.create_key(key_name)
    path = tmp_path / "m.cms"
    path.write_bytes(km.encrypt(b"recover me", key=key_name))
    km.rotate(key_name)
    km.mark_compromised(key_name, 1)
    runner = CliRunner()
    refused = runner.invoke(cli, ["--token", softhsm.uri(), "rewrap", str(tmp_path), "--json"])
    assert refused.exit_code == 1 and "compromised" in json.loads(refused.output)["failures"][0]["reason"]
    allowed = runner.invoke(cli, ["--token", softhsm.uri(), "rewrap", str(tmp_path), "--json", "--allow-compromised"])
    assert allowed.exit_code == 0 and json.loads(allowed.output)["rewrapped"] == 1
    assert inspect_file(path).kek_ids == (_primary_id(km, key_name),)  # type: ignore[union-attr]
    assert km.decrypt(path.read_bytes()) == b"recover me"


@pytest.mark.slow
def test_other_tokens_envelopes_are_skipped_and_paths_deduplicated(km: keymgr.KeyManager, key_name: str,
                                                                   tmp_path: Path) -> None:
    from tests.conftest import softhsm_token

    km.create_key(key_name)
    with keymgr.KeyManager(softhsm_token("keymgr-B").uri()) as other:
        other.create_key(key_name + "-b")
        foreign = tmp_path / "foreign.cms"
        foreign.write_bytes(other.encrypt(b"not ours", key=key_name + "-b"))
    ours = tmp_path / "ours.cms"
    ours.write_bytes(km.encrypt(b"ours", key=key_name))
    km.rotate(key_name)
    original = foreign.read_bytes()
    summary = bulk_rewrap.run(km.rewrapper(), [tmp_path, ours, tmp_path / "." / "ours.cms"])
    assert summary.counts == {"rewrapped": 1, "current": 0, "skipped": 1, "failed": 0}
    assert "no recipient is a key of this token" in summary.skipped[0].reason
    assert foreign.read_bytes() == original
    with pytest.raises(keymgr.errors.RecipientNotFoundError):
        km.rewrap(original)


def test_symbolic_links(km: keymgr.KeyManager, key_name: str, tmp_path: Path) -> None:
    """A link named on the command line is followed (find -H); links below it are reported, not followed."""
    km.create_key(key_name)
    tree, outside = tmp_path / "tree", tmp_path / "outside"
    tree.mkdir()
    outside.mkdir()
    (tree / "in.cms").write_bytes(km.encrypt(b"in", key=key_name))
    (outside / "out.cms").write_bytes(km.encrypt(b"out", key=key_name))
    (tree / "file-link.cms").symlink_to(outside / "out.cms")
    (tree / "dir-link").symlink_to(outside)
    top = tmp_path / "top-link"
    top.symlink_to(tree)
    km.rotate(key_name)
    untouched = (outside / "out.cms").read_bytes()
    summary = bulk_rewrap.run(km.rewrapper(), [top])
    assert summary.counts == {"rewrapped": 1, "current": 0, "skipped": 2, "failed": 0}
    assert {Path(s.path).name for s in summary.skipped} == {"file-link.cms", "dir-link"}
    assert all("symbolic link" in s.reason for s in summary.skipped)
    assert (outside / "out.cms").read_bytes() == untouched and (tree / "file-link.cms").is_symlink()
    assert inspect_file(tree / "in.cms").kek_ids == (_primary_id(km, key_name),)  # type: ignore[union-attr]


def test_file_changed_during_rewrap_and_hard_links_are_refused(km: keymgr.KeyManager, key_name: str,
                                                               tmp_path: Path) -> None:
    from keymgr.rewrap.file import FileRewrapper
    from keymgr.rewrap.message import Rewrapper, RewrapResult

    km.create_key(key_name)
    target, linked = tmp_path / "busy.cms", tmp_path / "linked.cms"
    target.write_bytes(km.encrypt(b"busy", key=key_name))
    linked.write_bytes(km.encrypt(b"linked", key=key_name))
    os.link(linked, tmp_path / "second-name.cms")
    km.rotate(key_name)
    meddled = b"written by someone else meanwhile"

    class Meddling(Rewrapper):
        def message(self, blob: bytes) -> RewrapResult:
            result = super().message(blob)
            target.write_bytes(meddled)  # another writer, between our read and our rename
            return result

    outcome = FileRewrapper(Meddling(km._protector), None, dry_run=False).process(str(target))  # noqa: SLF001
    assert outcome.status == "failed" and "changed while it was being rewrapped" in outcome.reason
    assert target.read_bytes() == meddled and not list(tmp_path.glob(".*.tmp"))
    before = linked.read_bytes()
    summary = bulk_rewrap.run(km.rewrapper(), [linked])
    assert summary.counts["failed"] == 1 and "hard links" in summary.failures[0].reason
    assert linked.read_bytes() == before and os.stat(linked).st_nlink == 2
