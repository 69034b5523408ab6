"""``rotate`` killed mid-way (SIGKILL at random moments), orphans, and concurrent rotation by two processes.

Rotation's promise (keymgr.rotation): a crash anywhere leaves the old primary or the new one,
never none and never two, and every message written before still decrypts. The child process
below rotates in a loop and, after each rotation, writes one message under the new primary
(atomically, so only whole messages count); the parent kills it at random moments and checks
the keyring from the token after every kill.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import keymgr
from keymgr import rotation
from keymgr.hsm import objects
from keymgr.keyring import version_template
from tests.conftest import TokenUnderTest

REPO = Path(__file__).resolve().parent.parent
KILLS = 24

CHILD = r"""
import os, sys
import keymgr
from keymgr._files import atomic_write
uri, name, out, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with keymgr.KeyManager(uri) as km:
    print("ready", flush=True)
    for i in range(rounds):
        record = km.rotate(name)
        blob = km.encrypt(b"child %d v%d" % (os.getpid(), record.primary), key=name)
        atomic_write(os.path.join(out, "%d-%d.cms" % (os.getpid(), i)), blob)
        print(record.primary, flush=True)
"""


def _child(token: TokenUnderTest, name: str, out: Path, rounds: int) -> subprocess.Popen[str]:
    env = {**os.environ, **token.env, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", CHILD, token.uri(), name, str(out), str(rounds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _check_keyring(km: keymgr.KeyManager, name: str) -> keymgr.KeyRecord:
    """Exactly one primary, it is the one active version, and every live version's object exists."""
    km.keyring.reload()
    record = km.describe_key(name)
    active = [v.version for v in record.versions if v.state == "active"]
    assert active == [record.primary], f"active versions {active}, primary {record.primary}"
    numbers = [v.version for v in record.versions]
    assert numbers == list(range(1, len(numbers) + 1))
    for v in record.versions:
        assert objects.key_exists(km.token, v.key_id), f"version {v.version} has no key object"
    return record


def _decrypts_everything(km: keymgr.KeyManager, expected: dict[Path | int, bytes], out: Path) -> int:
    """Every message the parent wrote and every whole message file of the children decrypts."""
    for where, plain in expected.items():
        if isinstance(where, int):
            continue
        assert km.decrypt(where.read_bytes()) == plain
    files = sorted(out.glob("*.cms"))
    for path in files:
        assert km.decrypt(path.read_bytes()).startswith(b"child ")
    return len(files)


def test_rotate_killed_at_random_moments(softhsm: TokenUnderTest, key_name: str, tmp_path: Path) -> None:
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    out = tmp_path / "messages"
    out.mkdir()
    mine = tmp_path / "parent"
    mine.mkdir()
    expected: dict[Path | int, bytes] = {}
    orphans_seen = kills = 0
    with keymgr.KeyManager(softhsm.uri()) as km:
        km.create_key(key_name)
        while kills < KILLS:
            plain = b"parent %d" % kills
            path = mine / f"{kills}.cms"
            path.write_bytes(km.encrypt(plain, key=key_name))
            expected[path] = plain
            child = _child(softhsm, key_name, out, rounds=10_000)
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready", child.stderr.read() if child.stderr else ""
            for _ in range(rng.randint(1, 3)):  # let it finish a few rotations, then kill it mid-way
                child.stdout.readline()
            time.sleep(rng.uniform(0.0, 0.03))
            if child.poll() is None:
                child.send_signal(signal.SIGKILL)
                kills += 1
            child.wait()
            child.stdout.close()
            if child.stderr is not None:
                child.stderr.close()
            record = _check_keyring(km, key_name)
            orphans_seen += len(rotation.orphans(km.keyring, record))
        messages = _decrypts_everything(km, expected, out)
        record = km.rotate(key_name)  # cleans up what the last kill left
        assert rotation.orphans(km.keyring, record) == []
        _check_keyring(km, key_name)
        _decrypts_everything(km, expected, out)
    print(f"\n{kills} kills, {len(record.versions)} versions, {messages} child messages, "
          f"{orphans_seen} orphan sightings after kills")
    assert len(record.versions) >= KILLS + 2  # at least one whole rotation per round, and the last one


def test_an_orphan_left_by_a_crash_is_destroyed_by_the_next_rotate(km, key_name: str) -> None:
    """The state a crash between key generation and the record write leaves, made by hand."""
    record = km.create_key(key_name)
    orphan_id = km.keyring.new_key_id()
    objects.generate_key(km.token, version_template(record.profile, record.policy), label=f"{key_name}/v2",
                         key_id=orphan_id)
    assert rotation.orphans(km.keyring, km.describe_key(key_name)) == [(f"{key_name}/v2", orphan_id)]
    assert km.describe_key(key_name).primary == 1  # the old primary is still the one
    blob = km.encrypt(b"v1", key=key_name)
    record = km.rotate(key_name)
    assert record.primary == 2 and record.primary_version.key_id != orphan_id
    assert not objects.key_exists(km.token, orphan_id)
    assert rotation.orphans(km.keyring, record) == []
    assert km.decrypt(blob) == b"v1"


def test_two_processes_rotating_at_once_leave_one_primary(softhsm: TokenUnderTest, key_name: str,
                                                          tmp_path: Path) -> None:
    rounds = 8
    with keymgr.KeyManager(softhsm.uri()) as km:
        km.create_key(key_name)
        children = [_child(softhsm, key_name, tmp_path, rounds) for _ in range(2)]
        reloads = 0
        while any(child.poll() is None for child in children):  # a reader racing the writers' deletions
            km.keyring.reload()
            assert km.describe_key(key_name).primary >= 1
            reloads += 1
        assert reloads > 0
        for child in children:
            _, err = child.communicate(timeout=120)
            assert child.returncode == 0, err
        record = _check_keyring(km, key_name)
        assert len(record.versions) == 1 + 2 * rounds
        assert rotation.orphans(km.keyring, record) == []
        assert _decrypts_everything(km, {}, tmp_path) == 2 * rounds


def test_a_lost_generation_race_is_a_clear_error(km, token: TokenUnderTest, key_name: str) -> None:
    """A writer that bypasses the lock with a stale record (another machine) is refused, not merged."""
    km.create_key(key_name)
    with keymgr.KeyManager(token.uri()) as other:
        stale = other.describe_key(key_name)
        km.rotate(key_name)
        with pytest.raises(keymgr.ConfigurationError, match="changed by another process"):
            other.keyring.write(stale)
    assert _check_keyring(km, key_name).primary == 2
