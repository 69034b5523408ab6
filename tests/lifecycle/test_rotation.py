"""Rotation and version states on real tokens (keymgr.lifecycle.rotation)."""

from __future__ import annotations

import pytest

import keymgr
from keymgr.hsm import objects
from keymgr.lifecycle import rotation
from tests._internals import keyring_of, token_of
from tests._keyring_helpers import eventually


def _states(record) -> dict[int, str]:
    return {v.version: v.state for v in record.versions}


@pytest.mark.slow
def test_data_under_v1_v2_v3_decrypts_after_two_rotations_and_retire_cuts_off_old(km, key_name: str) -> None:
    km.create_key(key_name)
    blobs = {1: km.encrypt(b"one", key=key_name)}
    assert km.rotate(key_name).primary == 2
    blobs[2] = km.encrypt(b"two", key=key_name)
    record = km.rotate(key_name)
    assert record.primary == 3
    blobs[3] = km.encrypt(b"three", key=key_name)
    assert _states(record) == {1: "decrypt-only", 2: "decrypt-only", 3: "active"}
    for number, plain in zip((1, 2, 3), (b"one", b"two", b"three"), strict=True):
        assert km.decrypt(blobs[number]) == plain
    record = km.retire(key_name, below=3, immediately=True)
    assert record.min_decryption_version == 3
    for number in (1, 2):
        with pytest.raises(keymgr.PolicyError, match="retired"):
            km.decrypt(blobs[number])
    assert km.decrypt(blobs[3]) == b"three"


def test_rotate_records_history_and_distinct_objects(km, key_name: str) -> None:
    v1 = km.create_key(key_name).primary_version
    record = km.rotate(key_name)
    v2 = record.primary_version
    assert v2.version == 2 and v2.key_id != v1.key_id and v2.kcv and v2.kcv != v1.kcv
    old = record.version(1)
    assert [s for s, _ in old.history] == ["active", "decrypt-only"]
    assert objects.key_attributes(token_of(km), v2.key_id).label == f"{key_name}/v2"
    keyring_of(km).reload()
    assert km.describe_key(key_name) == record


def test_suspend_blocks_decrypt_until_resume(km, key_name: str) -> None:
    km.create_key(key_name)
    blob = km.encrypt(b"x", key=key_name)
    km.rotate(key_name)
    km.suspend(key_name, 1)
    with pytest.raises(keymgr.PolicyError, match="suspended"):
        km.decrypt(blob)
    record = km.resume(key_name, 1)
    assert record.version(1).state == "decrypt-only"
    assert km.decrypt(blob) == b"x"


def test_suspended_primary_neither_encrypts_nor_resumes_to_active_after_rotation(km, key_name: str) -> None:
    km.create_key(key_name)
    km.suspend(key_name, 1)
    with pytest.raises(keymgr.PolicyError, match="suspended"):
        km.encrypt(b"x", key=key_name)
    km.resume(key_name, 1)
    assert km.describe_key(key_name).version(1).state == "active"
    km.suspend(key_name, 1)
    record = km.rotate(key_name)
    assert _states(record) == {1: "suspended", 2: "active"}
    assert _states(km.resume(key_name, 1)) == {1: "decrypt-only", 2: "active"}


@pytest.mark.slow
def test_compromised_decrypts_only_with_allow_compromised(km, token, key_name: str) -> None:
    km.create_key(key_name)
    blob = km.encrypt(b"secret", key=key_name)
    km.rotate(key_name)
    km.mark_compromised(key_name, 1)
    with pytest.raises(keymgr.PolicyError, match="compromised"):
        km.decrypt(blob)
    with keymgr.KeyManager(token.uri(), allow_compromised=True) as recovery:
        assert recovery.decrypt(blob) == b"secret"


@pytest.mark.parametrize("start,target", [
    ("active", "decrypt-only"),      # only by rotating
    ("decrypt-only", "active"),      # no way back to primary
    ("compromised", "suspended"),
    ("compromised", "decrypt-only"),
])
@pytest.mark.slow
def test_refused_transitions(km, key_name: str, start: str, target: str) -> None:
    km.create_key(key_name)
    version = 1
    if start != "active":
        km.rotate(key_name)
    if start == "compromised":
        km.mark_compromised(key_name, 1)
    before = km.describe_key(key_name)
    with pytest.raises(keymgr.PolicyError):
        rotation.transition(keyring_of(km), key_name, version, target)
    keyring_of(km).reload()
    assert km.describe_key(key_name).version(1).state == before.version(1).state


@pytest.mark.slow
def test_destroyed_only_through_destroy_and_resume_needs_suspended(km, key_name: str) -> None:
    km.create_key(key_name)
    km.rotate(key_name)
    with pytest.raises(keymgr.PolicyError, match="destroy"):
        rotation.transition(keyring_of(km), key_name, 1, "destroyed")
    with pytest.raises(keymgr.PolicyError, match="not suspended"):
        km.resume(key_name, 1)
    with pytest.raises(keymgr.ConfigurationError, match="unknown key state"):
        rotation.transition(keyring_of(km), key_name, 1, "frozen")


def test_pre_active_version_then_activate(km, key_name: str) -> None:
    km.create_key(key_name)
    record = km.rotate(key_name, activate=False)
    assert record.primary == 1 and _states(record) == {1: "active", 2: "pre-active"}
    blob = km.encrypt(b"still v1", key=key_name)
    record = km.activate(key_name, 2)
    assert record.primary == 2 and _states(record) == {1: "decrypt-only", 2: "active"}
    assert km.decrypt(blob) == b"still v1"
    with pytest.raises(keymgr.PolicyError, match="pre-active"):
        km.activate(key_name, 1)


def test_retire_cannot_cover_primary_or_go_down(km, key_name: str) -> None:
    km.create_key(key_name)
    km.rotate(key_name)
    with pytest.raises(keymgr.PolicyError, match="primary"):
        km.retire(key_name, below=3, immediately=True)
    km.retire(key_name, below=2, immediately=True)
    with pytest.raises(keymgr.PolicyError, match="already retired"):
        km.retire(key_name, below=1, immediately=True)


def test_cached_data_keys_obey_later_state_changes(softhsm, key_name: str) -> None:
    """A data key in the decrypt cache must not outlive a suspension or a retirement of its version."""
    with keymgr.KeyManager(softhsm.uri(), cache=True) as km:
        km.create_key(key_name)
        blob = km.encrypt(b"cached", key=key_name)
        for _ in range(3):  # in the cache, then served from it (its state check remembered as passed)
            assert km.decrypt(blob) == b"cached"
        km.rotate(key_name)
        km.suspend(key_name, 1)
        with pytest.raises(keymgr.PolicyError, match="suspended"):
            km.decrypt(blob)
        km.resume(key_name, 1)
        assert km.decrypt(blob) == b"cached"
        km.retire(key_name, below=2, immediately=True)
        with pytest.raises(keymgr.PolicyError, match="retired"):
            km.decrypt(blob)


def test_cached_data_keys_obey_a_suspension_made_by_another_process(softhsm, key_name: str) -> None:
    """The remembered state check is of one keyring record: another manager's suspension
    (another process, as far as this one can tell) replaces it once a re-read has seen it. The
    re-read runs in the background (the call that starts it goes on with the view it has), so
    the refusal comes within a deadline, not necessarily at the first call."""
    with keymgr.KeyManager(softhsm.uri(), cache=True) as km, keymgr.KeyManager(softhsm.uri()) as other:
        km.create_key(key_name)
        blob = km.encrypt(b"cached", key=key_name)
        for _ in range(3):
            assert km.decrypt(blob) == b"cached"
        other.rotate(key_name)
        other.suspend(key_name, 1)
        km.refresh_interval = 0.0  # re-read at every call rather than within its interval

        def refused() -> bool:
            try:
                assert km.decrypt(blob) == b"cached"
            except keymgr.PolicyError as exc:
                assert "suspended" in str(exc), exc
                return True
            return False

        eventually(refused, timeout=3.0, what="the cached data key obeys the other manager's suspension")
        with pytest.raises(keymgr.PolicyError, match="suspended"):  # and stays refused
            km.decrypt(blob)


def test_cached_encryption_key_stops_when_the_primary_is_suspended(softhsm, key_name: str) -> None:
    with keymgr.KeyManager(softhsm.uri(), cache=True) as km:
        km.create_key(key_name)
        km.encrypt(b"a", key=key_name)  # a data key is cached for this key now
        km.suspend(key_name, 1)
        with pytest.raises(keymgr.PolicyError, match="suspended"):
            km.encrypt(b"b", key=key_name)
        km.resume(key_name, 1)
        assert km.decrypt(km.encrypt(b"c", key=key_name)) == b"c"


def test_a_lock_directory_that_cannot_be_made_is_a_storage_error(km, key_name: str, tmp_path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """keymgr's machine locks live under TMPDIR; when that cannot hold them the caller gets one
    StorageError saying so, not an OSError from deep inside (and the key is untouched)."""
    import tempfile

    km.create_key(key_name)
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_bytes(b"")
    monkeypatch.setattr(tempfile, "tempdir", str(not_a_directory))
    with pytest.raises(keymgr.StorageError, match="TMPDIR must name a writable directory"):
        km.rotate(key_name)
    monkeypatch.undo()
    assert km.describe_key(key_name).primary == 1
