"""The keyring as write-once facts (e7d05ab) at fleet scale, in one run (not a test).

Run: ``.venv/bin/python bench/keyring_fleet.py > report.md`` (see Runtime below), or
with ``--quick`` for a smoke run (10 keys x 5 versions, 2 rounds; under a minute).
Options: ``--rounds 7 --case-seconds 0.3 --keys 100 --versions 20 --build-workers 2 --keep``.
Needs git (a temporary worktree of 602e358, removed at the end) and SoftHSM2;
every token is fresh, made in a temporary directory. Progress goes to stderr,
the report (markdown tables) to stdout. Every ratio is measured within this run.

1. **Before vs after.** 1 KiB encrypt and decrypt per second, with and without
   the data-key cache, for a ``kw`` and a ``gcm`` key: the code before the
   redesign (602e358) against the working tree, each in its own child process
   (``PYTHONPATH`` = its tree) on its own fresh token (both tokens in one
   SoftHSM directory). The two children take turns case by case (the order
   flips every round); rates are medians over rounds, ratios the median of
   per-round ratios new/old. Target: >= 0.95. Each case is timed twice over:
   by the wall clock and by the child's CPU time (all its threads); on a VM
   shared with other work the wall ratio swings +-20 % round to round, the
   CPU-time ratio far less, so it is the one that shows the code's cost.
2. **Refresh cost.** A fresh token gets ``--keys`` keys of ``--versions``
   versions each (``km.create_key`` then ``km.rotate``, in ``--build-workers``
   processes). Then, in a fresh process (SoftHSM reads a token's directory once
   per process): (a) ``Keyring.reload()`` on a new KeyManager (reads and
   verifies every object), (b) a reload with nothing new (one find), (c) a
   reload after another process rotated one key; against the raw python-pkcs11
   calls in the same process on the same objects: C_FindObjects over every
   CKO_DATA object of application ``keymgr`` plus CKA_VALUE of each, and the
   find alone. Target: a refresh <= 1.5 x the raw find + read.
3. **No encrypt waits for a full refresh.** Per-encrypt latency (p50, p99, max)
   of 1 KiB, cached and uncached, in a process whose keyring re-reads the token
   every 0.02 s (refreshes run all the time, in the background) against one
   whose keyring never does (1e9 s), on the same token; the two processes take
   turns as in 1.
4. **The provenance check is paid once per version.** Calls of
   ``keymgr.keyring.provenance.encrypt_refusal`` (counted by a wrapper in the child)
   over 10,000 encrypts per manager. Expected: 1.

The token of 2 to 4 is the one the build leaves, as it leaves it: objects that a
snapshot covers stay until a process sweeps them ``Keyring.grace`` (30 s) after
it saw the snapshot, so the report counts them. The processes of 3 set
``grace`` to 1e9 so that no sweep changes the token under the measurement (the
sweep's loop still runs on every refresh).

The token of 2 to 4 lives in ``--fleet-dir`` (default ``/dev/shm``, where SoftHSM's
file store builds it about 1.5x faster than on ext4; ``--fleet-dir ''`` puts it
beside part 1's tokens in the temporary directory).

Runtime: part 1 takes under a minute and parts 2 to 4 (after the build) about
a minute and a half; the build of 100 x 20 takes most of the run (on a 2-vCPU VM
shared with other work: 7.5 minutes in /dev/shm at load 2, 13 minutes on ext4
at load 5), because on SoftHSM's file store every C_FindObjects and attribute
read checks each object's file, so every create, find and rotation costs
O(objects on the token) and the build O(n^2): ``--keys 50`` builds in about a
quarter of the time. The build skips the orphan scan of each rotation and goes
on after a failed create or rotation, counting it (``build_child``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
sys.path.insert(0, str(ROOT))

from bench._server import Server, add_token, read_json, reply  # noqa: E402 - after the path it needs

BEFORE = "602e358"
KEYRING_APP = "keymgr"
CASES = ("kw, no cache", "gcm, no cache", "kw, cached", "gcm, cached")


def key_name(i: int) -> str:
    return f"fleet-{i:03d}"


def log(message: str) -> None:
    print(f"[keyring_fleet {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- children ----------------------------------------------------------------------------------


def _serve(ops: dict[str, Callable[[str], Any]], ready: dict[str, Any]) -> None:
    """Answer one JSON line per command line on stdin (an op's label) until ``quit``."""
    reply({"ready": True, **ready})
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            return
        reply({"value": ops[command](command)})


def _calibrate(fn: Callable[[], object], seconds: float) -> int:
    """How many calls of ``fn`` take about ``seconds`` (bench/envelope.py's measure, one op)."""
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds / 4:
        fn()
        n += 1
    return max(5, int(n * seconds / (time.perf_counter() - start)))


def rates_child(tree: str, uri: str, seconds: float) -> None:
    """Part 1: serve rounds of the 1 KiB cases of the keymgr in ``tree`` (on its own token)."""
    sys.path.insert(0, tree)
    import keymgr  # first: bench._cases below must get this tree's keymgr
    from bench import _cases

    km = _cases.manager(uri)
    cached = _cases.manager(uri, cache=True)
    km.create_key("bench-kw", profile="kw")
    km.create_key("bench-gcm", profile="gcm")
    cases = [_cases.keymgr_case("kw, no cache", km, "bench-kw"), _cases.keymgr_case("gcm, no cache", km, "bench-gcm"),
             _cases.keymgr_case("kw, cached", cached, "bench-kw"),
             _cases.keymgr_case("gcm, cached", cached, "bench-gcm")]
    calls = {f"{c.name}|{d}": getattr(c, d) for c in cases for d in ("encrypt", "decrypt")}
    sizes = {label: _calibrate(fn, seconds) for label, fn in calls.items()}

    def run(label: str) -> list[float]:
        """Ops per second of wall time, and per second of this process's CPU time (every thread,
        the keyring's background refresh included): on a shared VM the second moves far less
        with other work, so it shows the code's own cost where the first shows the machine's."""
        fn, n = calls[label], sizes[label]
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            fn()
        return [n / (time.perf_counter() - start), n / max(time.process_time() - cpu, 1e-9)]

    _serve(dict.fromkeys(calls, run), {"keymgr": keymgr.__file__})


def latency_child(uri: str, seconds: float, interval: float, key: str) -> None:
    """Part 3: serve runs of per-encrypt latencies (µs), cached and uncached, with the keyrings
    re-reading the token every ``interval`` seconds; counts and times the refreshes meanwhile."""
    from bench import _cases
    from tests._internals import keyring_of

    refreshes: list[float] = []
    managers = {"no cache": _cases.manager(uri), "cached": _cases.manager(uri, cache=True)}
    for km in managers.values():
        keyring = keyring_of(km)
        keyring.refresh_interval = interval
        keyring.grace = 1e9  # no sweep destroys objects under the measurement (its loop still runs)
        original = keyring.reload

        def timed_reload(original: Callable[[], None] = original) -> None:
            start = time.perf_counter()
            original()
            refreshes.append(time.perf_counter() - start)

        setattr(keyring, "reload", timed_reload)  # noqa: B010 - an instance attribute shadows the method
    from bench._cases import CONTEXT, MESSAGE

    for km in managers.values():  # the first encrypt reads the token and checks provenance: not measured
        for _ in range(50):
            km.encrypt(MESSAGE, key=key, context=CONTEXT)

    def run(label: str) -> dict[str, Any]:
        km = managers[label]
        latencies: list[float] = []
        del refreshes[:]
        end = time.perf_counter() + seconds
        while (start := time.perf_counter()) < end:
            km.encrypt(MESSAGE, key=key, context=CONTEXT)
            latencies.append((time.perf_counter() - start) * 1e6)
        return {"latencies": latencies, "refreshes": list(refreshes)}

    _serve(dict.fromkeys(managers, run), {})


def build_child(uri: str, first: int, last: int, versions: int, worker: int) -> None:
    """Part 2's token: keys ``first`` to ``last - 1``, each with ``versions`` versions.

    Every rotation lists every secret key on the token to find a crashed rotation's orphans
    (``Keyring.sweep_orphans``; 602e358 did the same), so each costs O(keys on the token) and the
    build O(n^2): that step is skipped here (no rotation of the build crashes, so there are no
    orphans to find), which halves the build and changes nothing on the token. A create or
    rotation that raises a TokenError after its version fact was written (the sweep that follows
    a compaction can fail: see the report) is counted, not retried."""
    from bench import _cases
    from keymgr import errors
    from tests._internals import keyring_of

    km = _cases.manager(uri)
    setattr(keyring_of(km), "sweep_orphans", lambda name: 0)  # noqa: B010 - an instance attribute shadows the method
    failures: list[dict[str, Any]] = []

    def step(call: Callable[[], object], name: str, versions_after: int) -> None:
        for _ in range(3):
            try:
                call()
                return
            except errors.KeymgrError as exc:
                try:
                    committed = len(km.describe_key(name).versions) >= versions_after
                except errors.KeyNotFoundError:
                    committed = False
                failures.append({"committed": committed, "error": f"{type(exc).__name__}: {exc}"})
                if committed:
                    return  # only what follows the commit failed
        raise SystemExit(f"bench: {name} failed three times: {failures[-1]}")

    start = time.perf_counter()
    for i in range(first, last):
        name = key_name(i)
        step(partial(km.create_key, name), name, 1)
        for n in range(2, versions + 1):
            step(partial(km.rotate, name), name, n)
        done = i + 1 - first
        if done == last - first or done % 5 == 0:
            log(f"build worker {worker}: {done}/{last - first} keys of {versions} versions, "
                f"{time.perf_counter() - start:.0f} s")
    km.close()
    reply({"keys": last - first, "failures": failures})


def rotate_child(uri: str, key: str) -> None:
    """Part 2 (c): another process rotates one key."""
    from bench import _cases

    km = _cases.manager(uri)
    reply({"primary": km.rotate(key).primary})
    km.close()


def _raw_calls() -> tuple[Callable[[Any], int], Callable[[Any], int], Callable[[Any], list[tuple[str, bytes]]]]:
    from pkcs11 import Attribute, ObjectClass

    query = {Attribute.CLASS: ObjectClass.DATA, Attribute.APPLICATION: KEYRING_APP}

    def find(session: Any) -> int:
        return len(list(session.get_objects(query)))

    def find_read(session: Any) -> int:
        return sum(len(bytes(obj[Attribute.VALUE])) for obj in session.get_objects(query))

    def find_read_labels(session: Any) -> list[tuple[str, bytes]]:
        return [(str(obj[Attribute.LABEL]), bytes(obj[Attribute.VALUE])) for obj in session.get_objects(query)]

    return find, find_read, find_read_labels


def census(found: list[tuple[str, bytes]]) -> dict[str, int]:
    """keymgr's data objects by kind, and how many of them a snapshot on the token covers."""
    covered: set[str] = set()
    for label, value in found:
        if label.startswith("keymgr/s/"):
            covered.update(json.loads(value)["snapshot"]["covers"])
    labels = {label for label, _ in found}
    return {"objects": len(found), "facts": sum(label.startswith("keymgr/f/") for label in labels),
            "snapshots": sum(label.startswith("keymgr/s/") for label in labels),
            "covered": len(covered & labels), "kib": sum(len(v) for _, v in found) // 1024}


def _median_of(fn: Callable[[], object], times: int) -> float:
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def refresh_child(uri: str, key: str, rounds: int, rotations: int) -> None:
    """Part 2, in a fresh process: reloads against the raw calls, round by round."""
    from bench import _cases
    from tests._internals import keyring_of, token_of

    find, find_read, labelled = _raw_calls()
    km = _cases.manager(uri)
    ts = token_of(km)
    start = time.perf_counter()
    first = census(ts.run("bench: census", labelled))  # the process's first look: SoftHSM loads the objects
    first_look = time.perf_counter() - start
    warm = _cases.manager(uri)
    warm.refresh_interval = 1e9  # only the reloads timed here read the token
    start = time.perf_counter()
    keyring_of(warm).reload()
    first_reload = time.perf_counter() - start
    out: dict[str, list[float]] = {name: [] for name in (
        "raw find + read", "raw find", "raw find + label + value", "cold reload", "warm reload",
        "raw find + read (c)", "raw find (c)", "reload after a rotation elsewhere")}
    for _ in range(rounds):
        out["raw find + read"].append(_median_of(lambda: ts.run("bench: raw", find_read), 3))
        out["raw find"].append(_median_of(lambda: ts.run("bench: raw", find), 5))
        out["raw find + label + value"].append(_median_of(lambda: ts.run("bench: raw", labelled), 3))
        fresh = _cases.manager(uri)
        out["cold reload"].append(_median_of(keyring_of(fresh).reload, 1))
        fresh.close()
        out["warm reload"].append(_median_of(keyring_of(warm).reload, 5))
    seen, before = 0, census(ts.run("bench: census", labelled))["objects"]
    for _ in range(rotations):  # SoftHSM re-reads the token on its first find after another process wrote:
        primary = child(["rotate", uri, key])["primary"]  # both sides of (c) are that first find
        out["reload after a rotation elsewhere"].append(_median_of(keyring_of(warm).reload, 1))
        seen += keyring_of(warm).current(key).primary == primary  # type: ignore[union-attr]
        child(["rotate", uri, key])
        out["raw find + read (c)"].append(_median_of(lambda: ts.run("bench: raw", find_read), 1))
        out["raw find (c)"].append(_median_of(lambda: ts.run("bench: raw", find), 5))
    end = census(ts.run("bench: census", labelled))
    reply({"census": first, "first_look": first_look, "first_reload": first_reload, "times": out, "seen": seen,
            "new_objects": (end["objects"] - before) / (2 * rotations), "end": end})


def provenance_child(uri: str, key: str, count: int) -> None:
    """Part 4: calls of encrypt_refusal over ``count`` encrypts per manager, counted in this process."""
    import keymgr.keyring.provenance
    from bench import _cases
    from bench._cases import CONTEXT, MESSAGE

    calls = [0]
    original = keymgr.keyring.provenance.encrypt_refusal

    def counting(*args: Any, **kwargs: Any) -> str | None:
        calls[0] += 1
        return original(*args, **kwargs)

    keymgr.keyring.provenance.encrypt_refusal = counting
    result: dict[str, Any] = {}
    for label, options in (("no cache", {}), ("cached", {"cache": True})):
        km = _cases.manager(uri, **options)
        before, start = calls[0], time.perf_counter()
        for _ in range(count):
            km.encrypt(MESSAGE, key=key, context=CONTEXT)
        result[label] = {"calls": calls[0] - before, "seconds": time.perf_counter() - start}
    result["process"] = calls[0]
    reply(result)


def run_child(args: list[str]) -> None:
    mode, rest = args[0], args[1:]
    if mode == "rates":
        rates_child(rest[0], rest[1], float(rest[2]))
    elif mode == "latency":
        latency_child(rest[0], float(rest[1]), float(rest[2]), rest[3])
    elif mode == "build":
        build_child(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), int(rest[4]))
    elif mode == "rotate":
        rotate_child(rest[0], rest[1])
    elif mode == "refresh":
        refresh_child(rest[0], rest[1], int(rest[2]), int(rest[3]))
    elif mode == "provenance":
        provenance_child(rest[0], rest[1], int(rest[2]))
    else:
        sys.exit(f"unknown child mode {mode!r}")


# -- the parent's side of the children ----------------------------------------------------------


def _env(tree: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    return env


def child(args: list[str], tree: Path | None = None) -> Any:
    """Run one child to its end (stderr passes through) and return its JSON answer."""
    proc = subprocess.Popen([sys.executable, str(HERE), "--child", *args], stdout=subprocess.PIPE, text=True,
                            env=_env(tree), cwd=str(ROOT))
    assert proc.stdout is not None
    answer = read_json(proc.stdout, args[0])
    if proc.wait() != 0:
        sys.exit(f"bench child {args[0]} failed")
    return answer


def start_child(args: list[str], tree: Path | None = None) -> Server:
    """A child of this script in ``tree`` (PYTHONPATH), answering commands (``_serve``)."""
    return Server([sys.executable, str(HERE), "--child", *args], what=args[0], env=_env(tree), cwd=str(ROOT))


def alternate(servers: list[Server], labels: list[str], rounds: int) -> list[dict[str, list[Any]]]:
    """Each server's answers per label, the servers taking turns label by label; the order of
    the servers flips every round."""
    answers: list[dict[str, list[Any]]] = [{label: [] for label in labels} for _ in servers]
    for r in range(rounds):
        for label in labels:
            order = range(len(servers)) if r % 2 == 0 else reversed(range(len(servers)))
            for i in order:
                answers[i][label].append(servers[i].ask(label))
    return answers


# -- the parts ------------------------------------------------------------------------------


def verdict(value: float, target: float, *, at_most: bool = False) -> str:
    return "met" if (value <= target if at_most else value >= target) else "**not met**"


def part_before_after(workdir: Path, rounds: int, seconds: float) -> str:
    from bench.envelope import k, make_token, table

    (workdir / "ab").mkdir()
    uri_old = make_token(workdir / "ab")
    uri_new = add_token(uri_old, "bench-new")
    tree = workdir / "before"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), BEFORE], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        log(f"part 1: {BEFORE} in {tree} against the working tree, {rounds} rounds")
        old = start_child(["rates", str(tree), uri_old, str(seconds)], tree=tree)
        new = start_child(["rates", str(ROOT), uri_new, str(seconds)], tree=ROOT)
        for server, where in ((old, tree), (new, ROOT)):
            if not str(server.ready["keymgr"]).startswith(str(where.resolve())):
                sys.exit(f"bench: the child meant for {where} imported keymgr from {server.ready['keymgr']}")
        labels = [f"{case}|{d}" for case in CASES for d in ("encrypt", "decrypt")]
        (before, after) = alternate([old, new], labels, rounds)
        old.close()
        new.close()
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False,
                       capture_output=True)
    rows = []
    for label in labels:
        case, direction = label.split("|")
        wall = [n[0] / o[0] for n, o in zip(after[label], before[label], strict=True)]
        cpu = [n[1] / o[1] for n, o in zip(after[label], before[label], strict=True)]
        ratio, cpu_ratio = statistics.median(wall), statistics.median(cpu)
        rows.append([f"{case}, {direction}", k(statistics.median(o[0] for o in before[label])),
                     k(statistics.median(n[0] for n in after[label])), f"{ratio:.2f}",
                     f"{min(wall):.2f}-{max(wall):.2f}", verdict(ratio, 0.95), f"{cpu_ratio:.2f}",
                     f"{min(cpu):.2f}-{max(cpu):.2f}", verdict(cpu_ratio, 0.95)])
    return table(["1 KiB, ops/s", f"before ({BEFORE})", "after (working tree)", "after / before (wall)",
                  "per-round range", "target >= 0.95", "after / before (CPU time)", "per-round range",
                  "target >= 0.95"], rows)


def build(uri: str, keys: int, versions: int, workers: int) -> tuple[float, list[dict[str, Any]]]:
    log(f"part 2: building {keys} keys x {versions} versions in {workers} processes (takes a while)")
    start = time.perf_counter()
    first = child(["build", uri, "0", "1", str(versions), "0"])  # the first key alone: it makes the MAC key
    bounds = [1 + (keys - 1) * w // workers for w in range(workers + 1)]
    procs = [subprocess.Popen([sys.executable, str(HERE), "--child", "build", uri, str(lo), str(hi), str(versions),
                               str(w + 1)], stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
             for w, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)) if hi > lo]
    failures = list(first["failures"])
    for proc in procs:
        assert proc.stdout is not None
        failures += read_json(proc.stdout, "build")["failures"]
        if proc.wait() != 0:
            sys.exit("bench: a build worker failed")
    return time.perf_counter() - start, failures


def _elide(error: str) -> str:
    return re.sub(r"fleet-\d+", "fleet-N", re.sub(r"[0-9a-f]{16,}", "...", error))


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.2f}"


def census_text(c: dict[str, int]) -> str:
    return (f"{c['objects']:,} keymgr data objects ({c['facts']:,} facts, {c['snapshots']:,} snapshots; "
            f"{c['covered']:,} of them covered by a snapshot and due for a sweep; {c['kib']:,} KiB)")


def part_refresh(uri: str, key: str, rounds: int, rotations: int) -> str:
    from bench.envelope import table

    r = child(["refresh", uri, key, str(rounds), str(rotations)])
    t = r["times"]
    med = {name: statistics.median(values) for name, values in t.items()}

    def ratio(top: str, bottom: str) -> float:
        return statistics.median(a / b for a, b in zip(t[top], t[bottom], strict=True))

    rows = [["raw: C_FindObjects + CKA_VALUE of each", _ms(med["raw find + read"]), "1.00", "-", ""],
            ["raw: C_FindObjects alone", _ms(med["raw find"]), f"{ratio('raw find', 'raw find + read'):.2f}", "-", ""],
            ["raw: C_FindObjects + CKA_LABEL and CKA_VALUE of each (what a scan reads)",
             _ms(med["raw find + label + value"]), f"{ratio('raw find + label + value', 'raw find + read'):.2f}",
             "-", ""],
            ["raw: C_FindObjects + CKA_VALUE of each, first after another process rotated a key",
             _ms(med["raw find + read (c)"]), "-", "-", ""]]
    for label, name, raw in (("(a) cold reload, new KeyManager (reads and verifies every object)", "cold reload",
                              "raw find + read"),
                             ("(b) warm reload, nothing new", "warm reload", "raw find + read"),
                             ("(c) reload after another process rotated one key",
                              "reload after a rotation elsewhere", "raw find + read (c)")):
        find = "raw find (c)" if raw.endswith("(c)") else "raw find"
        value = ratio(name, raw)
        rows.append([label, _ms(med[name]), f"{value:.2f}", f"{ratio(name, find):.2f}",
                     verdict(value, 1.5, at_most=True)])
    text = table(["refresh, in a fresh process", "ms (median)", "/ raw find + read", "/ raw find",
                  "target <= 1.5 x raw find + read"], rows)
    text += (f"\n\nToken: {census_text(r['census'])}; after the rotations: {census_text(r['end'])}. "
             f"The process's first find + label + value (SoftHSM loads the token): {_ms(r['first_look'])} ms; "
             f"its first reload: {_ms(r['first_reload'])} ms. (c): {r['seen']} of {len(t['raw find (c)'])} "
             f"rotations seen by the reload, {r['new_objects']:.1f} new objects per rotation; its raw find + read "
             f"is the first after another rotation (SoftHSM re-reads the token then), its raw find is not.")
    return text


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def part_latency(uri: str, key: str, rounds: int, seconds: float) -> str:
    from bench.envelope import k, table

    log("part 3: encrypt latency, refresh every 0.02 s against never")
    servers = [start_child(["latency", uri, str(seconds), str(interval), key]) for interval in (0.02, 1e9)]
    labels = ["no cache", "cached"]
    busy, idle = alternate(servers, labels, rounds)
    for server in servers:
        server.close()
    rows = []
    for label in labels:
        stats = {}
        for name, interval, side in (("busy", "0.02", busy), ("idle", "1e9", idle)):
            lat = [x for answer in side[label] for x in answer["latencies"]]
            ref = [x for answer in side[label] for x in answer["refreshes"]]
            slow = [x for x in lat if x > 1000]
            stats[name] = p50, p99, mean, rate = (_pct(lat, 0.5), _pct(lat, 0.99), statistics.fmean(lat),
                                                  1e6 * len(lat) / sum(lat))
            rows.append([f"{label}, refresh_interval {interval}", k(rate), f"{p50:,.0f}", f"{p99:,.0f}",
                         f"{_pct(lat, 0.999):,.0f}", f"{max(lat):,.0f}", f"{mean:,.0f}",
                         f"{len(slow):,} ({100 * sum(slow) / sum(lat):.0f} %)",
                         f"{len(ref)} ({_ms(statistics.median(ref))} / {_ms(max(ref))})" if ref else "0"])
        busy_stats, idle_stats = stats["busy"], stats["idle"]
        rows.append([f"**ratio 0.02 / 1e9, {label}**", f"{busy_stats[3] / idle_stats[3]:.2f}",
                     f"**{busy_stats[0] / idle_stats[0]:.2f}**", f"**{busy_stats[1] / idle_stats[1]:.2f}**", "", "",
                     f"{busy_stats[2] / idle_stats[2]:.2f}", "", ""])
    return table(["1 KiB encrypt", "encrypts/s", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "mean µs",
                  "encrypts > 1 ms (% of the time)", "refreshes (ms median / max)"], rows)


def part_provenance(uri: str, key: str, count: int) -> str:
    from bench.envelope import table

    log(f"part 4: provenance checks over {count:,} encrypts per manager")
    r = child(["provenance", uri, key, str(count)])
    rows = [[f"{count:,} encrypts, KeyManager {label}", str(r[label]["calls"]), "1",
             "met" if r[label]["calls"] == 1 else "**not met**", f"{count / r[label]['seconds']:,.0f}"]
            for label in ("no cache", "cached")]
    rows.append(["both managers, one process (the cache is per Keyring object)", str(r["process"]), "-", "", ""])
    return table(["encrypt_refusal calls", "calls", "expected", "", "encrypts/s"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description="keymgr keyring at fleet scale (one run).")
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 keys x 5 versions, 2 rounds")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--case-seconds", type=float)
    parser.add_argument("--keys", type=int)
    parser.add_argument("--versions", type=int)
    parser.add_argument("--build-workers", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories with the tokens")
    parser.add_argument("--fleet-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="where the token of parts 2-4 lives (default /dev/shm: tmpfs builds it ~1.5x faster "
                             "than ext4); '' for the temporary directory of part 1")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child)
        return
    quick = args.quick
    rounds = args.rounds or (2 if quick else 7)
    seconds = args.case_seconds or (0.1 if quick else 0.3)
    keys, versions = args.keys or (10 if quick else 100), args.versions or (5 if quick else 20)
    encrypts = 1_000 if quick else 10_000
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="keymgr-bench-fleet-"))

    print(f"# keymgr keyring at fleet scale\n\n{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
          f"Python {sys.version.split()[0]}; {rounds} rounds of {seconds} s per case; load average "
          f"{os.getloadavg()[0]:.1f} (other work on the machine skews rates, less so ratios)\n", flush=True)
    print(f"## 1. Before ({BEFORE}) vs after (working tree), 1 KiB messages\n", flush=True)
    print(part_before_after(workdir, rounds, seconds) + "\n", flush=True)

    from bench.envelope import make_token

    fleet = Path(tempfile.mkdtemp(prefix="keymgr-bench-fleet-", dir=args.fleet_dir)) if args.fleet_dir else workdir
    (fleet / "fleet").mkdir()
    uri = make_token(fleet / "fleet")
    built, failures = build(uri, keys, versions, args.build_workers)
    print(f"## 2. Refresh cost, {keys} keys x {versions} versions\n\nBuilt in {built:.0f} s ({args.build_workers} "
          f"processes, orphan scans skipped; token in {fleet}). Each row: median over {rounds} rounds; ratios: "
          f"median of per-round ratios; (c): round(s): {max(1, rounds // 2)}, each of two rotations by another "
          "process.\n", flush=True)
    if failures:
        after = [f for f in failures if f["committed"]]
        before = [f for f in failures if not f["committed"]]
        print(f"**{len(failures)} of {keys * versions} creates and rotations raised**: {len(after)} after their "
              f"version fact was written (the caller is told it failed; the build went on), {len(before)} before "
              f"(retried). Errors (ids elided): " + "; ".join(sorted({f"`{_elide(f['error'])}`" for f in failures})[:4])
              + "\n", flush=True)
    log("part 2: refresh cost")
    print(part_refresh(uri, key_name(keys // 2), rounds, max(1, rounds // 2)) + "\n", flush=True)
    print(f"## 3. Encrypt latency with refreshes running, {keys} keys x {versions} versions\n", flush=True)
    print(part_latency(uri, key_name(keys - 1), rounds, seconds) + "\n", flush=True)

    print("## 4. Provenance checks per version per process\n", flush=True)
    print(part_provenance(uri, key_name(0), encrypts) + "\n", flush=True)
    print(f"Total {time.perf_counter() - started:.0f} s; load average at the end: {os.getloadavg()[0]:.1f}")
    if args.keep:
        log(f"tokens kept in {workdir} and {fleet}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(fleet, ignore_errors=True)


if __name__ == "__main__":
    main()
