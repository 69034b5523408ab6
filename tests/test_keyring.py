"""Named keys and versions in the token; metadata protected against edits."""

from __future__ import annotations

import json

import pytest

import keymgr
from keymgr.hsm import objects
from keymgr.keyring import APPLICATION, RECORD_PREFIX
from keymgr.templates import KEK_GCM, KEK_WRAP, ROLE_ATTRIBUTES
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
    km.keyring.reload()
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
    info = objects.key_attributes(km.token, record.primary_version.key_id)
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
    with pytest.raises(keymgr.ConfigurationError, match="already exists"):
        km.create_key(key_name)
    for bad in ["", "a/b", "x" * 65, "-lead", "sp ace", "é"]:
        with pytest.raises(keymgr.ConfigurationError):
            km.create_key(bad)
    with pytest.raises(keymgr.ConfigurationError, match="profile"):
        km.create_key(key_name + "x", profile="ecb")


def test_unknown_key(km) -> None:
    with pytest.raises(keymgr.KeyNotFoundError, match="no key named"):
        km.describe_key("does-not-exist")


def _record_objects(km, name: str) -> list[tuple[str, bytes]]:
    return [(label, value) for label, value in objects.read_data_objects(km.token, application=APPLICATION)
            if label.startswith(f"{RECORD_PREFIX}{name}/")]


def test_edited_metadata_is_detected(km, key_name: str) -> None:
    km.create_key(key_name)
    [(label, value)] = _record_objects(km, key_name)
    envelope = json.loads(value)
    envelope["record"]["primary"] = 7  # an attacker with the PIN edits the record
    objects.destroy_data_object(km.token, application=APPLICATION, label=label)
    objects.write_data_object(km.token, application=APPLICATION, label=label,
                              value=json.dumps(envelope).encode())
    with pytest.raises(keymgr.IntegrityError, match="not authentic"):
        km.keyring.reload()
    objects.destroy_data_object(km.token, application=APPLICATION, label=label)


def test_record_moved_to_another_name_is_detected(km, key_name: str) -> None:
    km.create_key(key_name)
    [(label, value)] = _record_objects(km, key_name)
    forged_label = f"{RECORD_PREFIX}{key_name}-evil/1"
    objects.write_data_object(km.token, application=APPLICATION, label=forged_label, value=value)
    try:
        with pytest.raises(keymgr.IntegrityError):
            km.keyring.reload()
    finally:
        objects.destroy_data_object(km.token, application=APPLICATION, label=forged_label)


def test_newer_generation_wins_and_old_is_cleaned(km, key_name: str) -> None:
    record = km.create_key(key_name)
    from dataclasses import replace

    km.keyring.write(replace(record, policy=keymgr.KeyPolicy(rotate_after_days=90)))
    labels = [label for label, _ in _record_objects(km, key_name)]
    assert labels == [f"{RECORD_PREFIX}{key_name}/2"]
    km.keyring.reload()
    assert km.describe_key(key_name).policy.rotate_after_days == 90


def _runs_per_write(km, record, monkeypatch: pytest.MonkeyPatch) -> int:
    from keymgr.hsm.sessions import TokenSession

    calls = {"n": 0}
    real_run = TokenSession.run

    def counting_run(self: TokenSession, operation: str, call):
        calls["n"] += 1
        return real_run(self, operation, call)

    with monkeypatch.context() as patch:
        patch.setattr(TokenSession, "run", counting_run)
        km.keyring.write(record)
    return calls["n"]


def test_a_write_costs_the_same_token_calls_at_any_generation(km, key_name: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Each write destroys the generations still on the token, not every number below its own
    (a find per past generation made a key's record writes slower with every reservation)."""
    record = km.create_key(key_name)
    early = _runs_per_write(km, km.describe_key(key_name), monkeypatch)
    for _ in range(30):
        record = km.keyring.write(km.describe_key(key_name))
    assert record.generation >= 30
    assert _runs_per_write(km, km.describe_key(key_name), monkeypatch) == early
    labels = [label for label, _ in _record_objects(km, key_name)]
    assert labels == [f"{RECORD_PREFIX}{key_name}/{record.generation + 1}"]


def test_generations_a_crash_left_behind_are_cleaned_by_the_next_write(km, key_name: str) -> None:
    record = km.create_key(key_name)
    [(_, value)] = _record_objects(km, key_name)
    for stale in (f"{RECORD_PREFIX}{key_name}/0", f"{RECORD_PREFIX}{key_name}-other/1"):
        objects.write_data_object(km.token, application=APPLICATION, label=stale, value=value)
    try:
        km.keyring.write(record)
        labels = sorted(label for label, _ in objects.read_data_objects(km.token, application=APPLICATION)
                        if label.startswith(f"{RECORD_PREFIX}{key_name}"))
        assert labels == [f"{RECORD_PREFIX}{key_name}-other/1", f"{RECORD_PREFIX}{key_name}/2"]
    finally:
        objects.destroy_data_object(km.token, application=APPLICATION, label=f"{RECORD_PREFIX}{key_name}-other/1")


def test_second_token_does_not_see_first_tokens_keys(softhsm: TokenUnderTest, key_name: str) -> None:
    a = keymgr.KeyManager(softhsm.uri())
    b = keymgr.KeyManager(softhsm.uri().replace("keymgr-A", "keymgr-B"))
    a.create_key(key_name)
    with pytest.raises(keymgr.KeyNotFoundError):
        b.describe_key(key_name)
