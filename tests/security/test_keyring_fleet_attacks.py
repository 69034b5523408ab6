"""What an outside review of the fleet keyring found, each as a test (issue 12, second round).

Races between hosts (two rotations claiming one epoch, two creates with different profiles),
an operator's retire right after a rotation, and a user-PIN holder who forges facts, plants a
MAC key of a known value or deletes facts. Each test sets up the state such a race or attack
leaves on a real token, then checks that no data becomes unreadable and that keymgr reports
what it cannot prevent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import asdict, replace

import pytest
from pkcs11 import Attribute, KeyType, ObjectClass

import keymgr
from keymgr import errors
from keymgr.hsm import objects
from keymgr.keyring.facts import Fact
from keymgr.keyring.store import META_MAC_LABEL, version_template
from keymgr.lifecycle import rotation
from tests._internals import keyring_of, token_of
from tests.conftest import TokenUnderTest, requires, softhsm_token

#: every test here is slow (planted keys and forged facts, each against fresh managers):
#: `pytest -m "not slow"` skips the module, CI runs it
pytestmark = pytest.mark.slow


def _stale_manager(token: TokenUnderTest) -> keymgr.KeyManager:
    """A manager standing for another host: it keeps the view it has until told to reload."""
    other = keymgr.KeyManager(token.uri())
    other.refresh_interval = 3600.0
    other.list_keys()
    return other


@pytest.mark.slow
def test_the_loser_of_two_racing_rotations_waits_like_any_old_primary(km, token: TokenUnderTest,
                                                                       key_name: str) -> None:
    """Two hosts rotate at once: both versions claim the same epoch, the higher (epoch, number)
    leads. The loser was the primary on its host until that host refreshed, so data may sit
    under it: a destroy or a retire right away is refused like that of any old primary."""
    km.create_key(key_name)
    record = km.rotate(key_name)  # v2 at epoch 2: this host's rotation
    v2 = record.version(2)
    epoch = max(f.body["epoch"] for f in keyring_of(km).facts(key_name) if f.body.get("epoch") is not None)
    rival = keyring_of(km).new_key_id()  # the other host's rotation, claiming the same number and epoch
    template = version_template(record.profile, record.policy)
    objects.generate_key(token_of(km), template, label=f"{key_name}/v2", key_id=rival)
    keyring_of(km).add(key_name, "version", {"kid": rival.hex(), "num": 2, "epoch": epoch, "restored": False,
                                         "kcv": objects.check_value(token_of(km), rival), "prof": record.profile})
    record = km.describe_key(key_name)
    loser = next(v for v in record.versions if v.key_id != record.primary_version.key_id and v.version > 1)
    assert loser.state == "decrypt-only" and {loser.key_id, record.primary_version.key_id} == {v2.key_id, rival}
    with pytest.raises(errors.PolicyError, match="stopped being the primary"):
        km.destroy(name=key_name, version=loser.version, confirmed=True)
    with pytest.raises(errors.PolicyError, match="stopped being the primary"):
        km.retire(key_name, below=record.primary)
    assert objects.key_exists(token_of(km), loser.key_id)
    assert km.describe_key(key_name).min_decryption_version == 1


@pytest.mark.slow
@pytest.mark.requires("aes-gcm")
def test_a_create_racing_with_another_profile_loses_no_message(km, token: TokenUnderTest, key_name: str) -> None:
    """Two hosts create one name, one with gcm, one with kw, neither seeing the other: whichever
    key fact wins, every version keeps its own profile, so what each host encrypted before it saw
    the other still decrypts, every version passes key verify, and only the winner's profile
    encrypts from then on. Repeated: the winner is decided by random fact ids."""
    for round_ in range(4):
        name = f"{key_name}-{round_}"
        other = _stale_manager(token)
        try:
            first = km.create_key(name, profile="gcm")
            early = km.encrypt(b"gcm host", key=name)
            try:
                second = other.create_key(name, profile="kw")
                late = other.encrypt(b"kw host", key=name)
            except errors.KeyExistsError as exc:
                assert "another host created key" in str(exc) or "already exists" in str(exc)
                second, late = None, None
            keyring_of(other).reload()
            keyring_of(km).reload()
            merged = km.describe_key(name)
            assert merged == other.describe_key(name)  # every host folds the same key
            assert merged.profile in ("gcm", "kw") and merged.profile_of(merged.primary_version) == merged.profile
            assert {merged.profile_of(v) for v in merged.versions} == ({"gcm", "kw"} if second else {"gcm"})
            assert km.decrypt(early) == b"gcm host" and other.decrypt(early) == b"gcm host"
            if late is not None:
                assert km.decrypt(late) == b"kw host"
            assert all(check.ok for check in km.verify_keys(name)), [c.verdict for c in km.verify_keys(name)]
            assert km.decrypt(km.encrypt(b"after", key=name)) == b"after"
            assert first.profile == "gcm"
        finally:
            other.close()


def test_retire_waits_for_the_fleet_and_immediately_skips_the_wait(km, token: TokenUnderTest,
                                                                    key_name: str) -> None:
    """Another host may go on encrypting under the old primary until it refreshes; retiring it is
    final for that data, so it waits like a destroy."""
    km.create_key(key_name)
    km.rotate(key_name)
    with pytest.raises(errors.PolicyError, match="Retire it after 10 minutes"):
        km.retire(key_name, below=2)
    assert km.retire(key_name, below=2, immediately=True).min_decryption_version == 2


def test_a_forged_policy_cannot_make_versions_extractable(km, token: TokenUnderTest, key_name: str) -> None:
    """``backup`` is fixed when the key is created: a policy fact saying otherwise (a PIN holder
    can MAC one) changes the other fields, never that one."""
    record = km.create_key(key_name, max_messages=100)
    forged = replace(record.policy, backup=True, max_messages=50)
    keyring_of(km).add(key_name, "policy", {"policy": asdict(forged)})
    record = km.describe_key(key_name)
    assert record.policy.max_messages == 50 and record.policy.backup is False
    record = km.rotate(key_name)
    attrs = objects.key_attributes(token_of(km), record.primary_version.key_id).attributes
    assert attrs["EXTRACTABLE"] is False and attrs["NEVER_EXTRACTABLE"] is True


def _plant_mac_key(km: keymgr.KeyManager, value: bytes, key_id: bytes) -> None:
    """The attack: a GENERIC_SECRET of a known value under the keyring MAC key's label, with the
    lowest CKA_ID there is (writers use the lowest)."""

    def plant(session: object) -> None:
        session.create_object({  # type: ignore[attr-defined]
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
            Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.LABEL: META_MAC_LABEL, Attribute.ID: key_id,
            Attribute.VALUE: value, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
            Attribute.MODIFIABLE: False, Attribute.SIGN: True, Attribute.VERIFY: True})

    token_of(km).run("plant a MAC key", plant)


def test_a_planted_mac_key_of_known_value_is_never_used_and_is_reported(km, token: TokenUnderTest,
                                                                        key_name: str) -> None:
    """With a MAC key they know, a PIN holder could forge keyring facts offline. keymgr uses only
    MAC keys the token generated and never let out: the planted one MACs nothing, a fact MACed
    with it is not authentic, and ``key verify`` names it."""
    km.create_key(key_name)
    planted, value = b"\x00" * 4, os.urandom(32)
    _plant_mac_key(km, value, planted)
    try:
        with keymgr.KeyManager(token.uri()) as fresh:
            fresh.rotate(key_name)  # writes facts, MACed by the writer's key
            assert planted not in keyring_of(fresh)._reader_macs  # noqa: SLF001 - the keys it trusts
            assert keyring_of(fresh)._writer_mac() != planted  # noqa: SLF001
            problems, _ = fresh.verify_token_objects()
            assert any(planted.hex() in line and "CKA_LOCAL is False" in line for line in problems), problems
            forged = hmac.new(value, b"probe\x00x", hashlib.sha256).digest()  # what its planter can make
            assert not keyring_of(fresh).verify_authentic(b"probe", b"x", forged)
    finally:
        objects.destroy_key(token_of(km), planted)


def test_a_key_object_no_fact_names_fails_key_verify(km, token: TokenUnderTest, key_name: str) -> None:
    """What deleting a rotation's facts leaves (or a key made by hand): an object labelled as a
    version that no fact names, not even a pending one. key verify fails on it; an object a
    rotation in progress made (its pending fact written) is only a note."""
    record = km.create_key(key_name)
    template = version_template(record.profile, record.policy)
    stray, in_progress = keyring_of(km).new_key_id(), keyring_of(km).new_key_id()
    objects.generate_key(token_of(km), template, label=f"{key_name}/v2", key_id=stray)
    keyring_of(km).add(key_name, "pending", {"kid": in_progress.hex(), "num": 3})
    objects.generate_key(token_of(km), template, label=f"{key_name}/v3", key_id=in_progress)
    try:
        problems, notes = km.verify_token_objects()
        assert any(stray.hex() in line and "named by no fact" in line for line in problems), problems
        assert any(in_progress.hex() in line and "rotation in progress" in line for line in notes), notes
        assert not any(in_progress.hex() in line for line in problems)
    finally:
        for key_id in (stray, in_progress):
            objects.destroy_key(token_of(km), key_id)
    assert rotation.orphans(keyring_of(km), km.describe_key(key_name)) == []


# -- second review ------------------------------------------------------------------------


def _write_fact(km: keymgr.KeyManager, name: str, kind: str, body: dict, fact_id: str) -> None:
    """A fact with a chosen id (what another host, or a PIN holder, may write)."""
    keyring_of(km)._put(name, [Fact(kind, name, fact_id, keyring_of(km).now(), body)])  # noqa: SLF001


@pytest.mark.requires("aes-gcm")
def test_the_losing_profile_of_a_create_race_waits_even_with_the_higher_number(km, token: TokenUnderTest,
                                                                                 key_name: str) -> None:
    """Host B's kw create lost to host A's gcm create, but B's version sorts after A's: nothing
    outranks it by (epoch, number), yet it led on B until B saw A's key. It waits like any old
    primary before a destroy."""
    record = km.create_key(key_name, profile="gcm")
    rival = b"\xff" * 4 + os.urandom(12)  # sorts after A's version: B's becomes v2
    objects.generate_key(token_of(km), version_template("kw", record.policy), label=f"{key_name}/v1", key_id=rival)
    _write_fact(km, key_name, "key", {"profile": "kw", "policy": asdict(record.policy)}, "f" * 32)
    _write_fact(km, key_name, "version", {"kid": rival.hex(), "num": 1, "epoch": 1, "restored": False,
                                          "kcv": objects.check_value(token_of(km), rival), "prof": "kw"}, "e" * 32)
    record = km.describe_key(key_name)
    loser = next(v for v in record.versions if v.key_id == rival)
    assert record.profile == "gcm" and loser.version == 2 and record.primary == 1
    with pytest.raises(errors.PolicyError, match="stopped being the primary"):
        km.destroy(key_name, loser.version, confirmed=True)
    assert objects.key_exists(token_of(km), rival)


def test_a_second_key_fact_cannot_turn_backup_on(km, token: TokenUnderTest, key_name: str) -> None:
    """A forged ``key`` fact with the lowest id wins the head, but ``backup`` needs every key fact."""
    record = km.create_key(key_name)
    _write_fact(km, key_name, "key", {"profile": record.profile, "policy": asdict(replace(record.policy, backup=True))},
                "0" * 32)
    assert km.describe_key(key_name).policy.backup is False
    new = km.rotate(key_name).primary_version
    attrs = objects.key_attributes(token_of(km), new.key_id).attributes
    assert attrs["EXTRACTABLE"] is False and attrs["NEVER_EXTRACTABLE"] is True


def test_a_forged_destroyed_fact_on_the_primary_is_not_finished_at_once(km, token: TokenUnderTest,
                                                                          key_name: str) -> None:
    """Forged ``destroyed`` on the primary: the object is intact and the data recoverable. key
    verify says so; finishing the destroy waits as long as any destroy would."""
    km.create_key(key_name)
    primary = km.rotate(key_name).primary_version
    keyring_of(km).add(key_name, "state", {"kid": primary.key_id.hex(), "to": "destroyed"})
    [check] = [c for c in km.verify_keys(key_name) if c.version == primary.version]
    assert "still recoverable" in check.verdict and "forged" in check.verdict
    with pytest.raises(errors.PolicyError, match="was marked destroyed"):
        km.destroy(key_name, primary.version, confirmed=True)
    assert objects.key_exists(token_of(km), primary.key_id)


@pytest.mark.slow
@pytest.mark.requires("aes-keygen", "hmac-sha256", "data-objects")
def test_automatic_rotations_are_audited(tmp_path, token: TokenUnderTest, key_name: str) -> None:
    """Every version is explained by the audit log, automatic ones included: a rotate entry
    (intent and outcome) marked automatic, with the reason."""
    path = tmp_path / "audit.log"
    with keymgr.KeyManager(token.uri(), audit=path) as km:
        km.create_key(key_name, max_messages=3, auto_rotate=True)
        for _ in range(10):
            km.encrypt(b"x", key=key_name)
        versions = len(km.describe_key(key_name).versions)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rotations = [r for r in rows if r["op"] == "rotate" and r["outcome"] == "ok"]
    assert versions >= 4 and len(rotations) == versions - 1
    assert all(r["detail"]["automatic"] and r["detail"]["reason"] == "use limit" for r in rotations)
    assert len([r for r in rows if r["op"] == "rotate" and r["outcome"] == "intent"]) == len(rotations)


def test_key_verify_finds_objects_of_a_key_whose_facts_are_all_gone(km, token: TokenUnderTest,
                                                                     key_name: str) -> None:
    """Deleting every fact of a key leaves its objects: they are named, with or without a NAME."""
    record = km.create_key(key_name)
    orphan = keyring_of(km).new_key_id()
    objects.generate_key(token_of(km), version_template(record.profile, record.policy), label=f"{key_name}-gone/v1",
                         key_id=orphan)
    try:
        for name in (None, f"{key_name}-gone"):
            problems, _ = km.verify_token_objects(name)
            assert any(orphan.hex() in line and "no key" in line for line in problems), (name, problems)
        assert km.verify_token_objects(key_name) == ([], [])
    finally:
        objects.destroy_key(token_of(km), orphan)


# -- third review ---------------------------------------------------------------------------


def test_the_settle_wait_runs_from_the_latest_rotation_that_outranks_the_version(km, token: TokenUnderTest,
                                                                                   key_name: str) -> None:
    """A version that lost a create race long ago outranks v1 by number without ever leading; v1
    led until the rotation just made. The wait runs from that rotation, not from the old race."""
    requires(token, "aes-keygen", "hmac-sha256", "data-objects", "aes-gcm")
    record = km.create_key(key_name, profile="gcm")
    rival = b"\xff" * 4 + os.urandom(12)
    objects.generate_key(token_of(km), version_template("kw", record.policy), label=f"{key_name}/v1", key_id=rival)
    _write_fact(km, key_name, "key", {"profile": "kw", "policy": asdict(record.policy)}, "f" * 32)
    old = "2000-01-01T00:00:00Z"  # the race, long ago
    keyring_of(km)._put(key_name, [Fact("version", key_name, "e" * 32, old, {  # noqa: SLF001
        "kid": rival.hex(), "num": 1, "epoch": 1, "restored": False, "kcv": objects.check_value(token_of(km), rival),
        "prof": "kw"})])
    km.rotate(key_name)  # v1 stops leading now
    with pytest.raises(errors.PolicyError, match="stopped being the primary"):
        km.destroy(key_name, 1, confirmed=True)
    with pytest.raises(errors.PolicyError, match="stopped being the primary"):
        km.retire(key_name, below=2)


def test_a_destroyed_fact_with_an_unreadable_or_old_time_does_not_skip_the_wait(km, token: TokenUnderTest,
                                                                                  key_name: str) -> None:
    """A forged time proves nothing: one that does not parse counts as now."""
    requires(token, "aes-keygen", "hmac-sha256", "data-objects")
    km.create_key(key_name)
    primary = km.rotate(key_name).primary_version
    keyring_of(km)._put(key_name, [Fact("state", key_name, "d" * 32, "not-a-time", {  # noqa: SLF001
        "kid": primary.key_id.hex(), "to": "destroyed", "lc": 99})])
    with pytest.raises(errors.PolicyError, match="was marked destroyed"):
        km.destroy(key_name, primary.version, confirmed=True)
    assert objects.key_exists(token_of(km), primary.key_id)


def test_a_key_planted_under_the_genuine_mac_keys_id_is_never_used(key_name: str) -> None:
    """A long-running process caches the MAC key's handle; a PIN holder destroys the genuine key and
    imports one of a known value under the same CKA_ID and another label. The process's next
    HMAC finds no key (the token matches the proof attributes) instead of MACing with the planted
    one. On a token of its own: destroying the genuine MAC key voids every record it MACed."""
    token = softhsm_token("mac-swap")
    with keymgr.KeyManager(token.uri()) as km:
        km.create_key(key_name)
        mac_id = keyring_of(km)._writer_mac()  # noqa: SLF001
        try:
            objects.hmac_sha256(token_of(km), mac_id, b"warm the handle cache")

            def swap(session: object) -> None:
                for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,  # type: ignore[attr-defined]
                                                Attribute.ID: mac_id}):
                    obj.destroy()
                session.create_object({  # type: ignore[attr-defined]
                    Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
                    Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.LABEL: "innocuous", Attribute.ID: mac_id,
                    Attribute.VALUE: b"K" * 32, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                    Attribute.MODIFIABLE: False, Attribute.SIGN: True, Attribute.VERIFY: True})

            token_of(km).run("swap the MAC key", swap)
            with pytest.raises(errors.KeyNotFoundError):
                objects.hmac_sha256(token_of(km), mac_id, b"a fact")
        finally:
            token_of(km).run("remove the planted key", lambda s: [o.destroy() for o in s.get_objects(  # type: ignore[attr-defined]
                {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: mac_id, Attribute.LABEL: "innocuous"})])


def test_refusal_reasons_fit_the_audit_detail(tmp_path, token: TokenUnderTest, key_name: str) -> None:
    """A settle refusal's message is longer than a detail string may be: it is cut, and the rest of
    the detail (below, immediately) stays."""
    requires(token, "aes-keygen", "hmac-sha256", "data-objects")
    path = tmp_path / "audit.log"
    with keymgr.KeyManager(token.uri(), audit=path) as km:
        km.create_key(key_name)
        km.rotate(key_name)
        with pytest.raises(errors.PolicyError):
            km.retire(key_name, below=2)
    [row] = [json.loads(line) for line in path.read_text().splitlines()
             if '"retire"' in line and '"refused"' in line]
    assert row["detail"]["below"] == 2 and row["detail"]["immediately"] is False
    assert row["detail"]["why"].startswith(f"key {key_name!r} version 1 stopped being the primary")


def test_exist_ok_refuses_a_key_with_another_backup_setting(km, token: TokenUnderTest, key_name: str) -> None:
    requires(token, "aes-keygen", "hmac-sha256", "data-objects")
    km.create_key(key_name, backup=False)
    with pytest.raises(errors.KeyExistsError, match="without backup"):
        km.create_key(key_name, backup=True, exist_ok=True)
