"""The simulated-fleet harness itself (tests/fleet.py): isolation, barriers, kills, results.

Hosts are processes in their own mount namespaces sharing only a fresh SoftHSM2 token
directory; these tests check that the harness gives them what it promises, using only
keymgr's stable public API (KeyManager, create_key, encrypt, decrypt).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fleet import MASKED, FleetToken, fleet_workspace, fresh_token, require_namespaces, run_host, run_hosts


@pytest.fixture
def fleet_token() -> Iterator[FleetToken]:
    require_namespaces()
    with fleet_workspace() as ws:
        yield fresh_token(ws)


_ISOLATION = r"""
import os, tempfile, time
tag = f"fleet-probe-{HOST}-{ARGS['run']}"
for d in ("/tmp", "/var/tmp", "/run", "/dev/shm"):
    with open(os.path.join(d, tag), "w") as f:
        f.write(str(HOST))
wait_for_start()          # every host has written its probes before any looks
seen = {d: sorted(n for n in os.listdir(d) if n.startswith("fleet-probe-"))
        for d in ("/tmp", "/var/tmp", "/run", "/dev/shm")}
RESULT = {"seen": seen, "home": os.environ["HOME"], "tmpdir": tempfile.gettempdir(),
          "home_exists": os.path.isdir(os.environ["HOME"]), "mnt_ns": os.readlink("/proc/self/ns/mnt"),
          "tokendir": sorted(os.listdir(ARGS["tokendir"])), "pid": os.getpid()}
"""


def test_each_host_has_private_tmp_run_and_shm_and_shares_the_token_dir(fleet_token: FleetToken) -> None:
    run_id = os.urandom(4).hex()
    run = run_hosts(3, _ISOLATION, fleet_token, args=[{"run": run_id, "tokendir": str(fleet_token.tokendir)}] * 3,
                    timeout=30)
    run.assert_ok()
    namespaces = set()
    for host in run.hosts:
        r = host.result
        for d in MASKED:  # only its own probe in each private directory
            assert r["seen"][d] == [f"fleet-probe-{host.index}-{run_id}"], (host.index, d, r["seen"][d])
        assert r["home"].startswith("/tmp/") and r["home_exists"]
        assert r["tmpdir"].startswith("/tmp/") and r["tmpdir"] != "/tmp"
        assert r["tokendir"] == sorted(os.listdir(fleet_token.tokendir)) != []  # the token dir is shared
        namespaces.add(r["mnt_ns"])
    assert len(namespaces) == 3 and os.readlink("/proc/self/ns/mnt") not in namespaces
    for d in MASKED:  # nothing leaked to the parent's directories either
        assert not [n for n in os.listdir(d) if n.endswith(run_id)], d


_CREATE = r"""
import keymgr
with keymgr.KeyManager(URI, audit=False) as km:
    km.create_key(ARGS["key"])
RESULT = "created"
"""

_ENCRYPT = r"""
import keymgr
with keymgr.KeyManager(URI, audit=False) as km:
    km.encrypt(b"warm-up", key=ARGS["key"], context={"host": str(HOST)})   # opened and ready before the race
    wait_for_start()
    blobs = []
    for n in range(ARGS["count"]):
        blobs.append(km.encrypt(f"host {HOST} message {n}".encode(), key=ARGS["key"],
                                context={"host": str(HOST), "n": str(n)}).hex())
RESULT = blobs
"""

_DECRYPT = r"""
import keymgr
out = []
with keymgr.KeyManager(URI, audit=False) as km:
    for host, blobs in enumerate(ARGS["blobs"]):
        for n, blob in enumerate(blobs):
            out.append(km.decrypt(bytes.fromhex(blob), context={"host": str(host), "n": str(n)}).decode())
RESULT = out
"""


@pytest.mark.slow
def test_three_hosts_encrypt_under_one_key_and_a_fresh_process_decrypts_everything(fleet_token: FleetToken) -> None:
    assert run_host(_CREATE, fleet_token, args={"key": "k"}, timeout=60).check() == "created"
    run = run_hosts(3, _ENCRYPT, fleet_token, args=[{"key": "k", "count": 20}] * 3, timeout=60)
    run.assert_ok()
    assert [len(r) for r in run.results] == [20, 20, 20]
    assert len({b for r in run.results for b in r}) == 60
    assert len(run.releases) == 1 and run.max_lateness() < 0.15  # they really started together
    plain = run_host(_DECRYPT, fleet_token, args={"blobs": run.results}, timeout=60).check()
    assert plain == [f"host {h} message {n}" for h in range(3) for n in range(20)]


_PHASES = r"""
import time
times = []
for phase in range(3):
    time.sleep(0.05 * HOST)          # hosts arrive at each barrier at different moments
    times.append(barrier())
    times.append(time.time())
RESULT = times
"""


@pytest.mark.slow
def test_barriers_release_every_host_at_one_moment_per_generation(fleet_token: FleetToken) -> None:
    run = run_hosts(4, _PHASES, fleet_token, timeout=30)
    run.assert_ok()
    assert len(run.releases) == 3
    for phase in range(3):
        released = {r[2 * phase] for r in run.results}
        assert released == {run.releases[phase]}
        woke = [r[2 * phase + 1] for r in run.results]
        assert max(woke) - min(woke) < 0.1, woke
    assert all(len(h.lateness) == 3 for h in run.hosts)


_STEPS = r"""
import time
wait_for_start()
for step in range(5):
    mark(f"step-{step}")
if HOST == 2:
    time.sleep(60)   # killed by kill_after long before
RESULT = HOST
"""


def test_hosts_are_sigkilled_exactly_at_a_mark_or_after_a_delay(fleet_token: FleetToken) -> None:
    run = run_hosts(3, _STEPS, fleet_token, kill_at_mark={1: "step-2"}, kill_after={2: 0.5}, timeout=30)
    run.assert_ok()
    assert run.results[0] == 0 and run.hosts[0].ok
    one, two = run.hosts[1], run.hosts[2]
    assert one.killed and one.returncode == -9 and one.result is None
    assert [m[0] for m in one.marks] == ["step-0", "step-1", "step-2"]  # nothing ran past the kill point
    assert two.killed and two.returncode == -9 and len(two.marks) == 5
    assert run.started_at is not None and two.exited_at is not None
    assert 0.5 <= two.exited_at - run.started_at < 2.0  # kill_after counts from the start barrier
    assert all(run.started_at <= t < run.started_at + 0.5 for _, t in two.marks)  # host wall-clock times


_FAILS = r"""
print("some chatter on stdout")
if HOST == 1:
    raise ValueError("host one breaks")
RESULT = {"host": HOST}
"""


def test_a_crashing_host_is_reported_with_its_traceback(fleet_token: FleetToken) -> None:
    run = run_hosts(2, _FAILS, fleet_token, timeout=30)
    assert run.hosts[0].ok and run.results[0] == {"host": 0}
    assert "some chatter on stdout" in run.hosts[0].stderr  # the script's stdout goes to stderr
    assert run.hosts[1].returncode == 1 and not run.hosts[1].ok
    assert "ValueError: host one breaks" in run.hosts[1].stderr
    with pytest.raises(AssertionError, match="host 1: exit 1"):
        run.assert_ok()


@pytest.mark.slow
def test_a_host_past_the_timeout_is_killed_and_reported(fleet_token: FleetToken) -> None:
    run = run_hosts(1, "import time\ntime.sleep(60)\nRESULT = 1", fleet_token, timeout=2)
    assert run.hosts[0].timed_out and run.hosts[0].returncode == -9 and not run.hosts[0].ok
    with pytest.raises(AssertionError, match="host 0: timed out"):
        run.assert_ok()


def test_the_shared_area_is_outside_every_private_mount() -> None:
    with fleet_workspace() as ws:
        assert not any(Path(d) in ws.resolve().parents for d in MASKED)
    assert not ws.exists()
