"""Faults injected into real PKCS#11 calls (tests/faults.py): the right error, recovery, no half-state.

For each fault kind keymgr must surface the error a caller can act on
(TokenRemovedError for a removed device, TokenError carrying the CKR code
otherwise), recover where the design says it does (a lost session is reopened
and logged in again, the call retried once; the next call after a removal
finds the token again), and leave nothing half-done: no output file from the
CLI, no keyring change that reads back differently on different readers.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from keymgr import KeyManager, errors
from keymgr.cli import cli
from keymgr.keyring.store import SNAPSHOT_PREFIX, KeyPolicy, KeyRecord
from tests._internals import keyring_of, token_of
from tests._keyring_helpers import eventually, key_objects, same_record
from tests.conftest import softhsm_token
from tests.faults import FaultInjector, injected

#: every test here is slow (a fault injected at every step of create, rotate and keyring changes):
#: `pytest -m "not slow"` skips the module, CI runs it
pytestmark = pytest.mark.slow

CTX = {"tenant": "acme"}


@pytest.fixture
def faults() -> Iterator[FaultInjector]:
    with injected() as injector:
        yield injector


@pytest.fixture
def key(manager: KeyManager) -> str:
    name = f"flt-{uuid.uuid4().hex[:10]}"
    manager.create_key(name)
    return name


@pytest.mark.parametrize("operation", ["wrap data key", "read data objects"])
def test_removed_device_is_token_removed_and_the_next_call_recovers(key: str, faults: FaultInjector,
                                                                     operation: str) -> None:
    """A manager's first call reads the keyring ("read data objects" on the caller's path; later
    re-reads run in the background: the next test), then wraps the data key."""
    with KeyManager(softhsm_token().uri()) as manager:
        fault = faults.add("removed", operation)
        with pytest.raises(errors.TokenRemovedError) as info:
            manager.encrypt(b"x", key=key, context=CTX)
        assert info.value.code == "CKR_DEVICE_REMOVED" and fault.hits == [operation]
        assert "not present" in str(info.value) or "removed" in str(info.value)
        blob = manager.encrypt(b"x", key=key, context=CTX)  # the next call finds the token again
        assert manager.decrypt(blob, context=CTX) == b"x"


def test_removed_device_in_a_background_refresh_is_no_callers_error(manager: KeyManager, key: str,
                                                                    faults: FaultInjector) -> None:
    """A re-read runs in a background thread while calls go on with the view they have: a removal
    there reaches no caller, and a later re-read still brings another process's change."""
    manager.refresh_interval = 0  # every call starts a re-read
    try:
        fault = faults.add("removed", "read data objects")
        blob = manager.encrypt(b"x", key=key, context=CTX)
        eventually(lambda: fault.hits, what="the background re-read met the removal")
        assert manager.decrypt(blob, context=CTX) == b"x"
        faults.clear()
        with KeyManager(softhsm_token().uri()) as other:
            other.rotate(key)
        eventually(lambda: manager.describe_key(key).primary == 2, what="the next re-read saw the rotation")
        assert manager.decrypt(blob, context=CTX) == b"x"
    finally:
        manager.refresh_interval = 1.0


def test_closed_session_is_reopened_logged_in_and_retried(manager: KeyManager, key: str,
                                                          faults: FaultInjector) -> None:
    """The real session is closed under keymgr (which logs the process out): SoftHSM answers
    CKR_SESSION_HANDLE_INVALID, keymgr opens a new session, logs in again with the PIN that
    worked, and the one call succeeds, invisibly to the caller."""
    blob = manager.encrypt(b"secret", key=key, context=CTX)
    before = token_of(manager)._session  # noqa: SLF001
    fault = faults.add("session-closed", "unwrap data key")
    assert manager.decrypt(blob, context=CTX) == b"secret"
    assert fault.hits == ["unwrap data key"]
    assert faults.operations.count("unwrap data key") == 2  # on the dead handle, then on the new session
    assert token_of(manager)._session is not before  # noqa: SLF001
    assert manager.list_keys()  # private objects are visible again: logged in


def test_session_lost_twice_is_a_token_error_with_its_code(manager: KeyManager, key: str,
                                                           faults: FaultInjector) -> None:
    faults.add("handle-invalid", "wrap data key", times=2)
    with pytest.raises(errors.TokenError) as info:
        manager.encrypt(b"x", key=key, context=CTX)
    assert not isinstance(info.value, errors.TokenRemovedError)
    assert info.value.code == "CKR_SESSION_HANDLE_INVALID"
    assert manager.encrypt(b"x", key=key, context=CTX)


@pytest.mark.parametrize(("kind", "code"), [("device-error", "CKR_DEVICE_ERROR"), ("host-memory", "CKR_HOST_MEMORY")])
def test_device_errors_carry_their_code_and_are_not_removal(manager: KeyManager, key: str, faults: FaultInjector,
                                                            kind: str, code: str) -> None:
    """CKR_DEVICE_ERROR on a token that still answers C_GenerateRandom is the token's error, not a removal."""
    blob = manager.encrypt(b"x", key=key, context=CTX)
    faults.add(kind, "unwrap data key")
    with pytest.raises(errors.TokenError) as info:
        manager.decrypt(blob, context=CTX)
    assert type(info.value) is errors.TokenError and info.value.code == code
    assert manager.decrypt(blob, context=CTX) == b"x"


# -- the keyring: never half-written ---------------------------------------------------------------


def _consistent(manager: KeyManager, name: str) -> dict[str, KeyRecord]:
    """Reload every record from the token (each MAC checked: one forged or torn record anywhere
    fails the reload) and check that the record of ``name``, if there is one, names live key
    objects. (Only this test's key: other tests share the token, and some destroy key objects
    under their records on purpose.)"""
    from keymgr.hsm import objects

    keyring_of(manager).reload()
    records = {r.name: r for r in manager.list_keys()}
    for record in [records[name]] if name in records else []:
        for version in record.versions:
            if version.state != "destroyed":
                assert objects.key_exists(token_of(manager), version.key_id), (record.name, version.version)
    return records


@pytest.mark.parametrize(("kind", "operation", "after"), [
    ("removed", "generate kek-wrap key", False),
    ("device-error", "generate kek-wrap key", True),
    ("removed", "read key check value", False),
    ("removed", "write data object", False),
    ("host-memory", "write data object", True),
    ("handle-invalid", "write data object", True),
])
@pytest.mark.slow
def test_fault_during_key_create_leaves_the_keyring_consistent(manager: KeyManager, faults: FaultInjector,
                                                               kind: str, operation: str, after: bool) -> None:
    name = f"flt-{uuid.uuid4().hex[:10]}"
    faults.add(kind, operation, after=after)
    try:
        manager.create_key(name)
        created = True
    except errors.TokenError:
        created = False
    faults.clear()
    records = _consistent(manager, name)
    if created:
        assert name in records
    elif name in records:  # the record was written and only the answer was lost
        assert after and operation == "write data object"
    if name not in records:
        manager.create_key(name)  # a retry works: no stale record or object blocks the name
    record = _consistent(manager, name)[name]
    blob = manager.encrypt(b"x", key=name)
    assert manager.decrypt(blob) == b"x" and record.primary == 1
    assert _key_objects(manager, f"{name}/v1") == [record.primary_version.key_id]  # no orphan left behind


def _key_objects(manager: KeyManager, label: str) -> list[bytes]:
    from pkcs11 import Attribute, ObjectClass

    return token_of(manager).run("list key objects (test)", lambda session: [
        bytes(o[Attribute.ID]) for o in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                                             Attribute.LABEL: label})])


@contextmanager
def _compacting(manager: KeyManager, on: bool = True) -> Iterator[None]:
    """Every change of a key also compacts it into a snapshot and destroys what the snapshot covers
    at once (compact_at 2, no grace period), so "destroy data object" is on a change's path; no
    background re-read meanwhile (it could take a fault meant for the change)."""
    keyring = keyring_of(manager)
    saved = keyring.compact_at, keyring.grace, keyring.refresh_interval
    if on:
        keyring.compact_at, keyring.grace, keyring.refresh_interval = 2, 0.0, 3600.0
    try:
        yield
    finally:
        keyring.compact_at, keyring.grace, keyring.refresh_interval = saved


def _read_afresh(name: str) -> KeyRecord:
    with KeyManager(softhsm_token().uri()) as reader:
        return reader.describe_key(name)


@pytest.mark.parametrize(("kind", "operation", "after"), [
    ("removed", "write data object", False),
    ("host-memory", "write data object", True),
    ("removed", "destroy data object", False),
])
def test_fault_during_a_keyring_change_leaves_it_whole_or_absent(manager: KeyManager, key: str,
                                                                 faults: FaultInjector, kind: str, operation: str,
                                                                 after: bool) -> None:
    """A change is one new fact object; past compact_at objects the writer then writes a snapshot
    and destroys what it covers. A fault before the fact is written leaves the change absent;
    after it (the answer lost, or the clean-up failed), whole. Either way every reader folds the
    same record, and the next change cleans up what was left."""
    with _compacting(manager):
        faults.add(kind, operation, after=after)
        if operation == "destroy data object":  # the clean-up after the change is best effort
            keyring_of(manager).with_policy(key, KeyPolicy(max_messages=1000))
        else:
            with pytest.raises(errors.TokenError):
                keyring_of(manager).with_policy(key, KeyPolicy(max_messages=1000))
        faults.clear()
        record = _consistent(manager, key)[key]
        assert (record.policy.max_messages == 1000) == (after or operation == "destroy data object")
        assert same_record(_read_afresh(key), record)
        keyring_of(manager).with_policy(key, KeyPolicy(max_messages=2000))  # and the next change cleans up
        record = _consistent(manager, key)[key]
        assert record.policy.max_messages == 2000
        assert same_record(_read_afresh(key), record)
        left = list(key_objects(token_of(manager), key))
        # what the failed clean-up left is gone; one snapshot and at most compact_at (2) newer facts stay
        assert sum(label.startswith(SNAPSHOT_PREFIX) for label in left) == 1 and len(left) <= 2, left


# -- the CLI: no partial output file ---------------------------------------------------------------


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--token", softhsm_token().uri(), *args], catch_exceptions=False)
    return result.exit_code, result.stderr


@pytest.mark.parametrize("kind", ["removed", "device-error", "host-memory", "handle-invalid"])
def test_cli_encrypt_fault_leaves_no_output(tmp_path: Path, key: str, faults: FaultInjector, kind: str) -> None:
    """The fault hits while the output's temporary file is open (the data key is wrapped after it is made)."""
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    faults.add(kind, "wrap data key", times=2)
    code, stderr = _cli("encrypt", "--key", key, str(src), "-o", str(tmp_path / "out.kmg"))
    assert code != 0 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.bin"]


@pytest.mark.parametrize("kind", ["removed", "device-error", "host-memory", "handle-invalid"])
def test_cli_decrypt_fault_leaves_no_output(tmp_path: Path, manager: KeyManager, key: str, faults: FaultInjector,
                                            kind: str) -> None:
    sealed = io.BytesIO()
    manager.encrypt_stream(io.BytesIO(os.urandom(3 * 1024 * 1024)), sealed, key=key)
    (tmp_path / "in.kmg").write_bytes(sealed.getvalue())
    faults.add(kind, "unwrap data key", times=2)
    code, stderr = _cli("decrypt", str(tmp_path / "in.kmg"), "-o", str(tmp_path / "out.bin"))
    assert code != 0 and len(stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.kmg"]


def test_cli_decrypt_truncated_mid_stream_leaves_no_output(tmp_path: Path, manager: KeyManager, key: str) -> None:
    """Two of three segments verify and are written to the temporary file; the cut third fails: nothing remains."""
    sealed = io.BytesIO()
    manager.encrypt_stream(io.BytesIO(os.urandom(3 * 1024 * 1024)), sealed, key=key)
    (tmp_path / "in.kmg").write_bytes(sealed.getvalue()[:-100])
    code, stderr = _cli("decrypt", str(tmp_path / "in.kmg"), "-o", str(tmp_path / "out.bin"))
    assert code == 4 and "failed authentication" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.kmg"]


@pytest.mark.parametrize(("kind", "operation", "after"), [
    ("removed", "generate kek-wrap key", False),
    ("removed", "write data object", False),
    ("host-memory", "write data object", True),
    ("device-error", "destroy data object", False),
])
def test_fault_during_rotate_never_half_rotates(manager: KeyManager, key: str, faults: FaultInjector, kind: str,
                                                operation: str, after: bool) -> None:
    """A rotation is a pending fact, the new version's object and its version fact (and, past
    compact_at objects, a snapshot and the destruction of what it covers): after any fault the key
    has either its old primary and no new object, or the new primary, never a version without a fact."""
    blob = manager.encrypt(b"old", key=key, context=CTX)
    with _compacting(manager, on=operation == "destroy data object"):  # a rotation's writes then destroy
        faults.add(kind, operation, after=after)
        if operation == "destroy data object":
            # the clean-up after the commit is best effort: the rotation is done and says so
            # (telling the caller it failed would make them rotate again)
            assert manager.rotate(key).primary == 2
        else:
            with pytest.raises(errors.TokenError):
                manager.rotate(key)
        faults.clear()
    record = _consistent(manager, key)[key]
    assert record.primary in (1, 2) and len(record.versions) == record.primary
    assert len(_key_objects(manager, f"{key}/v2")) == (record.primary == 2)
    assert manager.decrypt(blob, context=CTX) == b"old"
    rotated = manager.rotate(key) if record.primary == 1 else record
    assert rotated.primary == 2 and manager.decrypt(manager.encrypt(b"new", key=key), context=None) == b"new"


@pytest.mark.parametrize("kind", ["device-error", "handle-invalid", "removed"])
def test_a_failed_session_is_closed_not_leaked(faults: FaultInjector, kind: str) -> None:
    """After a fault on a handle that still works, keymgr closes the session it gives up: a leaked one
    would keep the process logged in, and the SO login of a backup would then fail
    (CKR_USER_ANOTHER_ALREADY_LOGGED_IN; found by this suite, fixed in TokenSession.run)."""
    from keymgr.hsm import open_token
    from tests.conftest import SO_PIN

    ts = open_token(softhsm_token("keymgr-B").uri())
    faults.add(kind, "generate random", times=2)
    with pytest.raises(errors.TokenError):
        ts.run("generate random", lambda session: session.generate_random(64))
    faults.clear()
    ts.close()  # logs the process out, unless a session was leaked
    so = ts.found.token.open(rw=True, so_pin=SO_PIN)
    so.close()
