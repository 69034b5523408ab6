"""Many hosts on one token (DESIGN.md, "Many hosts on one token"; issue: many hosts, one HSM).

Each host is a process in its own mount namespace (private /tmp, /var/tmp, /run, /dev/shm,
its own HOME and TMPDIR: tests/fleet.py), so no lock file, cache or temp file is shared: only
the SoftHSM token directory is, as only the HSM is shared between real hosts. They encrypt,
rotate, suspend and resume old versions and hit a use limit with auto-rotation, all at once.
Afterwards every message decrypts, no error reached the application, every host sees the same
primary, the recorded uses cover every encryption, and every host's audit log verifies.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.fleet import FleetToken, fleet_workspace, fresh_token, require_namespaces, run_host, run_hosts

_SETUP = r"""
import os
import keymgr
log = os.path.join(DISK, "setup.log")
with keymgr.KeyManager(URI, audit=log) as km:
    km.create_key("orders")
    km.create_key("billing", profile="gcm", max_messages=ARGS["limit"], auto_rotate=True)
RESULT = log
"""

_HOST = r"""
from tests._internals import keyring_of
import json, os, random, time
import keymgr
from keymgr.audit import AuditLog

rng = random.Random(HOST)
errors, sealed, rotations, suspensions = [], [], 0, 0
with keymgr.KeyManager(URI, audit=AuditLog(os.path.join(DISK, "audit.log"))) as km:
    km.refresh_interval = 0.2
    km.encrypt(b"warm-up", key="orders")
    wait_for_start()
    for i in range(ARGS["messages"]):
        try:
            key = "billing" if i % 2 else "orders"
            context = {"host": str(HOST), "i": str(i)}
            blob = km.encrypt(f"{HOST}/{i}".encode(), key=key, context=context)
            sealed.append((key, i, blob.hex()))
            if HOST < ARGS["rotators"] and i % ARGS["rotate_every"] == HOST:
                km.rotate("orders")
                rotations += 1
            if HOST == ARGS["suspender"] and i % 15 == 7:
                record = km.describe_key("orders")
                old = [v.version for v in record.versions
                       if v.version < record.primary - 1 and v.state == "decrypt-only"]
                if old:
                    target = rng.choice(old)
                    km.suspend("orders", target)
                    time.sleep(0.01)
                    km.resume("orders", target)
                    suspensions += 1
        except keymgr.KeymgrError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    barrier()  # everyone has stopped writing
    time.sleep(0.5)
    seen = {}
    for name in ("orders", "billing"):
        keyring_of(km).reload()
        record = km.describe_key(name)
        seen[name] = [record.primary_version.key_id.hex(), sum(1 for v in record.versions if v.state == "active")]
    uses = sum(v.uses for v in km.describe_key("billing").versions)
RESULT = {"errors": errors, "sealed": sealed, "rotations": rotations, "suspensions": suspensions,
          "seen": seen, "billing_uses": uses, "log": os.path.join(DISK, "audit.log")}
"""

_CHECK = r"""
import json
import os
import keymgr
from keymgr.audit import verify_log, verify_logs
from keymgr.hsm import open_token
ARGS = json.load(open(ARGS))
failed = []
own_log = os.path.join(DISK, "check.log")
with keymgr.KeyManager(URI, audit=own_log) as km:
    for host, messages in enumerate(ARGS["sealed"]):
        for key, i, blob in messages:
            try:
                plain = km.decrypt(bytes.fromhex(blob), context={"host": str(host), "i": str(i)})
                if plain != f"{host}/{i}".encode():
                    failed.append(f"host {host} message {i}: wrong plaintext")
            except keymgr.KeymgrError as exc:
                failed.append(f"host {host} message {i}: {type(exc).__name__}: {exc}")
    versions = {name: len(km.describe_key(name).versions) for name in ("orders", "billing")}
    bad = [f"{c.name} v{c.version}: {c.verdict}" for c in km.verify_keys() if not c.ok]
ts = open_token(URI)
logs = {}
for path in ARGS["logs"]:
    report = verify_log(path, token=ts)
    logs[path] = [report.ok, report.entries, str(report.broken), report.macs_checked]
every = ARGS["logs"] + ARGS["other_logs"] + [own_log]
together = verify_logs(every, token=ts)
missing_before = [str(m) for m in together.missing]
gone = ARGS["logs"][0]
os.rename(gone, gone + ".away")
after = verify_logs(every[1:], token=ts)
os.rename(gone + ".away", gone)
RESULT = {"failed": failed, "logs": logs, "versions": versions, "unverified": bad, "together": together.ok,
          "missing_before": missing_before, "missing_after": [m.path for m in after.missing]}
"""


_LIMIT = 90  # the billing key's max_messages (auto-rotated)


def _file(token: FleetToken, args: object) -> str:
    """Arguments too large for a command line, as a file in the shared workspace."""
    path = token.workspace / f"args-{os.urandom(4).hex()}.json"
    path.write_text(json.dumps(args))
    return str(path)


def _fleet(hosts: int, messages: int, token: FleetToken) -> tuple[list[dict[str, object]], dict[str, object]]:
    setup_log = run_host(_SETUP, token, args={"limit": _LIMIT}).check()
    args = {"messages": messages, "rotators": min(3, hosts), "rotate_every": 25, "suspender": hosts - 1}
    run = run_hosts(hosts, _HOST, token, args=[args] * hosts, timeout=240)
    run.assert_ok()
    results = run.results
    check = run_host(_CHECK, token, timeout=240, args=_file(token, {
        "sealed": [r["sealed"] for r in results], "logs": [r["log"] for r in results],
        "other_logs": [setup_log]})).check()
    return results, check


def _assert_fleet(results: list[dict[str, object]], check: dict[str, object], hosts: int, messages: int) -> None:
    errors = [e for r in results for e in r["errors"]]  # type: ignore[attr-defined]
    assert errors == [], errors[:5]
    sealed = sum(len(r["sealed"]) for r in results)  # type: ignore[arg-type]
    assert sealed == hosts * messages
    assert check["failed"] == [], check["failed"][:5]  # type: ignore[index]
    for name in ("orders", "billing"):
        primaries = {tuple(r["seen"][name]) for r in results}  # type: ignore[index]
        assert len(primaries) == 1, f"hosts disagree on {name}'s primary: {primaries}"
        assert next(iter(primaries))[1] == 1, f"{name}: not exactly one active version"
    billing_messages = hosts * (messages // 2)
    recorded = max(r["billing_uses"] for r in results)  # type: ignore[type-var]
    assert recorded >= billing_messages, (recorded, billing_messages)
    for path, (ok, entries, problems, maced) in check["logs"].items():  # type: ignore[attr-defined]
        assert ok, f"{path}: {problems}"
        assert entries > 0 and maced
    assert check["unverified"] == []
    # every host's log verifies together with the others, and none of the token's chains is missing;
    # with one host's whole log gone, that log is reported missing
    assert check["together"] and check["missing_before"] == [], check["missing_before"]
    assert [os.path.realpath(p) for p in check["missing_after"]] == [os.path.realpath(results[0]["log"])]
    # auto-rotation racing on every host: at most one new version per host per use-limit period
    periods = -(-billing_messages // _LIMIT)
    assert check["versions"]["billing"] <= 1 + hosts * periods, check["versions"]  # type: ignore[index]
    rotations = sum(r["rotations"] for r in results)  # type: ignore[misc]
    print(f"\n{hosts} hosts x {messages} messages: {rotations} rotations, "
          f"{sum(r['suspensions'] for r in results)} suspend/resume pairs, versions {check['versions']}, "  # type: ignore[misc]
          f"billing uses recorded {recorded} for {billing_messages} messages ({periods} limit periods)")


@pytest.mark.slow
def test_three_hosts_rotating_and_suspending_lose_nothing() -> None:
    require_namespaces()
    hosts, messages = 3, 200
    with fleet_workspace() as workspace:
        results, check = _fleet(hosts, messages, fresh_token(workspace))
        _assert_fleet(results, check, hosts, messages)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("KEYMGR_FLEET_SLOW") == "0", reason="KEYMGR_FLEET_SLOW=0 turns the 8-host run off")
def test_eight_hosts_rotating_and_suspending_lose_nothing() -> None:
    require_namespaces()
    hosts, messages = 8, 120
    with fleet_workspace() as workspace:
        results, check = _fleet(hosts, messages, fresh_token(workspace))
        _assert_fleet(results, check, hosts, messages)


_OPEN_FRESH = r"""
import keymgr
from keymgr.audit import AuditLog
import os
wait_for_start()
with keymgr.KeyManager(URI, audit=AuditLog(os.path.join(DISK, "audit.log"))) as km:
    try:
        km.create_key(f"k{HOST}r{ARGS}")
    except keymgr.KeymgrError as exc:
        RESULT = {"error": f"{type(exc).__name__}: {exc}"}
        raise SystemExit(0)
    blob = km.encrypt(b"fresh", key=f"k{HOST}r{ARGS}")
    assert km.decrypt(blob) == b"fresh"
    RESULT = {"blob": blob.hex(), "log": os.path.join(DISK, "audit.log")}
"""

_READ_ALL = r"""
from tests._internals import token_of
import json
import keymgr
from keymgr.audit import verify_log
ARGS = json.load(open(ARGS))
with keymgr.KeyManager(URI, audit=False) as km:
    plain = [km.decrypt(bytes.fromhex(b)).decode() for b in ARGS["blobs"]]
    logs = [verify_log(p, token=token_of(km)).ok for p in ARGS["logs"]]
RESULT = {"plain": plain, "logs": logs}
"""


@pytest.mark.slow
def test_hosts_opening_a_fresh_token_at_once_all_work() -> None:
    """Four hosts make the token's first MAC key and audit key at the same moment: whatever
    duplicates that makes, every host keeps working, and every host's writes stay readable."""
    require_namespaces()
    with fleet_workspace() as workspace:
        token = fresh_token(workspace)
        for round_ in range(2):  # a second round on the same, no longer fresh, token
            run = run_hosts(4, _OPEN_FRESH, token, args=[round_] * 4, timeout=120)
            run.assert_ok()
            results = run.results
            assert all("error" not in r for r in results), results
        check = run_host(_READ_ALL, token, args=_file(token, {"blobs": [r["blob"] for r in results],
                                                              "logs": [r["log"] for r in results]})).check()
        assert check["plain"] == ["fresh"] * 4
        assert all(check["logs"]), check["logs"]


_KILLED_ROTATOR = r"""
import keymgr
wait_for_start()
with keymgr.KeyManager(URI, audit=False) as km:
    sealed = []
    for i in range(ARGS["rounds"]):
        sealed.append(km.encrypt(f"{HOST}/{i}".encode(), key="orders").hex())
        mark("encrypted")
        if HOST == 0:
            km.rotate("orders")
            mark("rotated")
RESULT = sealed
"""


@pytest.mark.slow
def test_a_host_killed_in_the_middle_of_rotations_loses_nothing() -> None:
    """SIGKILL of a rotating host at a rotation's step: the other hosts carry on without an
    error, and everything either wrote decrypts afterwards."""
    require_namespaces()
    with fleet_workspace() as workspace:
        token = fresh_token(workspace)
        run_host(_SETUP, token, args={"limit": 1000}).check()
        run = run_hosts(3, _KILLED_ROTATOR, token, args=[{"rounds": 40}] * 3, timeout=120,
                        kill_at_mark={0: ("rotated", 7)})
        run.assert_ok()
        survivors = [run.hosts[1].result, run.hosts[2].result]
        plain = run_host(_READ_ALL, token, args=_file(token, {"blobs": [b for s in survivors for b in s],
                                                              "logs": []})).check()
        assert plain["plain"] == [f"{h}/{i}" for h in (1, 2) for i in range(40)]
        after = run_host(_VERIFY, token).check()
        assert after["unverified"] == [] and after["primary_state"] == "active"
        assert after["versions"] >= 8


_VERIFY = r"""
import keymgr
with keymgr.KeyManager(URI, audit=False) as km:
    record = km.describe_key("orders")
    RESULT = {"unverified": [f"{c.name} v{c.version}: {c.verdict}" for c in km.verify_keys() if not c.ok],
              "primary_state": record.primary_version.state, "versions": len(record.versions)}
"""
