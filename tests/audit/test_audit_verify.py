"""keymgr.audit.verify_log on real SoftHSM logs: an honest log passes; every kind of tampering
is detected, with the first broken entry named (with the token) or bounded (chain only)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from keymgr import errors
from keymgr.audit import AuditLog, verify_log
from keymgr.audit._token import AuditKey
from keymgr.hsm import TokenSession, open_token
from tests.audit_helpers import ENTRIES, deleted, edited, honest_log, inserted, swapped, truncated, write_lines
from tests.conftest import TokenUnderTest, softhsm_token


@pytest.fixture
def ts(softhsm: TokenUnderTest) -> TokenSession:
    return open_token(softhsm.uri())


def test_honest_log_verifies(tmp_path: Path, ts: TokenSession) -> None:
    path = tmp_path / "a.log"
    honest_log(path, ts)
    report = verify_log(path, token=ts)
    assert report.ok, report.broken
    assert (report.entries, report.last_seq, report.macs_checked) == (ENTRIES, ENTRIES, True)
    assert report.checkpoint is not None and report.checkpoint[0] == ENTRIES
    assert report.unmaced == [] and report.after_checkpoint == 0
    assert verify_log(path).ok  # the chain alone, without the token


# (tamper, expected (line, seq) with the token, expected line with the chain alone (None: undetected))
CASES = {
    "edited": (lambda lines: edited(lines, 3), (4, 4), 5, "MAC does not verify"),
    "deleted": (lambda lines: deleted(lines, 3), (4, 5), 4, "seq 5 where seq 4 was expected"),
    "swapped": (lambda lines: swapped(lines, 3), (4, 5), 4, "seq 5 where seq 4 was expected"),
    "inserted": (lambda lines: inserted(lines, 3), (4, 4), 5, "MAC does not verify"),
    "truncated": (lambda lines: truncated(lines, 2), (7, 7), None, "cut off"),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_tampering_is_detected_and_located(tmp_path: Path, ts: TokenSession, kind: str) -> None:
    tamper, (line, seq), chain_line, reason = CASES[kind]
    path = tmp_path / "a.log"
    write_lines(path, tamper(honest_log(path, ts)))
    report = verify_log(path, token=ts)
    assert not report.ok
    assert (report.broken.line, report.broken.seq) == (line, seq), report.broken
    assert reason in report.broken.reason
    chain_only = verify_log(path)
    if chain_line is None:
        assert chain_only.ok  # a cut-off tail needs the token's checkpoint
    else:
        assert not chain_only.ok and chain_only.broken.line == chain_line, chain_only.broken


def test_forged_line_without_mac_is_named_as_the_intruder(tmp_path: Path, ts: TokenSession) -> None:
    path = tmp_path / "a.log"
    write_lines(path, inserted(honest_log(path, ts), 3, mac=None))
    report = verify_log(path, token=ts)
    assert (report.broken.line, report.broken.seq) == (4, 4)
    assert "carries no MAC" in report.broken.reason


def test_unmaced_tail_is_reported_not_trusted(tmp_path: Path, ts: TokenSession) -> None:
    path = tmp_path / "a.log"
    lines = honest_log(path, ts)
    write_lines(path, inserted(lines, len(lines), mac=None))  # appended at the end: fits the chain
    report = verify_log(path, token=ts)
    assert report.ok and report.unauthenticated_tail == [ENTRIES + 1] and report.after_checkpoint == 1


def test_replaced_checkpointed_entry_is_detected(tmp_path: Path, ts: TokenSession) -> None:
    """Cut the last entry and append one with the same seq, chained but unMACed: the checkpoint's hash differs."""
    path = tmp_path / "a.log"
    lines = truncated(honest_log(path, ts), 1)
    write_lines(path, inserted(lines, len(lines), mac=None))
    report = verify_log(path, token=ts)
    assert (report.broken.line, report.broken.seq) == (ENTRIES, ENTRIES)
    assert "checkpointed" in report.broken.reason


def test_non_canonical_and_garbage_lines(tmp_path: Path, ts: TokenSession) -> None:
    path = tmp_path / "a.log"
    lines = honest_log(path, ts)
    spaced = json.dumps(json.loads(lines[2]), indent=None).encode()  # same content, other whitespace
    write_lines(path, lines[:2] + [spaced] + lines[3:])
    assert (verify_log(path).broken.line, "canonical" in verify_log(path).broken.reason) == (3, True)
    write_lines(path, lines[:5] + [b"{not json"] + lines[5:])
    assert verify_log(path, token=ts).broken.line == 6


def test_beginning_removed(tmp_path: Path, ts: TokenSession) -> None:
    path = tmp_path / "a.log"
    write_lines(path, honest_log(path, ts)[2:])
    report = verify_log(path, token=ts)
    assert (report.broken.line, report.broken.seq) == (1, 3)


def test_torn_last_line_is_a_note_and_the_next_append_repairs_it(tmp_path: Path, ts: TokenSession) -> None:
    path = tmp_path / "a.log"
    lines = honest_log(path, ts)
    with path.open("ab") as handle:
        handle.write(lines[-1][:40])  # a write cut short by a crash
    report = verify_log(path, token=ts)
    assert report.ok and report.torn_tail
    with AuditLog(path, token=ts, aggregate=()) as log:
        log.record("create", key="after-crash")
    rows = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert [r["op"] for r in rows[-2:]] == ["audit-repair", "create"]
    assert rows[-2]["detail"] == {"dropped_bytes": 40}
    assert verify_log(path, token=ts).ok


def test_deleted_log_leaves_an_orphan_checkpoint(tmp_path: Path, ts: TokenSession) -> None:
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    honest_log(first, ts, 2)
    chain = verify_log(first).chain
    honest_log(second, ts, 2)
    report = verify_log(second, token=ts)
    assert report.ok and report.other_chains.get(chain) == 2


def _only_chains(monkeypatch: pytest.MonkeyPatch, chains: set[str | None]) -> None:
    """Let the token show only ``chains`` (its checkpoints and log registrations): a token that
    serves this one log, although the shared test token holds every test's chains."""
    checkpoints, logs = AuditKey.checkpoints, AuditKey.logs
    monkeypatch.setattr(AuditKey, "checkpoints", lambda key: {c: p for c, p in checkpoints(key).items() if c in chains})
    monkeypatch.setattr(AuditKey, "logs", lambda key: [reg for reg in logs(key) if reg.chain in chains])


def test_sole_log_replaced_by_a_new_chain_is_detected(tmp_path: Path, softhsm: TokenUnderTest,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """On a token that serves one log only, a deleted or replaced log is not continued: the next
    writer is refused and appends nothing. A replacement written through another token fails
    verification, and once the log is deliberately started again (`keymgr audit repair`), the old
    chain's checkpoint still shows, with ``sole``, that the log was deleted or replaced."""
    from click.testing import CliRunner

    from keymgr.cli import cli

    path = tmp_path / "a.log"
    ts = open_token(softhsm.uri())
    honest_log(path, ts, 3)
    old_chain = verify_log(path).chain
    path.unlink()
    with pytest.raises(errors.IntegrityError, match="deleted, emptied or replaced"):
        honest_log(path, ts, 2)
    assert not path.exists() or path.stat().st_size == 0
    other = softhsm_token("keymgr-B")
    honest_log(tmp_path / "b.log", open_token(other.uri()), 2)
    shutil.copy(tmp_path / "b.log", path)  # a log of another token put in its place
    with pytest.raises(errors.IntegrityError, match="another token"):
        honest_log(path, ts, 2)
    report = verify_log(path, token=ts, sole=True)
    assert not report.ok and report.broken.line == 1 and "MAC does not verify" in report.broken.reason
    result = CliRunner().invoke(cli, ["--token", softhsm.uri(), "audit", "repair", str(path), "--yes"])
    assert result.exit_code == 0, result.output
    honest_log(path, ts, 2)  # the new chain: the repair entry, then these
    new_chain = verify_log(path).chain
    assert new_chain not in (None, old_chain)
    _only_chains(monkeypatch, {old_chain, new_chain})
    report = verify_log(path, token=ts, sole=True)
    assert not report.ok and report.broken.line == 1 and "deleted or replaced" in report.broken.reason
    assert f"chain {old_chain} up to seq 3" in report.broken.reason
    assert report.other_chains == {old_chain: 3}
    assert verify_log(path, token=ts).ok  # shared: only listed


@pytest.mark.parametrize("replacement", ["emptied", "by-hand"])
def test_sole_log_replaced_without_keymgr_is_detected(tmp_path: Path, softhsm: TokenUnderTest,
                                                      monkeypatch: pytest.MonkeyPatch, replacement: str) -> None:
    """A sole log deleted (left empty) or replaced by hand with a chain the token never saw, with
    no writer to refuse: verify ``sole`` must still report it (docs/audit.md, verify rule 6)."""
    path = tmp_path / "a.log"
    ts = open_token(softhsm.uri())
    honest_log(path, ts, 3)
    old_chain = verify_log(path).chain
    path.write_bytes(b"")
    if replacement == "by-hand":
        with AuditLog(path, aggregate=()) as log:  # no token: the editor has no PIN
            log.record("create", key="orders", version=1)
    _only_chains(monkeypatch, {old_chain, verify_log(path).chain})
    report = verify_log(path, token=ts, sole=True)
    assert not report.ok and "deleted or replaced" in report.broken.reason
    assert f"chain {old_chain} up to seq 3" in report.broken.reason


@pytest.mark.requires("data-objects")
def test_every_token_kind_keeps_a_verifiable_log(tmp_path: Path, token: TokenUnderTest) -> None:
    """SoftHSM MACs every entry; the TPM holds no HMAC key (RSA / EC only), so its entries are
    unMACed but the checkpoint it keeps still fixes the chain: a cut-off tail and an edit
    before the checkpoint are caught on both."""
    ts = open_token(token.uri())
    path = tmp_path / "a.log"
    lines = honest_log(path, ts, 4)
    report = verify_log(path, token=ts)
    assert report.ok and report.checkpoint[0] == 4 and report.unauthenticated_tail == []
    maced = token.kind == "softhsm"
    assert report.unmaced == ([] if maced else [1, 2, 3, 4])
    write_lines(path, truncated(lines, 1))
    assert "cut off" in verify_log(path, token=ts).broken.reason
    write_lines(path, edited(lines, 3))
    assert verify_log(path, token=ts).broken.line == 4


@pytest.mark.slow
def test_any_byte_changed_is_named_exactly_with_the_token(tmp_path: Path, ts: TokenSession) -> None:
    """Property: change any one byte of any line (to anything but a newline) and verify names that
    line, whichever field it lands in (parse, canonical form, chain, MAC or checkpoint)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    path = tmp_path / "a.log"
    lines = honest_log(path, ts)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.data())
    def check(data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(lines) - 1))
        position = data.draw(st.integers(0, len(lines[index]) - 1))
        value = data.draw(st.integers(0, 255).filter(lambda b: b not in (lines[index][position], 0x0A)))
        line = bytearray(lines[index])
        line[position] = value
        write_lines(path, lines[:index] + [bytes(line)] + lines[index + 1:])
        report = verify_log(path, token=ts)
        assert not report.ok and report.broken.line == index + 1, (index, position, value, report.broken)

    check()


def test_repair_log_starts_a_cut_log_again_on_the_record(tmp_path: Path, ts: TokenSession) -> None:
    """keymgr.audit.repair_log (what ``keymgr audit repair`` calls): a log that verifies is refused
    and left alone; a declined confirmation changes nothing; a cut log is kept beside the new one,
    whose first entry, MACed, names the old chain and where it ended."""
    from keymgr.audit import read_entries, repair_log

    path = tmp_path / "a.log"
    honest_log(path, ts, 4)
    with pytest.raises(errors.PolicyError, match="nothing to repair"):
        repair_log(path, ts, confirm=lambda damage: pytest.fail("asked about a log that verifies"))
    old_chain, lines = verify_log(path).chain, path.read_bytes().splitlines()
    write_lines(path, lines[:2])  # the tail the token checkpointed is cut off
    before = path.read_bytes()
    with pytest.raises(errors.PolicyError, match="not confirmed; nothing was changed"):
        repair_log(path, ts, confirm=lambda damage: False)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.log"]
    repair = repair_log(path, ts)
    assert repair.path == path and repair.moved_to is not None and repair.moved_to.read_bytes() == before
    assert not verify_log(repair.moved_to, token=ts).ok  # the loss stays visible
    report = verify_log(path, token=ts)
    assert report.ok and old_chain in report.acknowledged
    ((_, first),) = list(read_entries(path))
    assert first.op == "audit-repair" and first.mac is not None
    assert first.detail == {"moved_to": repair.moved_to.name, "previous_chain": old_chain, "previous_last_seq": 2,
                            "checkpoint_seq": 4, "broken_line": 3,
                            "broken_reason": "the log ends at seq 2 but the token's checkpoint is seq 4: entries 3..4 "
                                             "were cut off (truncated)"}
