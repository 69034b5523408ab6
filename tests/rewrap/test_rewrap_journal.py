"""keymgr.rewrap.journal: the format, torn lines, edits, the lock, and the consistency check (no token)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from keymgr.errors import ConfigurationError, FormatError
from keymgr.rewrap.journal import HEADER, Entry, Journal, check_journal, file_digest, read_entries


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_round_trip_and_previous_entries(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with Journal(path) as journal:
        assert not journal.resumed and journal.previous == {}
        journal.record(Entry("/a", "begin", "00", "11"), sync=True)
        journal.record(Entry("/a", "done", "00", "11"))
        journal.record(Entry("/b", "skipped", reason="not a keymgr envelope"))
    assert path.read_text().splitlines()[0] == '{"keymgr": "rewrap-journal", "version": 1}' and HEADER["version"] == 1
    with Journal(path) as again:
        assert again.resumed
        assert again.previous == {"/a": Entry("/a", "done", "00", "11"),
                                  "/b": Entry("/b", "skipped", reason="not a keymgr envelope")}
    assert [e.state for e in read_entries(path)] == ["begin", "done", "skipped"]


@pytest.mark.parametrize("torn", [b'{"path": "/c", "sta', b"{", b'{"path": "/c", "state": "done"}'])
def test_torn_last_line_is_cut_off(tmp_path: Path, torn: bytes) -> None:
    path = tmp_path / "j"
    with Journal(path) as journal:
        journal.record(Entry("/a", "current"))
    whole = path.read_bytes()
    path.write_bytes(whole + torn)  # no newline: a write cut short
    with Journal(path) as journal:
        assert list(journal.previous) == ["/a"]
        journal.record(Entry("/b", "current"))
    assert path.read_bytes() == whole + Entry("/b", "current").line()


@pytest.mark.parametrize("start", [b"", b'{"keym', b'{"keymgr": "rewrap-journal", "version": 1}'])
def test_empty_or_torn_header_starts_over(tmp_path: Path, start: bytes) -> None:
    path = tmp_path / "j"
    path.write_bytes(start)
    with Journal(path) as journal:
        assert journal.previous == {}
    assert read_entries(path) == []


@pytest.mark.parametrize("content", [b"hello\n", b'{"keymgr": "rewrap-journal", "version": 1}\nnot json\n{}\n',
                                     b'{"keymgr": "rewrap-journal", "version": 1}\n{"path": "/a", "state": "x"}\n'])
def test_edited_or_foreign_files_are_refused_untouched(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "j"
    path.write_bytes(content)
    with pytest.raises(FormatError):
        Journal(path)
    assert path.read_bytes() == content


def test_one_run_at_a_time(tmp_path: Path) -> None:
    with Journal(tmp_path / "j"), pytest.raises(ConfigurationError, match="in use by another run"):
        Journal(tmp_path / "j")
    Journal(tmp_path / "j").close()  # released


def test_check_journal_finds_each_inconsistency(tmp_path: Path) -> None:
    good, changed, pending = tmp_path / "good", tmp_path / "changed", tmp_path / "pending"
    good.write_bytes(b"new")
    changed.write_bytes(b"edited later")
    pending.write_bytes(b"old")
    path = tmp_path / "j"
    with Journal(path) as journal:
        for entry in (Entry(str(good), "begin", _sha(b"old"), _sha(b"new")),
                      Entry(str(good), "done", _sha(b"old"), _sha(b"new")),
                      Entry(str(changed), "begin", _sha(b"old"), _sha(b"new")),
                      Entry(str(changed), "done", _sha(b"old"), _sha(b"new")),
                      Entry(str(pending), "begin", _sha(b"old"), _sha(b"new")),
                      Entry("/orphan-done", "done", "aa", "bb"),
                      Entry("/failed", "failed", reason="retired")):
            journal.record(entry)
    problems = check_journal(path)
    assert sorted(problems) == sorted([
        f"{changed}: does not hold the bytes its done entry names",
        f"{pending}: ends at begin",
        "/orphan-done: done without its begin",
        "/orphan-done: does not hold the bytes its done entry names",
        "/failed: ends at failed",
    ])
    assert check_journal(path, finished=False) == ["/orphan-done: done without its begin"]
    assert file_digest(good) == _sha(b"new")
