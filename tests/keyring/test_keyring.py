"""Named keys and versions in the token; the keyring's facts and snapshots authenticated and bound to
their labels, compacted, and records of keymgr before facts read for the upgrade."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta

import pytest

import keymgr
from keymgr._canonical import canonical_json as canonical
from keymgr._time import utc_now
from keymgr.hsm import objects
from keymgr.hsm.templates import KEK_GCM, KEK_WRAP, MAC_KEY, ROLE_ATTRIBUTES
from keymgr.keyring.facts import new_fact_id
from keymgr.keyring.store import (
    _FACT_DOMAIN,
    _SNAPSHOT_DOMAIN,
    APPLICATION,
    FACT_PREFIX,
    LEGACY_PREFIX,
    SNAPSHOT_PREFIX,
    KeyPolicy,
    KeyRecord,
    KeyVersion,
)
from keymgr.lifecycle import usage
from tests._internals import clocked, keyring_of, token_of
from tests._keyring_helpers import WallClock, eventually, key_objects, legacy_record, same_record
from tests.conftest import TokenUnderTest


@pytest.mark.parametrize("profile", ["kw", "gcm"])
def test_create_list_describe(km, key_name: str, profile: str) -> None:
    record = km.create_key(key_name, profile=profile)
    assert record.name == key_name and record.primary == 1 and record.profile == profile
    v1 = record.primary_version
    assert v1.state == "active" and len(v1.key_id) == 16
    assert [r.name for r in km.list_keys()].count(key_name) == 1
    again = km.describe_key(key_name)
    assert again.primary_version.key_id == v1.key_id
    # a fresh manager (fresh cache) reads the same record from the token
    keyring_of(km).reload()
    assert km.describe_key(key_name) == again


def test_key_check_value_matches_aes_of_zero_block(km, key_name: str) -> None:
    """KCV is the token's CKA_CHECK_VALUE; it must be 3 bytes and differ between keys."""
    a = km.create_key(key_name).primary_version
    b = km.create_key(key_name + "-b").primary_version
    assert a.kcv is not None and len(bytes.fromhex(a.kcv)) == 3
    assert a.kcv != b.kcv


@pytest.mark.parametrize("profile,template", [("kw", KEK_WRAP), ("gcm", KEK_GCM)])
def test_template_attributes_read_back_from_token(km, key_name: str, profile: str, template) -> None:
    record = km.create_key(key_name, profile=profile)
    info = objects.key_attributes(token_of(km), record.primary_version.key_id)
    attrs = info.attributes
    assert info.label == f"{key_name}/v1"
    assert attrs["SENSITIVE"] is True and attrs["ALWAYS_SENSITIVE"] is True
    assert attrs["EXTRACTABLE"] is False and attrs["NEVER_EXTRACTABLE"] is True
    assert attrs["TOKEN"] is True and attrs["PRIVATE"] is True
    assert attrs["VALUE_LEN"] == 32
    enabled = {name for name in ROLE_ATTRIBUTES if attrs.get(name)}
    assert enabled == set(template.roles)
    assert attrs.get("DERIVE") is False


def test_duplicate_and_invalid_names(km, key_name: str) -> None:
    km.create_key(key_name)
    with pytest.raises(keymgr.KeyExistsError, match="already exists"):
        km.create_key(key_name)
    for bad in ["", "a/b", "x" * 65, "-lead", "sp ace", "é"]:
        with pytest.raises(keymgr.ConfigurationError):
            km.create_key(bad)
    with pytest.raises(keymgr.ConfigurationError, match="profile"):
        km.create_key(key_name + "x", profile="ecb")


def test_create_key_exist_ok_gets_the_key_and_never_a_second_one(km, token, key_name: str) -> None:
    """Get-or-create: the existing key comes back untouched (same version, same policy); another
    profile is still refused; two managers creating at once (two hosts starting) end with one key."""
    first = km.create_key(key_name, max_messages=10, exist_ok=True)
    again = km.create_key(key_name, exist_ok=True)  # no policy given: the existing one stays
    assert (again.primary_version.key_id, again.policy) == (first.primary_version.key_id, first.policy)
    assert again.policy.max_messages == 10
    with pytest.raises(keymgr.KeyExistsError, match="profile 'kw'"):
        km.create_key(key_name, profile="gcm", exist_ok=True)
    other_name = key_name + "-race"
    with keymgr.KeyManager(token.uri()) as other:
        other.refresh_interval = 3600.0
        other.list_keys()  # its view predates the create below
        km.create_key(other_name)
        raced = other.create_key(other_name, exist_ok=True)
    assert raced.primary_version.key_id == km.describe_key(other_name).primary_version.key_id
    assert len(km.describe_key(other_name).versions) == 1


def test_unknown_key(km) -> None:
    with pytest.raises(keymgr.KeyNotFoundError, match="no key named"):
        km.describe_key("does-not-exist")


# -- authenticity: every object of the keyring is MACed, and bound to its label --------------------


@pytest.fixture
def quiet(km) -> Iterator[object]:
    """``km`` without background refreshes: the test decides when it reads the token (a planted
    object must not be found by a refresh of this manager in between)."""
    km.refresh_interval = 3600.0
    yield km


@contextlib.contextmanager
def _planted(ts: object, label: str, value: bytes) -> Iterator[None]:
    """An object written by a PIN holder, removed afterwards (the run's tokens are shared)."""
    objects.write_data_object(ts, application=APPLICATION, label=label, value=value)  # type: ignore[arg-type]
    try:
        yield
    finally:
        objects.destroy_data_object(ts, application=APPLICATION, label=label)  # type: ignore[arg-type]


@contextlib.contextmanager
def _replaced(ts: object, label: str, original: bytes, edited: bytes) -> Iterator[None]:
    """The keyring object ``label`` edited by a PIN holder (data objects are read-only: destroyed
    and written again), put back as it was afterwards."""
    objects.destroy_data_object(ts, application=APPLICATION, label=label)  # type: ignore[arg-type]
    try:
        with _planted(ts, label, edited):
            yield
    finally:
        objects.write_data_object(ts, application=APPLICATION, label=label, value=original)  # type: ignore[arg-type]


def _read_afresh(token: TokenUnderTest) -> dict[str, KeyRecord]:
    """Every key as a manager that has read nothing yet (another process) sees it."""
    with keymgr.KeyManager(token.uri()) as reader:
        return {record.name: record for record in reader.list_keys()}


def _one(km, name: str, prefix: str) -> tuple[str, bytes]:
    [(label, value)] = [(label, value) for label, value in key_objects(token_of(km), name).items()
                        if label.startswith(prefix)]
    return label, value


@pytest.mark.slow
@pytest.mark.parametrize("target", ["snapshot", "fact"])
def test_an_edited_snapshot_or_fact_is_not_authentic(quiet, token: TokenUnderTest, key_name: str,
                                                     target: str) -> None:
    """A PIN holder edits what the keyring says: version 1's key object in the snapshot that
    create wrote (pointing it at a key of theirs), or a policy fact's limit. Every reader that
    reads the edited object refuses it, and the edit reaches no record."""
    km = quiet
    km.create_key(key_name)
    keyring_of(km).with_policy(key_name, KeyPolicy(max_messages=1000))
    before = km.describe_key(key_name)
    if target == "snapshot":
        label, value = _one(km, key_name, SNAPSHOT_PREFIX)
        edited = json.loads(value)
        [version] = [f for f in edited["snapshot"]["facts"] if f["k"] == "version"]
        version["kid"] = keyring_of(km).new_key_id().hex()
    else:
        [(label, value)] = [(label, value) for label, value in key_objects(token_of(km), key_name).items()
                            if label.startswith(FACT_PREFIX) and json.loads(value)["fact"]["k"] == "policy"]
        edited = json.loads(value)
        edited["fact"]["policy"]["max_messages"] = 10**9
    assert canonical(edited) != value
    with _replaced(token_of(km), label, value, canonical(edited)):
        with pytest.raises(keymgr.IntegrityError, match="not authentic"):
            _read_afresh(token)
        with contextlib.suppress(keymgr.IntegrityError):  # a reader that verified the original keeps it
            keyring_of(km).reload()
        assert keyring_of(km).current(key_name) == before
    assert same_record(_read_afresh(token)[key_name], before)  # put back, it reads again


@contextlib.contextmanager
def _forged_fact(km, name: str, how: str) -> Iterator[tuple[str, bytes]]:
    """A fact making a key of the attacker's the primary of ``name``, MACed ``how``, planted on
    the token for the duration (with the attacker's MAC key, if it has one)."""
    fact_id = new_fact_id()
    fact = {"k": "primary", "n": name, "id": fact_id, "at": utc_now(), "kid": keyring_of(km).new_key_id().hex(),
            "epoch": 99, "lc": 99}
    payload = canonical(fact)
    envelope: dict[str, object] = {"fact": fact}
    with contextlib.ExitStack() as stack:
        if how == "no-mac":
            mac = bytes(32)
        elif how == "attacker-key":  # an HMAC key of the attacker's on the same token, named in the envelope
            key_id = b"attacker/" + os.urandom(8)
            objects.generate_key(token_of(km), MAC_KEY, label="attacker-mac", key_id=key_id)
            stack.callback(objects.destroy_key, token_of(km), key_id)
            mac = objects.hmac_sha256(token_of(km), key_id, _FACT_DOMAIN + b"\x00" + payload)
            envelope["key"] = key_id.hex()
        else:  # the keyring's own MAC key, for another kind of record (a snapshot's domain)
            mac = keyring_of(km).authenticate(_SNAPSHOT_DOMAIN, payload)
        envelope["mac"] = mac.hex()
        label, value = f"{FACT_PREFIX}{name}/{fact_id}", canonical(envelope)
        stack.enter_context(_planted(token_of(km), label, value))
        yield label, value


@pytest.mark.slow
@pytest.mark.parametrize("how", ["no-mac", "attacker-key", "other-domain"])
def test_a_forged_fact_is_refused_by_the_reader_that_finds_it(quiet, token: TokenUnderTest, key_name: str,
                                                              how: str) -> None:
    km = quiet
    before = km.create_key(key_name)
    with _forged_fact(km, key_name, how):
        with pytest.raises(keymgr.IntegrityError, match="not authentic"):
            keyring_of(km).reload()
        with pytest.raises(keymgr.IntegrityError, match="not authentic"):
            _read_afresh(token)
    keyring_of(km).reload()
    assert same_record(km.describe_key(key_name), before)
    assert same_record(_read_afresh(token)[key_name], before)


def test_a_forged_fact_found_by_the_background_refresh_fails_the_next_call(km, key_name: str) -> None:
    """The refresh runs in a background thread; what it cannot verify fails the caller that
    comes next (closed), not only a log line."""
    km.create_key(key_name)
    km.refresh_interval = 0.05

    def refused() -> bool:
        try:
            km.list_keys()
        except keymgr.IntegrityError:
            return True
        return False

    with _forged_fact(km, key_name, "no-mac"):
        eventually(refused, what="a call after the refresh that read the forged fact fails")


def test_a_reader_that_met_a_forged_fact_stays_closed_and_loses_no_genuine_fact(quiet, token: TokenUnderTest,
                                                                               key_name: str) -> None:
    km = quiet
    km.create_key(key_name)
    with keymgr.KeyManager(token.uri()) as other:
        other.refresh_interval = 3600.0
        other.describe_key(key_name)
        with _forged_fact(km, key_name, "no-mac"):
            keyring_of(other).with_policy(key_name, KeyPolicy(max_messages=777))  # written after the forgery
            for _ in range(2):  # closed for as long as the forged object is there, not just once
                with pytest.raises(keymgr.IntegrityError, match="not authentic"):
                    keyring_of(km).reload()
        keyring_of(km).reload()
        assert km.describe_key(key_name).policy.max_messages == 777


@pytest.mark.slow
@pytest.mark.parametrize("move", ["fact-to-another-key", "fact-to-another-id", "snapshot-to-another-key",
                                  "record-to-another-generation"])
def test_an_object_whose_label_does_not_match_its_content_is_refused(quiet, key_name: str, move: str) -> None:
    """Each object names its key (and id, or generation) inside its MAC; a genuine object copied
    under another label (another key's, to graft one key's versions onto another) is refused."""
    km = quiet
    record = km.create_key(key_name)
    keyring_of(km).with_policy(key_name, KeyPolicy(rotate_after_days=30))
    if move == "record-to-another-generation":
        label, value = legacy_record(keyring_of(km), replace(record, generation=3))
        moved = label[:-1] + "4"
    else:
        prefix = SNAPSHOT_PREFIX if move.startswith("snapshot") else FACT_PREFIX
        [(label, value)] = [(label, value) for label, value in key_objects(token_of(km), key_name).items()
                            if label.startswith(prefix) and b'"policy"' in value]
        _, object_id = label.rsplit("/", 1)
        moved = (f"{prefix}{key_name}-evil/{object_id}" if move.endswith("another-key")
                 else f"{prefix}{key_name}/{new_fact_id()}")
    with _planted(token_of(km), moved, value), pytest.raises(keymgr.IntegrityError, match="does not match its content"):
        keyring_of(km).reload()
    keyring_of(km).reload()
    with pytest.raises(keymgr.KeyNotFoundError):
        km.describe_key(f"{key_name}-evil")


# -- compaction: many facts become one snapshot, and what it covers goes after a grace period -----


@pytest.mark.slow
def test_changes_are_compacted_into_a_snapshot_that_every_reader_folds_the_same(quiet, token: TokenUnderTest,
                                                                                key_name: str) -> None:
    """Past compact_at objects the writer folds a key's facts into one snapshot. What the snapshot
    covers stays for the grace period (a reader that has not seen the snapshot still reads the
    facts), and then goes: here because another host's clock says the snapshot is stale_after
    old. Readers before, during and after fold the same key; another key whose name extends this
    one's is never touched."""
    km = quiet
    keyring_of(km).compact_at = 4
    km.create_key(key_name)
    neighbour = km.create_key(f"{key_name}-other")
    neighbours = key_objects(token_of(km), f"{key_name}-other")
    for days in range(1, 6):
        keyring_of(km).with_policy(key_name, KeyPolicy(rotate_after_days=days))
    record = km.describe_key(key_name)
    assert record.policy.rotate_after_days == 5
    present = key_objects(token_of(km), key_name)
    covered = {label for value in present.values() for label in json.loads(value).get("snapshot", {}).get("covers", [])}
    assert covered, "nothing was compacted"
    assert covered <= set(present)  # within the grace period nothing covered is gone
    assert same_record(_read_afresh(token)[key_name], record)

    later = WallClock(keyring_of(km).stale_after + timedelta(minutes=1))
    with clocked(keymgr.KeyManager(token.uri()), wall_clock=later) as late:
        late.refresh_interval = 0.0
        assert same_record(late.describe_key(key_name), record)
        # this host finds every snapshot on the shared token stale, and sweeps what they all cover:
        # each C_DestroyObject re-lists the token (STACK-FACTS 24), so allow for a long backlog
        started = time.monotonic()
        eventually(lambda: (late.list_keys(), not covered & set(key_objects(token_of(km), key_name)))[1], timeout=30.0,
                   what="a host that finds the snapshot stale_after old destroys what it covers")
        print(f"\nswept in {time.monotonic() - started:.1f} s")
        assert same_record(late.describe_key(key_name), record)
    left = key_objects(token_of(km), key_name)
    assert left and not covered & set(left)
    assert same_record(_read_afresh(token)[key_name], record)
    keyring_of(km).reload()
    assert km.describe_key(key_name) == record  # the writer never forgets a fact it has seen
    assert key_objects(token_of(km), f"{key_name}-other") == neighbours
    assert same_record(_read_afresh(token)[f"{key_name}-other"], neighbour)


def _calls_of(km, change: Callable[[], object], monkeypatch: pytest.MonkeyPatch) -> int:
    from keymgr.hsm.sessions import TokenSession

    calls = {"n": 0}
    real_run = TokenSession.run

    def counting_run(self: TokenSession, operation: str, call):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return real_run(self, operation, call)

    with monkeypatch.context() as patch:
        patch.setattr(TokenSession, "run", counting_run)
        change()
    return calls["n"]


@pytest.mark.slow
def test_a_change_costs_the_same_token_calls_at_any_age_of_the_key(quiet, token: TokenUnderTest, key_name: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A key's history does not make its changes dearer or its objects more: a change is one new
    object (and, every compact_at changes, a snapshot replacing the others once their grace period
    is over: here at once), however many changes came before."""
    km = quiet
    keyring_of(km).grace = 0.0
    km.create_key(key_name)
    costs, counts = [], []
    for days in range(1, 41):
        costs.append(_calls_of(km, lambda d=days: keyring_of(km).with_policy(key_name, KeyPolicy(rotate_after_days=d)),
                               monkeypatch))
        counts.append(len(key_objects(token_of(km), key_name)))
    assert max(counts) <= keyring_of(km).compact_at + 1, counts
    plain = min(costs[:5])
    assert costs[-5:].count(plain) >= 4 and max(costs[20:]) <= max(costs[:20]), costs
    assert km.describe_key(key_name).policy.rotate_after_days == 40
    assert same_record(_read_afresh(token)[key_name], km.describe_key(key_name))


def test_a_burst_of_changes_within_the_grace_period_compacts_once_per_compact_at(quiet, key_name: str) -> None:
    km = quiet
    km.create_key(key_name)
    changes = 40
    for days in range(1, changes + 1):
        keyring_of(km).with_policy(key_name, KeyPolicy(rotate_after_days=days))
    snapshots = [label for label in key_objects(token_of(km), key_name) if label.startswith(SNAPSHOT_PREFIX)]
    assert len(snapshots) <= 1 + changes // keyring_of(km).compact_at + 1, len(snapshots)


# -- records of keymgr before facts: read, used, and covered by the next snapshot ------------------


def _legacy_key(km, name: str, generation: int = 7, v1_state: str = "decrypt-only") -> KeyRecord:
    """Key ``name`` as keymgr before facts left it: v1 decrypt-only, v2 the primary, uses counted,
    one record object ``keymgr/key/NAME/GEN`` (MACed by the token's metadata MAC key)."""
    now = utc_now()
    versions = []
    for number, state, uses in ((1, v1_state, 40), (2, "active", 100)):
        key_id = keyring_of(km).new_key_id()
        objects.generate_key(token_of(km), KEK_WRAP, label=f"{name}/v{number}", key_id=key_id)
        kcv = objects.check_value(token_of(km), key_id)
        versions.append(KeyVersion(number, key_id, state, now, (("active", now),), kcv, uses))
    record = KeyRecord(name=name, profile="kw", primary=2, versions=tuple(versions),
                       policy=KeyPolicy(rotate_after_days=30, max_messages=1000), generation=generation, created=now)
    label, value = legacy_record(keyring_of(km), record)
    objects.write_data_object(token_of(km), application=APPLICATION, label=label, value=value)
    return record


def _shape(record: KeyRecord) -> tuple[object, ...]:
    return (record.name, record.profile, record.primary, record.policy, record.min_decryption_version,
            [(v.version, v.key_id, v.state, v.kcv) for v in record.versions])


@pytest.mark.slow
def test_a_record_of_keymgr_before_facts_is_read_used_and_upgraded(quiet, token: TokenUnderTest,
                                                                  key_name: str) -> None:
    km = quiet
    legacy = _legacy_key(km, key_name)
    keyring_of(km).reload()
    assert _shape(km.describe_key(key_name)) == _shape(legacy)
    assert [v.uses for v in km.describe_key(key_name).versions] == [40, 100]
    blob = km.encrypt(b"after the upgrade", key=key_name)
    with keymgr.KeyManager(token.uri()) as other:
        # every host reads the record as the same facts: its counts are taken once, not once per reader
        uses = [v.uses for v in other.describe_key(key_name).versions]
        assert uses == [v.uses for v in km.describe_key(key_name).versions]
        assert uses[0] == 40 and 101 <= uses[1] <= 100 + usage.block_for(1000), uses
        assert other.decrypt(blob) == b"after the upgrade"
    rotated = km.rotate(key_name)
    assert rotated.primary == 3 and [v.state for v in rotated.versions] == ["decrypt-only", "decrypt-only", "active"]
    keyring_of(km).compact_at, keyring_of(km).grace = 2, 0.0
    keyring_of(km).with_policy(key_name, KeyPolicy(rotate_after_days=60, max_messages=1000))
    left = key_objects(token_of(km), key_name)
    assert not any(label.startswith(LEGACY_PREFIX) for label in left), sorted(left)  # covered by a snapshot, gone
    record = km.describe_key(key_name)
    assert record.policy.rotate_after_days == 60
    assert same_record(_read_afresh(token)[key_name], record)
    with keymgr.KeyManager(token.uri()) as reader:
        assert reader.decrypt(blob) == b"after the upgrade"


def test_an_edited_record_of_keymgr_before_facts_is_not_authentic(quiet, token: TokenUnderTest,
                                                                 key_name: str) -> None:
    km = quiet
    legacy = _legacy_key(km, key_name)
    label, value = _one(km, key_name, LEGACY_PREFIX)
    edited = json.loads(value)
    edited["record"]["primary"] = 1
    with _replaced(token_of(km), label, value, canonical(edited)), pytest.raises(keymgr.IntegrityError,
                                                                             match="not authentic"):
        _read_afresh(token)
    assert _shape(_read_afresh(token)[key_name]) == _shape(legacy)


def test_of_two_generations_a_crash_left_the_newest_is_the_record(quiet, token: TokenUnderTest,
                                                                   key_name: str) -> None:
    """Before facts, an update wrote generation n+1 and then deleted n, and readers took the
    highest: a token upgraded after a crash between the two steps must read as n+1 did (here
    n+1 resumed a suspended version and raised the key's limit)."""
    km = quiet
    older = _legacy_key(km, key_name, generation=7, v1_state="suspended")
    v1, v2 = older.versions
    newer = replace(older, generation=8, policy=KeyPolicy(rotate_after_days=30, max_messages=2000),
                    versions=(replace(v1, state="decrypt-only", history=(("active", v1.created),
                                                                         ("suspended", v1.created))), v2))
    label, value = legacy_record(keyring_of(km), newer)
    objects.write_data_object(token_of(km), application=APPLICATION, label=label, value=value)
    assert _shape(_read_afresh(token)[key_name]) == _shape(newer)
def test_second_token_does_not_see_first_tokens_keys(softhsm: TokenUnderTest, key_name: str) -> None:
    a = keymgr.KeyManager(softhsm.uri())
    b = keymgr.KeyManager(softhsm.uri().replace("keymgr-A", "keymgr-B"))
    a.create_key(key_name)
    with pytest.raises(keymgr.KeyNotFoundError):
        b.describe_key(key_name)


@pytest.mark.parametrize("policy", [
    {"rotate_after_days": "7"}, {"rotate_after_days": 1.5}, {"rotate_after_days": 0}, {"rotate_after_days": -3},
    {"rotate_after_days": 10**30}, {"max_messages": True}, {"max_messages": 0}, {"max_messages": -1},
    {"backup": "no"}, {"auto_rotate": "yes"},
])
def test_a_bad_policy_is_refused_before_anything_is_written(km, key_name: str, policy: dict[str, object]) -> None:
    """A policy a reader would refuse (or misread: 0 messages is not "no limit") is a
    ConfigurationError naming the field, at create and at a change; the token's other keys go
    on working (a backup="no" policy once made every key of the token unusable)."""
    km.create_key(f"{key_name}-ok")
    with pytest.raises(keymgr.ConfigurationError, match=next(iter(policy))):
        km.create_key(key_name, **policy)  # type: ignore[arg-type]
    km.create_key(key_name)
    with pytest.raises(keymgr.ConfigurationError, match=next(iter(policy))):
        keyring_of(km).with_policy(key_name, KeyPolicy(**policy))  # type: ignore[arg-type]
    keyring_of(km).reload()
    assert km.decrypt(km.encrypt(b"x", key=f"{key_name}-ok")) == b"x"
    assert km.describe_key(key_name).policy == KeyPolicy()


@pytest.mark.parametrize("profile", ["kw", "gcm"])
def test_the_provenance_check_runs_once_per_key_object_and_again_after_the_session_reopens(
        softhsm: TokenUnderTest, key_name: str, profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-message path skips the attribute check only for the very version and key object
    that passed it: once the session's handles are gone (the module re-initialised), the next
    message checks the object found anew before it encrypts."""
    from keymgr.keyring import provenance

    checked: list[bytes] = []
    original = provenance.encrypt_refusal

    def counting(ts: object, record: KeyRecord, version: KeyVersion) -> str | None:
        checked.append(version.key_id)
        return original(ts, record, version)  # type: ignore[arg-type]

    monkeypatch.setattr(provenance, "encrypt_refusal", counting)
    with keymgr.KeyManager(softhsm.uri(), audit=False) as km:
        key_id = km.create_key(key_name, profile=profile).primary_version.key_id
        for _ in range(3):
            km.encrypt(b"m", key=key_name)
        assert checked == [key_id]
        token_of(km).reread()  # new session, new handles: the object must prove itself again
        for _ in range(3):
            km.encrypt(b"m", key=key_name)
        assert checked == [key_id, key_id]
