"""Backup on HSM A to three custodians (2 of 3), restore on HSM B: the ceremony and its failures."""

from __future__ import annotations

import json
import uuid
from unittest.mock import ANY

import pytest

from keymgr import errors
from keymgr.custody.backup_file import BackupFile
from keymgr.custody.ceremony import BackupResult, backup_keys, restore_keys
from keymgr.custody.custodians import CustodyRegister
from keymgr.custody.transcript import verify_transcript
from keymgr.hsm import objects
from keymgr.hsm.pins import Pin
from keymgr.manager import KeyManager
from tests._internals import keyring_of, token_of
from tests.custody_helpers import approvals, guarded_key, hsm, object_handles, party, request, so_pin


def _backup(km: KeyManager, name: str, *numbers: int, versions: list[int] | None = None) -> BackupResult:
    req = request(km, "backup", name, versions=versions)
    return backup_keys(keyring_of(km), name, so_pin=Pin(so_pin()), request=req,
                       approvals=approvals(km, req, *numbers), versions=versions)


def _made() -> tuple[str, bytes, BackupResult]:
    a = hsm("keymgr-A")
    name = f"orders-{uuid.uuid4().hex[:8]}"
    guarded_key(a, name)
    blob = a.encrypt(b"card 4111 1111 1111 1111", key=name, context={"tenant": "acme"})
    return name, blob, _backup(a, name, 1, 2)


@pytest.fixture(scope="module")
def made() -> tuple[str, bytes, BackupResult]:
    """Key ``orders-*`` on A with data encrypted before the backup, and its 2-of-3 backup."""
    return _made()


@pytest.fixture(scope="module")
def spoiled() -> tuple[str, bytes, BackupResult]:
    """Another such key and backup, for restores that must fail (never restored anywhere)."""
    return _made()


def _tokens(backup: BackupFile, *numbers: int) -> list:
    return [party(n).open(backup.slot(party(n).name).custodian) for n in numbers]


def test_backup_file_names_custodians_quorum_and_keys(made: tuple[str, bytes, BackupResult]) -> None:
    name, _, result = made
    backup = BackupFile.parse(result.backup)
    assert backup.quorum.threshold == 2 and backup.quorum.custodians == tuple(party(n).name for n in (1, 2, 3))
    assert [k.record.name for k in backup.keys] == [name] and backup.source_token == "keymgr-A"
    doc = json.loads(result.backup)
    assert doc["quorum"] == {"threshold": 2, "custodians": list(backup.quorum.custodians)}
    assert b"card 4111" not in result.backup
    verified = verify_transcript(result.transcript)
    assert verified.document["ceremony"] == "backup" and verified.document["outcome"] == "success"
    assert {p["name"] for p in verified.document["participants"]} == {party(1).name, party(2).name}


def test_restore_on_b_by_custodians_1_and_3(made: tuple[str, bytes, BackupResult]) -> None:
    name, blob, result = made
    b = hsm("keymgr-B")
    before = object_handles("keymgr-B")
    backup = BackupFile.parse(result.backup)
    restored = restore_keys(backup, keyring_of(b), _tokens(backup, 1, 3))
    assert [r.name for r in restored.records] == [name]
    assert b.decrypt(blob, context={"tenant": "acme"}) == b"card 4111 1111 1111 1111"
    record = b.describe_key(name)
    a_record = hsm("keymgr-A").describe_key(name)
    assert [(v.key_id, v.kcv) for v in record.versions] == [(v.key_id, v.kcv) for v in a_record.versions]
    for v in record.versions:
        attrs = objects.key_attributes(token_of(b), v.key_id).attributes
        assert attrs["SENSITIVE"] is True and attrs["EXTRACTABLE"] is False and attrs["TOKEN"] is True
        assert attrs["LABEL"] == f"{name}/v{v.version}"
    new = object_handles("keymgr-B") - before
    assert {key_id for _, key_id, _ in new} >= {v.key_id for v in record.versions}
    assert not any(label == "keymgr/transport" for _, _, label in new), "the transport key must be gone"
    verified = verify_transcript(restored.transcript)
    assert {p["name"] for p in verified.document["participants"]} == {party(1).name, party(3).name}
    assert len(verified.signers) == 3  # HSM B and the two custodians' tokens
    register = CustodyRegister(keyring_of(b)).load()
    assert register.policy_for(name) == backup.quorum  # destroying on B needs the same quorum


@pytest.mark.parametrize("case", ["one-custodian", "tampered-share", "tampered-file",
                                  "swapped-share", "tampered-commitment"])
def test_failed_restore_names_the_cause_and_leaves_b_unchanged(spoiled: tuple[str, bytes, BackupResult],
                                                               case: str) -> None:
    _, _, result = spoiled
    doc = json.loads(result.backup)
    numbers: tuple[int, ...] = (1, 3)
    if case == "one-custodian":
        numbers, expect, error = (3,), "only 1 took part", errors.PolicyError
    elif case == "tampered-share":
        share = next(s for s in doc["shares"] if s["custodian"]["name"] == party(3).name)
        sealed = bytearray.fromhex(share["sealed"])
        sealed[-20] ^= 0x01
        share["sealed"] = sealed.hex()
        expect, error = f"share sealed to custodian {party(3).name!r}", errors.IntegrityError
    elif case == "swapped-share":
        one, three = (next(s for s in doc["shares"] if s["custodian"]["name"] == party(n).name) for n in (1, 3))
        one["sealed"], three["sealed"] = three["sealed"], one["sealed"]
        expect, error = f"custodian {party(1).name!r}", errors.IntegrityError
    elif case == "tampered-commitment":
        share = next(s for s in doc["shares"] if s["custodian"]["name"] == party(3).name)
        share["commitment"] = ("00" if share["commitment"][:2] != "00" else "11") + share["commitment"][2:]
        expect, error = f"share of custodian {party(3).name!r} does not match its commitment", errors.IntegrityError
    else:
        doc["keys"][0]["record"]["versions"][0]["state"] = "compromised"
        expect, error = "backup file is not authentic", errors.IntegrityError
    backup = BackupFile.parse(json.dumps(doc).encode())
    b = hsm("keymgr-B")
    before = object_handles("keymgr-B")
    with pytest.raises(error, match=expect.replace("(", r"\(").replace(")", r"\)")):
        tokens = [party(n).open(next(s for s in BackupFile.parse(result.backup).shares
                                     if s.custodian.name == party(n).name).custodian) for n in numbers]
        restore_keys(backup, keyring_of(b), tokens)
    assert object_handles("keymgr-B") == before


def test_key_made_never_to_leave_the_token_cannot_be_backed_up(key_name: str) -> None:
    a = hsm("keymgr-A")
    guarded_key(a, key_name, backup=False)
    with pytest.raises(errors.PolicyError, match="never to leave"):
        _backup(a, key_name, 1, 2)
    assert objects.key_attributes(token_of(a), a.describe_key(key_name).primary_version.key_id).attributes[
        "EXTRACTABLE"] is False


@pytest.mark.known_session_leak("python-pkcs11 0.10.1 Token.open does not close the session it opened when C_Login "
                                "fails: the wrong SO PIN in keymgr.hsm.transport.export_wrapped leaves it open")
def test_backup_needs_approvals_and_the_so_pin(key_name: str) -> None:
    a = hsm("keymgr-A")
    guarded_key(a, key_name)
    req = request(a, "backup", key_name, versions=None)
    with pytest.raises(errors.PolicyError, match="needs approvals by 2 of 3"):
        backup_keys(keyring_of(a), key_name, so_pin=Pin(so_pin()), request=req, approvals=approvals(a, req, 1))
    approved = approvals(a, req, 1, 3)
    with pytest.raises(errors.PinIncorrectError, match="SO PIN"):
        backup_keys(keyring_of(a), key_name, so_pin=Pin("000000"), request=req, approvals=approved)
    assert a.describe_key(key_name).name == key_name  # the user session came back after the SO step
    # a mistyped SO PIN does not spend the approvals; carrying out the request does
    backup_keys(keyring_of(a), key_name, so_pin=Pin(so_pin()), request=req, approvals=approved)
    with pytest.raises(errors.PolicyError, match="already carried out"):
        backup_keys(keyring_of(a), key_name, so_pin=Pin(so_pin()), request=req, approvals=approved)


def test_restore_refuses_a_key_name_already_on_the_target(made: tuple[str, bytes, BackupResult]) -> None:
    name, _, result = made
    a = hsm("keymgr-A")  # A holds the original
    backup = BackupFile.parse(result.backup)
    before = object_handles("keymgr-A")
    with pytest.raises(errors.PolicyError, match="already has a key named"):
        restore_keys(backup, keyring_of(a), _tokens(backup, 1, 2))
    assert object_handles("keymgr-A") == before


def test_custodian_outside_the_backup_is_refused(key_name: str) -> None:
    a = hsm("keymgr-A")
    guarded_key(a, key_name, 2, (1, 2))
    backup = BackupFile.parse(_backup(a, key_name, 1, 2).backup)
    assert backup.quorum.custodians == (party(1).name, party(2).name)
    b = hsm("keymgr-B")
    before = object_handles("keymgr-B")
    outsider = CustodyRegister(keyring_of(a)).load().custodian(party(3).name)
    with pytest.raises(errors.PolicyError, match=f"custodian {party(3).name!r} is not one of this backup's"):
        restore_keys(backup, keyring_of(b), [party(1).open(backup.slot(party(1).name).custodian),
                                         party(3).open(outsider)])
    assert object_handles("keymgr-B") == before


def test_backup_and_restore_through_the_manager_are_audited(tmp_path, key_name: str) -> None:
    """KeyManager.backup / restore record the ceremony as the CLI does: a refused backup (one
    approval of the two needed), the backup, then the restore on B, each in its HSM's log."""
    from tests.conftest import softhsm_token

    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    with KeyManager(softhsm_token("keymgr-A").uri(), audit=log_a) as a:
        guarded_key(a, key_name)
        req = request(a, "backup", key_name, versions=None)
        with pytest.raises(errors.PolicyError, match="needs approvals"):
            a.backup(key_name, so_pin=Pin(so_pin()), request=req, approvals=approvals(a, req, 1))
        result = a.backup(key_name, so_pin=Pin(so_pin()), request=req, approvals=approvals(a, req, 1, 2))
    backup = BackupFile.parse(result.backup)
    with KeyManager(softhsm_token("keymgr-B").uri(), audit=log_b) as b:
        restored = b.restore(backup, _tokens(backup, 2, 3))
        assert [r.name for r in restored.records] == [key_name]

    def rows(path) -> list[tuple[str, str | None, str, object]]:
        entries = map(json.loads, path.read_text().splitlines())
        return [(e["op"], e["key"], e["outcome"], e.get("detail")) for e in entries if e["op"] in ("backup", "restore")]

    assert rows(log_a) == [("backup", key_name, "intent", {"approvals": 1}),
                           ("backup", key_name, "refused", {"approvals": 1, "why": ANY}),
                           ("backup", key_name, "intent", {"approvals": 2}),
                           ("backup", key_name, "ok", {"approvals": 2})]
    assert rows(log_b) == [("restore", None, "intent", {"custodians": 2}),
                           ("restore", key_name, "ok", {"custodians": 2, "keys": [key_name]})]
    assert so_pin() not in log_a.read_text() + log_b.read_text()
