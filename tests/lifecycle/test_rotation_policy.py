"""Cryptoperiods and use limits: max_messages, the GCM nonce bound, due, auto-rotation (keymgr.lifecycle.usage)."""

from __future__ import annotations

from datetime import timedelta

import pytest

import keymgr
from keymgr._time import parse_utc
from keymgr.keyring.store import KeyPolicy, KeyRecord, KeyVersion
from keymgr.lifecycle import rotation, usage
from tests._internals import clocked, keyring_of


class Clock:
    """A wall clock the test moves (the keyring's clock dates versions and ends cryptoperiods)."""

    def __init__(self, start: str = "2030-01-01T00:00:00Z") -> None:
        self.at = parse_utc(start)

    def __call__(self) -> str:
        return self.at.isoformat().replace("+00:00", "Z")

    def advance(self, days: float) -> None:
        self.at += timedelta(days=days)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def timed_km(softhsm, clock: Clock):
    with clocked(keymgr.KeyManager(softhsm.uri()), wall_clock=clock) as manager:
        yield manager


@pytest.mark.slow
def test_max_messages_refuses_at_the_limit_and_rotation_resets(km, key_name: str) -> None:
    km.create_key(key_name, max_messages=5)
    blobs = [km.encrypt(b"m%d" % i, key=key_name) for i in range(5)]
    with pytest.raises(keymgr.PolicyError, match="limit of 5"):
        km.encrypt(b"one too many", key=key_name)
    assert km.describe_key(key_name).primary_version.uses == 5
    km.rotate(key_name)
    assert km.decrypt(km.encrypt(b"fresh", key=key_name)) == b"fresh"
    assert [km.decrypt(b) for b in blobs] == [b"m%d" % i for i in range(5)]


@pytest.mark.slow
def test_limit_is_shared_by_processes_through_the_record(km, token, key_name: str) -> None:
    """A second manager (as another process would) reserves from the same count."""
    km.create_key(key_name, max_messages=4)
    with keymgr.KeyManager(token.uri()) as other:
        km.encrypt(b"a", key=key_name)
        other.encrypt(b"b", key=key_name)
        km.encrypt(b"c", key=key_name)
        other.encrypt(b"d", key=key_name)
        for manager in (km, other):
            with pytest.raises(keymgr.PolicyError, match="limit"):
                manager.encrypt(b"e", key=key_name)


@pytest.mark.slow
def test_uses_are_reserved_in_growing_blocks_not_written_per_message(km, key_name: str) -> None:
    limit = 100_000
    record = km.create_key(key_name, max_messages=limit)
    first = usage.block_for(limit)
    assert first == usage.FIRST_BLOCK
    sizes = [first, 2 * first, 4 * first]
    for _ in range(sum(sizes) + 1):  # three blocks spent, one use into the fourth
        km.encrypt(b"x", key=key_name)
    keyring_of(km).reload()
    after = km.describe_key(key_name)
    assert after.primary_version.uses == sum(sizes) + 8 * first  # each block twice the last
    assert after.generation - record.generation == 4  # four record writes for 1,793 messages


def test_block_sizes_double_up_to_a_sixteenth_of_the_limit_and_max_block() -> None:
    assert [usage.block_for(100_000, previous) for previous in (0, 256, 512, 4096)] == [256, 512, 1024, 6250]
    assert usage.block_for(2**32, usage.MAX_BLOCK) == usage.MAX_BLOCK
    assert usage.block_for(2**32, 2**19) == usage.MAX_BLOCK == 2**20
    assert usage.block_for(1_000, 0) == 62 and usage.block_for(10, 5) == 1


@pytest.mark.slow
def test_a_new_version_starts_with_a_small_block_again(km, key_name: str) -> None:
    km.create_key(key_name, max_messages=100_000)
    for _ in range(usage.FIRST_BLOCK + 1):
        km.encrypt(b"x", key=key_name)
    km.rotate(key_name)
    km.encrypt(b"y", key=key_name)
    keyring_of(km).reload()
    assert km.describe_key(key_name).primary_version.uses == usage.FIRST_BLOCK


@pytest.mark.slow
def test_at_the_limit_auto_rotate_rotates(softhsm, key_name: str) -> None:
    with keymgr.KeyManager(softhsm.uri()) as km:
        km.create_key(key_name, max_messages=3, auto_rotate=True)
        blobs = [km.encrypt(b"%d" % i, key=key_name) for i in range(7)]
        record = km.describe_key(key_name)
        assert record.primary == 3
        assert [v.uses for v in record.versions] == [3, 3, 1]
        assert [km.decrypt(b) for b in blobs] == [b"%d" % i for i in range(7)]


def _one_version(profile: str, policy: KeyPolicy) -> KeyRecord:
    return KeyRecord("k", profile, 1, (KeyVersion(1, bytes(16), "active", "2030-01-01T00:00:00Z"),), policy)


def test_gcm_profile_is_bounded_by_the_random_nonce_limit() -> None:
    assert usage.limit_for(_one_version("gcm", KeyPolicy())) == 2**32
    assert usage.limit_for(_one_version("gcm", KeyPolicy(max_messages=10))) == 10
    assert usage.limit_for(_one_version("kw", KeyPolicy())) is None
    assert usage.block_for(10) == 1 and usage.block_for(2**32) == usage.FIRST_BLOCK


@pytest.mark.slow
@pytest.mark.requires("aes-gcm")
def test_gcm_key_counts_uses_without_max_messages(km, token, key_name: str) -> None:
    km.create_key(key_name, profile="gcm")
    km.encrypt(b"x", key=key_name)
    assert km.describe_key(key_name).primary_version.uses == usage.FIRST_BLOCK


@pytest.mark.slow
def test_due_lists_keys_past_their_cryptoperiod(timed_km, clock: Clock, key_name: str) -> None:
    timed_km.create_key(key_name, rotate_after_days=30)
    timed_km.create_key(key_name + "-never")
    assert key_name not in [r.name for r, _ in rotation.due(timed_km.list_keys(), now=clock.at)]
    clock.advance(31)
    late = {r.name: at for r, at in rotation.due(timed_km.list_keys(), now=clock.at)}
    assert key_name in late and key_name + "-never" not in late
    assert late[key_name] == clock.at - timedelta(days=1)
    timed_km.rotate(key_name)  # the new primary starts a new period
    assert key_name not in [r.name for r, _ in rotation.due(timed_km.list_keys(), now=clock.at)]


@pytest.mark.slow
def test_auto_rotate_on_first_use_after_the_period(timed_km, clock: Clock, key_name: str) -> None:
    timed_km.create_key(key_name, rotate_after_days=7, auto_rotate=True)
    old = timed_km.encrypt(b"old", key=key_name)
    clock.advance(6)
    timed_km.encrypt(b"still v1", key=key_name)
    assert timed_km.describe_key(key_name).primary == 1
    clock.advance(2)
    new = timed_km.encrypt(b"new", key=key_name)
    record = timed_km.describe_key(key_name)
    assert record.primary == 2 and record.version(1).state == "decrypt-only"
    assert timed_km.decrypt(old) == b"old" and timed_km.decrypt(new) == b"new"
    timed_km.encrypt(b"again", key=key_name)
    assert timed_km.describe_key(key_name).primary == 2  # one rotation per period


def test_without_auto_rotate_a_due_key_keeps_encrypting(timed_km, clock: Clock, key_name: str) -> None:
    timed_km.create_key(key_name, rotate_after_days=1)
    clock.advance(3)
    timed_km.encrypt(b"x", key=key_name)
    assert timed_km.describe_key(key_name).primary == 1


@pytest.mark.slow
def test_threads_never_exceed_the_limit(softhsm, key_name: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    limit = 37
    with keymgr.KeyManager(softhsm.uri()) as km:
        km.create_key(key_name, max_messages=limit)

        def attempt(_: int) -> bool:
            try:
                km.encrypt(b"t", key=key_name)
            except keymgr.PolicyError:
                return False
            return True

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(attempt, range(60)))
        assert sum(results) == limit
        assert km.describe_key(key_name).primary_version.uses == limit


@pytest.mark.slow
def test_processes_share_the_limit_exactly(softhsm, key_name: str) -> None:
    """Two processes encrypting until refused: together they never pass max_messages, and lose
    little of it. Uses are a grow-only count of reserved blocks (keymgr.lifecycle.usage): at the limit two
    racing processes may each keep back part of a block they reserved, so at most one block each
    goes unused; the recorded count never falls below the encryptions made."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    child = ("import sys, keymgr\n"
             "ok = 0\n"
             "with keymgr.KeyManager(sys.argv[1]) as km:\n"
             "    for _ in range(60):\n"
             "        try:\n"
             "            km.encrypt(b'p', key=sys.argv[2]); ok += 1\n"
             "        except keymgr.PolicyError:\n"
             "            pass\n"
             "print(ok)\n")
    limit = 50
    with keymgr.KeyManager(softhsm.uri()) as km:
        km.create_key(key_name, max_messages=limit)
    env = {**os.environ, **softhsm.env, "PYTHONPATH": str(repo)}
    procs = [subprocess.Popen([sys.executable, "-c", child, softhsm.uri(), key_name], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=repo) for _ in range(2)]
    counts = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        counts.append(int(out.strip()))
    block = max(1, limit // 16)
    assert usage.block_for(limit) == block  # the test's bound is the reservation size the meter uses
    assert limit - 2 * block <= sum(counts) <= limit, counts
    with keymgr.KeyManager(softhsm.uri()) as km:
        assert km.describe_key(key_name).primary_version.uses >= sum(counts)


@pytest.mark.slow
def test_forked_children_never_undercount_uses(softhsm, key_name: str) -> None:
    """A child of fork() gets a copy of its parent's reserved block and use-counter identity: it
    must neither spend the parent's block again nor write totals under the parent's identity
    (the merge, max per writer, would fold them into one). Recorded uses >= messages."""
    import os

    with keymgr.KeyManager(softhsm.uri(), audit=False) as km:
        km.create_key(key_name, max_messages=100_000)
        km.encrypt(b"parent", key=key_name)
        children = []
        for _ in range(4):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 0
                try:
                    for _ in range(150):
                        km.encrypt(b"child", key=key_name)
                except BaseException:
                    code = 1
                os._exit(code)
            children.append(pid)
        for pid in children:
            assert os.waitpid(pid, 0)[1] == 0
        keyring_of(km).reload()
        recorded = km.describe_key(key_name).primary_version.uses
    assert recorded >= 1 + 4 * 150, recorded
