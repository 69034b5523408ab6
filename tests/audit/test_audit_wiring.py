"""Every lifecycle operation of KeyManager leaves its entry.

(keymgr.lifecycle.rotation, keymgr.lifecycle.shred, keymgr.rewrap.message.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import keymgr
from keymgr import errors
from keymgr.audit import verify_log
from keymgr.hsm import open_token
from tests.conftest import TokenUnderTest


def _rows(path: Path) -> list[tuple[str, str | None, int | None, str]]:
    return [(r["op"], r["key"], r["version"], r["outcome"])
            for r in map(json.loads, path.read_text().splitlines())]


@pytest.mark.slow
def test_lifecycle_operations_are_recorded(tmp_path: Path, softhsm: TokenUnderTest, key_name: str) -> None:
    path = tmp_path / "audit.log"
    with keymgr.KeyManager(softhsm.uri(), audit=path) as km:
        km.create_key(key_name)
        old = km.encrypt(b"data", key=key_name)
        km.rotate(key_name)
        km.rotate(key_name, activate=False)
        km.activate(key_name, 3)
        km.suspend(key_name, 2)
        km.resume(key_name, 2)
        assert km.rewrap(old) != old
        km.mark_compromised(key_name, 1)
        km.retire(key_name, below=2, immediately=True)
        with pytest.raises(errors.PolicyError):
            km.destroy(key_name, 3, confirmed=True, immediately=True)  # the primary is never destroyed: refused
        km.destroy(key_name, 1, confirmed=True, immediately=True)
    rows = [r for r in _rows(path) if r[0] not in ("encrypt",)]
    # each state change writes an intent entry before it acts (a rotation's new version is not
    # known yet), then its outcome; the aggregated rewrap count comes at the close
    assert rows == [
        ("create", key_name, 1, "intent"), ("create", key_name, 1, "ok"),
        ("rotate", key_name, None, "intent"), ("rotate", key_name, 2, "ok"),
        ("rotate", key_name, None, "intent"), ("rotate", key_name, 3, "ok"),
        ("activate", key_name, 3, "intent"), ("activate", key_name, 3, "ok"),
        ("suspend", key_name, 2, "intent"), ("suspend", key_name, 2, "ok"),
        ("resume", key_name, 2, "intent"), ("resume", key_name, 2, "ok"),
        ("compromise", key_name, 1, "intent"), ("compromise", key_name, 1, "ok"),
        ("retire", key_name, None, "intent"), ("retire", key_name, None, "ok"),
        ("destroy", key_name, 3, "intent"), ("destroy", key_name, 3, "refused"),
        ("destroy", key_name, 1, "intent"), ("destroy", key_name, 1, "ok"),
        ("rewrap", key_name, 1, "ok")]
    assert verify_log(path, token=open_token(softhsm.uri())).ok


def test_bulk_rewrap_through_the_cli_is_one_entry(tmp_path: Path, softhsm: TokenUnderTest, key_name: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from keymgr.cli import cli

    data = tmp_path / "data"
    data.mkdir()
    with keymgr.KeyManager(softhsm.uri(), audit=False) as km:
        km.create_key(key_name)
        for i in range(3):
            (data / f"f{i}.cms").write_bytes(km.encrypt(b"x", key=key_name))
        km.rotate(key_name)
    path = tmp_path / "audit.log"
    monkeypatch.setenv("KEYMGR_AUDIT_LOG", str(path))  # the CLI's manager logs here
    result = CliRunner().invoke(cli, ["--token", softhsm.uri(), "rewrap", str(data), "--json"])
    assert result.exit_code == 0, result.stderr
    (row,) = map(json.loads, path.read_text().splitlines())
    assert (row["op"], row["outcome"], row["detail"]["rewrapped"]) == ("rewrap-bulk", "ok", 3)


def test_standalone_operation_goes_to_the_default_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A custodian's approval (keymgr approve) is made on their own token, with no KeyManager."""
    from keymgr.audit import standalone_operation

    monkeypatch.setenv("KEYMGR_AUDIT_LOG", str(tmp_path / "audit.log"))
    with standalone_operation("approve", local=False, key="orders", detail={"custodian": "alice"}):
        pass
    with pytest.raises(errors.PolicyError), standalone_operation("approve", local=False, key="orders"):
        raise errors.PolicyError("not approved")
    rows = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [(r["op"], r["outcome"], r["mac"], r["detail"]) for r in rows] == [
        ("approve", "ok", None, {"custodian": "alice"}), ("approve", "refused", None, {"why": "not approved"})]
    monkeypatch.setenv("KEYMGR_AUDIT_LOG", "off")
    with standalone_operation("approve", local=True) as op:
        assert op is None
