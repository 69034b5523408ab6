"""Crypto-shredding (keymgr.lifecycle.shred).

The remaining-data check, the quorum gate, the object gone from the token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import keymgr
from keymgr import errors
from keymgr.cli import cli
from keymgr.hsm import objects
from keymgr.lifecycle import rotation
from tests._internals import clocked, keyring_of, token_of
from tests.conftest import softhsm_token
from tests.custody_helpers import guarded_key, hsm, object_handles, party


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _rotated_with_data(km, name: str, tmp_path: Path) -> tuple[bytes, bytes]:
    """Key ``name`` with v1 and v2 (primary), one message under each written to tmp_path."""
    km.create_key(name)
    old = km.encrypt(b"under v1", key=name)
    km.rotate(name)
    new = km.encrypt(b"under v2", key=name)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "old.cms").write_bytes(old)
    (tmp_path / "data" / "sub").mkdir()
    (tmp_path / "data" / "sub" / "new.cms").write_bytes(new)
    (tmp_path / "data" / "notes.txt").write_bytes(b"not an envelope")
    return old, new


@pytest.mark.slow
def test_destroy_refuses_while_envelopes_need_the_version_then_shreds(km, key_name: str, tmp_path: Path) -> None:
    old, new = _rotated_with_data(km, key_name, tmp_path)
    v1 = km.describe_key(key_name).version(1)
    with pytest.raises(keymgr.PolicyError, match=r"1 envelope\(s\) under the given paths still need"):
        km.destroy(key_name, 1, paths=[tmp_path / "data"], confirmed=True, immediately=True)
    assert objects.key_exists(token_of(km), v1.key_id)
    with pytest.raises(keymgr.PolicyError, match="confirm it explicitly"):
        km.destroy(key_name, 1, immediately=True)
    # rewrapping old.cms would clear the way; here it is removed, as an operator might
    (tmp_path / "data" / "old.cms").unlink()
    result = km.destroy(key_name, 1, paths=[tmp_path / "data"], confirmed=True, immediately=True)
    assert result.scan is not None and result.scan.envelopes == 1 and result.scan.needing == ()
    assert result.record.version(1).state == "destroyed"
    assert [s for s, _ in result.record.version(1).history][-1] == "destroyed"
    assert not objects.key_exists(token_of(km), v1.key_id)
    with pytest.raises(keymgr.PolicyError, match="destroyed"):
        km.decrypt(old)
    assert km.decrypt(new) == b"under v2"
    with pytest.raises(keymgr.PolicyError, match="already destroyed"):
        km.destroy(key_name, 1, confirmed=True, immediately=True)


@pytest.mark.slow
def test_force_destroys_despite_remaining_data(km, key_name: str, tmp_path: Path) -> None:
    old, _ = _rotated_with_data(km, key_name, tmp_path)
    result = km.destroy(key_name, 1, paths=[tmp_path / "data"], confirmed=True, force=True, immediately=True)
    assert result.scan is not None and len(result.scan.needing) == 1
    with pytest.raises(keymgr.PolicyError, match="destroyed"):
        km.decrypt(old)


@pytest.mark.slow
@pytest.mark.parametrize("hidden", ["linked directory", "linked file", "fifo", "link loop"])
def test_what_the_scan_cannot_check_refuses_the_destroy(km, key_name: str, tmp_path: Path, hidden: str) -> None:
    """An envelope behind a symbolic link (not followed) or a file that cannot be read as one
    must not let a destroy through unnoticed: the scan lists it as unchecked, and only --force
    goes on. A FIFO is listed, not opened (opening it would block)."""
    import os

    old, _ = _rotated_with_data(km, key_name, tmp_path)
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (data / "old.cms").rename(elsewhere / "old.cms")  # the one envelope that needs v1, out of the tree
    strange = data / "strange"
    if hidden == "linked directory":
        strange.symlink_to(elsewhere, target_is_directory=True)
    elif hidden == "linked file":
        strange.symlink_to(elsewhere / "old.cms")
    elif hidden == "fifo":
        os.mkfifo(strange)
    else:
        strange.symlink_to(strange)
    with pytest.raises(keymgr.PolicyError, match=r"1 file\(s\) could not be checked"):
        km.destroy(key_name, 1, paths=[data], confirmed=True, immediately=True)
    assert km.decrypt(old) == b"under v1"
    result = km.destroy(key_name, 1, paths=[data], confirmed=True, force=True, immediately=True)
    assert result.scan is not None and result.scan.unreadable == (str(strange),)
    assert result.record.version(1).state == "destroyed"


@pytest.mark.slow
def test_primary_and_active_versions_cannot_be_destroyed(km, key_name: str) -> None:
    km.create_key(key_name)
    with pytest.raises(keymgr.PolicyError, match="active"):
        km.destroy(key_name, 1, confirmed=True, immediately=True)
    km.rotate(key_name, activate=False)
    # a pre-active version may go
    assert km.destroy(key_name, 2, confirmed=True, immediately=True).record.version(2).state == "destroyed"
    assert km.describe_key(key_name).primary == 1


@pytest.mark.slow
def test_destroyed_object_is_gone_from_the_token_as_pkcs11_sees_it(key_name: str) -> None:
    km = hsm()
    km.create_key(key_name)
    km.rotate(key_name)
    key_id = km.describe_key(key_name).version(1).key_id
    assert any(kid == key_id for _, kid, _ in object_handles("keymgr-A"))
    km.mark_compromised(key_name, 1)
    km.destroy(key_name, 1, confirmed=True, immediately=True)
    assert not any(kid == key_id or label == f"{key_name}/v1" for _, kid, label in object_handles("keymgr-A"))


@pytest.mark.slow
def test_a_destroy_that_crashed_after_its_commit_is_finished_later(km, key_name: str) -> None:
    """Record says destroyed, object still there (the crash window, or a fact forged by a PIN
    holder: keymgr cannot tell which): orphans() sees it, a rotation's sweep leaves it (facts
    alone never destroy a key), key verify names it, and destroy finishes it with every check a
    destroy takes (here: the confirmation)."""
    km.create_key(key_name)
    km.rotate(key_name)
    key_id = km.describe_key(key_name).version(1).key_id
    record = rotation.record_destroyed(keyring_of(km), key_name, 1)  # step one only
    assert (f"{key_name}/v1", key_id) in rotation.orphans(keyring_of(km), record)
    km.rotate(key_name)
    assert objects.key_exists(token_of(km), key_id)
    [check] = [c for c in km.verify_keys(key_name) if c.version == 1]
    assert "destroyed, but its key object is still on the token" in check.verdict
    with pytest.raises(errors.PolicyError, match="confirm"):
        km.destroy(key_name, 1, immediately=True)
    assert objects.key_exists(token_of(km), key_id)
    km.destroy(key_name, 1, immediately=True, confirmed=True)
    assert not objects.key_exists(token_of(km), key_id)
    assert rotation.orphans(keyring_of(km), km.describe_key(key_name)) == []


@pytest.mark.slow
def test_cli_destroy_needs_two_distinct_custodians(key_name: str, tmp_path: Path) -> None:
    """Issue 5: one approval refused; the same approval twice counts once; two custodians proceed."""
    km = hsm()
    guarded_key(km, key_name)
    km.rotate(key_name)
    key_id = km.describe_key(key_name).version(1).key_id
    token = ["--token", softhsm_token("keymgr-A").uri()]
    req = tmp_path / "destroy.req"
    code, _, err = run(*token, "request", "destroy", key_name, "--version", "1", "-o", str(req))
    assert code == 0, err
    files = {}
    for n in (1, 3):
        p = party(n)
        files[n] = tmp_path / f"{n}.approval"
        code, _, err = run("approve", str(req), "--custodian", p.name, "--token", p.uri(), "--key-label",
                           p.key_label, "--yes", "-o", str(files[n]))
        assert code == 0, err
    base = [*token, "key", "destroy", key_name, "--version", "1", "--immediately", "--yes", "--request", str(req)]
    code, _, err = run(*base, "--approval", str(files[1]))
    assert code == 5 and "valid distinct approvals: 1" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(*base, "--approval", str(files[1]), "--approval", str(files[1]))
    assert code == 5 and "valid distinct approvals: 1" in err
    code, _, err = run(*[a for a in base if a not in ("--request", str(req))], "--yes")
    assert code == 5 and "needs approvals" in err  # --yes is no substitute for the quorum
    assert objects.key_exists(token_of(km), key_id)
    unconfirmed = [a for a in base if a != "--yes"]  # a quorum approved, but no --paths checked and no terminal
    code, _, err = run(*unconfirmed, "--approval", str(files[1]), "--approval", str(files[3]))
    assert code == 5 and "nothing was checked" in err and "--yes" in err
    assert objects.key_exists(token_of(km), key_id)  # and the request is not spent
    transcript = tmp_path / "destroy.p7s"
    code, out, err = run("--json", *base, "--approval", str(files[1]), "--approval", str(files[3]),
                         "--transcript", str(transcript))
    assert code == 0, err
    shown = json.loads(out)
    assert shown["versions"][0]["state"] == "destroyed"
    assert set(shown["destroyed"]["approvers"]) == {party(1).name, party(3).name}
    assert not objects.key_exists(token_of(km), key_id)
    code, out, err = run(*token, "--json", "transcript", "verify", str(transcript))
    assert code == 0, err
    doc = json.loads(out)["transcript"]
    assert doc["ceremony"] == "destroy" and doc["outcome"] == "success"
    assert [(k["name"], k["version"], k["id"]) for k in doc["keys"]] == [(key_name, 1, key_id.hex())]
    code, _, err = run(*base, "--approval", str(files[1]), "--approval", str(files[3]))
    assert code == 5 and len(err.strip().splitlines()) == 1  # spent: the request works once


@pytest.mark.slow
def test_cli_destroy_reports_remaining_envelopes(softhsm, key_name: str, tmp_path: Path) -> None:
    with keymgr.KeyManager(softhsm.uri()) as km:
        _rotated_with_data(km, key_name, tmp_path)
    token = ["--token", softhsm.uri()]
    code, _, err = run(*token, "key", "destroy", key_name, "--version", "1", "--immediately",
                         "--paths", str(tmp_path / "data"),
                       "--yes")
    assert code == 5 and "1 envelope(s)" in err and "--force" in err
    code, out, err = run(*token, "key", "destroy", key_name, "--version", "1", "--immediately",
                         "--paths", str(tmp_path / "data"),
                         "--yes", "--force")
    assert code == 0, err
    assert "version 1 destroyed; 1 of 2 envelope(s) scanned needed it" in out


@pytest.mark.slow
def test_a_version_just_superseded_is_not_destroyed_while_other_hosts_may_use_it(softhsm, key_name: str) -> None:
    """Other hosts see a rotation only at their next refresh and may encrypt under the old primary
    until then: destroying it at once would make what they wrote unreadable. Refused until
    keymgr.lifecycle.shred.SETTLE has passed on the keyring's clock (or with immediately=True)."""
    from datetime import datetime, timedelta

    from keymgr.lifecycle import shred

    moment = [datetime(2026, 12, 6, 8, 0, 0)]

    def clock() -> str:
        return moment[0].strftime("%Y-%m-%dT%H:%M:%SZ")

    with clocked(keymgr.KeyManager(softhsm.uri(), audit=False), wall_clock=clock) as km:
        km.create_key(key_name)
        km.rotate(key_name, activate=False)  # v2 pre-active: never activated, may be activated any moment
        with pytest.raises(keymgr.PolicyError, match="version 2 was created at"):
            km.destroy(key_name, 2, confirmed=True)
        moment[0] += timedelta(minutes=3)
        km.rotate(key_name)
        with pytest.raises(keymgr.PolicyError, match=r"version 1 stopped being the primary at .*--immediately"):
            km.destroy(key_name, 1, confirmed=True)
        moment[0] += shred.SETTLE - timedelta(seconds=1)
        with pytest.raises(keymgr.PolicyError, match="stopped being the primary"):
            km.destroy(key_name, 1, confirmed=True)
        moment[0] += timedelta(seconds=1)
        assert km.destroy(key_name, 1, confirmed=True).record.version(1).state == "destroyed"
        assert km.destroy(key_name, 2, confirmed=True).record.version(2).state == "destroyed"
