"""``rotate`` killed mid-way (SIGKILL at random moments), orphans, and concurrent changes by two processes.

Rotation's promise (keymgr.lifecycle.rotation): a crash anywhere leaves the old primary or the new one,
never none and never two, and every message written before still decrypts. The child process
below rotates in a loop and, after each rotation, writes one message under the new primary
(atomically, so only whole messages count); the parent kills it at random moments and checks
the keyring from the token after every kill. A key object a crash left between its ``pending``
fact and its ``version`` fact is kept while another host might still be between the two steps,
and destroyed by a rotation once the pending fact is ``orphan_grace`` old (the keyring's clock
is moved here: tests/_keyring_helpers.WallClock).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

import keymgr
from keymgr.hsm import objects
from keymgr.keyring.store import KeyPolicy, version_template
from keymgr.lifecycle import rotation
from tests._crash_token import crash_token
from tests._internals import clocked, keyring_of, token_of
from tests._keyring_helpers import WallClock, same_record
from tests.conftest import TokenUnderTest

REPO = Path(__file__).resolve().parents[2]
KILLS = 24

CHILD = r"""
import os, sys
import pytest

import keymgr
from keymgr.files import atomic_write
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
    keyring_of(km).reload()
    record = km.describe_key(name)
    active = [v.version for v in record.versions if v.state == "active"]
    assert active == [record.primary], f"active versions {active}, primary {record.primary}"
    numbers = [v.version for v in record.versions]
    assert numbers == list(range(1, len(numbers) + 1))
    for v in record.versions:
        assert objects.key_exists(token_of(km), v.key_id), f"version {v.version} has no key object"
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


@pytest.mark.slow
def test_rotate_killed_at_random_moments(key_name: str, tmp_path: Path) -> None:
    crash = crash_token()  # its own token: a kill inside C_GenerateKey can leave a half-made object, and
    softhsm = crash.token  # one inside C_Login a short token file (mended below, tests/_crash_token.py)
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    out = tmp_path / "messages"
    out.mkdir()
    mine = tmp_path / "parent"
    mine.mkdir()
    expected: dict[Path | int, bytes] = {}
    orphans_seen = kills = 0
    clock = WallClock()
    with clocked(keymgr.KeyManager(softhsm.uri()), wall_clock=clock) as km:
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
            crash.mend()  # before this process reads the token again
            child.stdout.close()
            if child.stderr is not None:
                child.stderr.close()
            record = _check_keyring(km, key_name)
            orphans_seen += len(rotation.orphans(keyring_of(km), record))
        messages = _decrypts_everything(km, expected, out)
        left = rotation.orphans(keyring_of(km), km.describe_key(key_name))
        record = km.rotate(key_name)  # another host could still be between generating a key and its fact
        assert all(objects.key_exists(token_of(km), key_id) for _, key_id in left), "an orphan went before its grace"
        clock.advance(keyring_of(km).orphan_grace + timedelta(minutes=1))
        record = km.rotate(key_name)  # cleans up what every kill left
        assert rotation.orphans(keyring_of(km), record) == []
        assert not any(objects.key_exists(token_of(km), key_id) for _, key_id in left)
        _check_keyring(km, key_name)
        _decrypts_everything(km, expected, out)
    print(f"\n{kills} kills, {len(record.versions)} versions, {messages} child messages, "
          f"{orphans_seen} orphan sightings after kills, token file mended {crash.mended} times")
    assert len(record.versions) >= KILLS + 3  # at least one whole rotation per round, and the last two


@pytest.mark.slow
@pytest.mark.requires("aes-keygen", "hmac-sha256", "data-objects")
def test_an_orphan_left_by_a_crash_is_destroyed_once_its_pending_fact_is_old(token: TokenUnderTest,
                                                                               key_name: str) -> None:
    """The state a crash between key generation and the version fact leaves, made by hand: the
    pending fact names the new object, no version fact does. Until the pending fact is
    orphan_grace old (by the keyring's clock) a rotation keeps the object (another host may be
    between the two steps); after, the next rotation destroys it. An object that no fact names
    is never touched."""
    clock = WallClock()
    with clocked(keymgr.KeyManager(token.uri()), wall_clock=clock) as km:
        record = km.create_key(key_name)
        template = version_template(record.profile, record.policy)
        orphan_id, stray_id = keyring_of(km).new_key_id(), keyring_of(km).new_key_id()
        keyring_of(km).add(key_name, "pending", {"kid": orphan_id.hex(), "num": 2})  # what rotate writes first
        objects.generate_key(token_of(km), template, label=f"{key_name}/v2", key_id=orphan_id)  # then the crash
        objects.generate_key(token_of(km), template, label=f"{key_name}/v9", key_id=stray_id)  # no fact names it
        try:
            assert sorted(rotation.orphans(keyring_of(km), km.describe_key(key_name))) == sorted(
                [(f"{key_name}/v2", orphan_id), (f"{key_name}/v9", stray_id)])
            assert km.describe_key(key_name).primary == 1  # the old primary is still the one
            blob = km.encrypt(b"v1", key=key_name)
            clock.advance(keyring_of(km).orphan_grace - timedelta(minutes=5))
            record = km.rotate(key_name)
            assert record.primary == 2 and record.primary_version.key_id not in (orphan_id, stray_id)
            assert objects.key_exists(token_of(km), orphan_id), "destroyed within its grace period"
            clock.advance(timedelta(minutes=10))
            record = km.rotate(key_name)
            assert record.primary == 3 and len(record.versions) == 3
            assert not objects.key_exists(token_of(km), orphan_id)
            assert objects.key_exists(token_of(km), stray_id)
            assert rotation.orphans(keyring_of(km), record) == [(f"{key_name}/v9", stray_id)]
            assert km.decrypt(blob) == b"v1"
        finally:
            objects.destroy_key(token_of(km), stray_id)


@pytest.mark.slow
def test_two_processes_rotating_at_once_leave_one_primary(softhsm: TokenUnderTest, key_name: str,
                                                          tmp_path: Path) -> None:
    rounds = 8
    with keymgr.KeyManager(softhsm.uri()) as km:
        km.create_key(key_name)
        children = [_child(softhsm, key_name, tmp_path, rounds) for _ in range(2)]
        reloads = 0
        while any(child.poll() is None for child in children):  # a reader racing the writers' deletions
            keyring_of(km).reload()
            assert km.describe_key(key_name).primary >= 1
            reloads += 1
        assert reloads > 0
        for child in children:
            _, err = child.communicate(timeout=120)
            assert child.returncode == 0, err
        record = _check_keyring(km, key_name)
        assert len(record.versions) == 1 + 2 * rounds
        assert rotation.orphans(keyring_of(km), record) == []
        assert _decrypts_everything(km, {}, tmp_path) == 2 * rounds


@pytest.mark.slow
def test_changes_made_from_stale_views_at_once_all_land_and_every_reader_agrees(km, token: TokenUnderTest,
                                                                                 key_name: str) -> None:
    """Writers never read-modify-write: a change made from a view that misses another's change
    (another machine, bypassing this one's lock) lands next to it instead of undoing it, and every
    reader folds the same record. Here one manager rotates while the other, still seeing v1 as the
    primary, changes the policy; then both change the policy at the same moment, each without
    seeing the other's: one of the two wins, the same one on every reader."""
    km.create_key(key_name)
    km.refresh_interval = 3600.0  # each manager keeps the view it has until it reloads
    with keymgr.KeyManager(token.uri()) as other, keymgr.KeyManager(token.uri()) as third:
        other.refresh_interval = 3600.0
        assert other.describe_key(key_name).primary == 1
        km.rotate(key_name)
        assert keyring_of(other).current(key_name).primary == 1  # stale: it has not seen the rotation
        keyring_of(other).with_policy(key_name, KeyPolicy(rotate_after_days=90))
        records = []
        for manager in (km, other, third):
            keyring_of(manager).reload()
            records.append(manager.describe_key(key_name))
        assert all(same_record(r, records[0]) for r in records), records
        assert records[0].primary == 2 and records[0].policy.rotate_after_days == 90
        assert _check_keyring(km, key_name).primary == 2

        start = threading.Barrier(2)
        wanted = {km: KeyPolicy(rotate_after_days=7), other: KeyPolicy(rotate_after_days=8)}

        def change(manager: keymgr.KeyManager) -> None:
            start.wait(timeout=10)
            keyring_of(manager).with_policy(key_name, wanted[manager])

        threads = [threading.Thread(target=change, args=(m,)) for m in wanted]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        records = []
        for manager in (km, other, third):
            keyring_of(manager).reload()
            records.append(manager.describe_key(key_name))
        policies = [f for f in keyring_of(third).facts(key_name) if f.kind == "policy"]
        assert len(policies) == 3, policies  # both racing changes landed, next to the first
        assert all(same_record(r, records[0]) for r in records), records
        assert records[0].policy in wanted.values()
        assert records[0].primary == 2
