"""Audit log append rates before and after 73ee44c ("Audit appends only where the token agrees"), one run.

Run: ``.venv/bin/python bench/audit_append.py`` (5 rounds of 0.5 s per case and
side; under a minute), or ``--quick`` for a smoke run (2 rounds of 0.1 s; about
15 s). Options: ``--rounds 5 --case-seconds 0.5 --profile auto|off|CASES`` (e.g. ``b,c``).
Needs git (a temporary worktree of b801766, removed at the end) and SoftHSM2;
the tokens are fresh, made in a temporary directory. Progress goes to stderr,
the report (markdown tables) to stdout. Every ratio is measured within this run.

73ee44c makes the writer check the log's tail against the token's checkpoint
before it appends (a fast path when the file ends at the entry this process
last wrote and checkpointed), write an ``intent`` entry before each operation
that changes key state, and call ``AuditLog.ready()`` as each operation starts
(a clock read; at most once per second, the tail checked against the token).

**Before** is b801766 (the commit before it), **after** the working tree (so
also what came after 73ee44c). Each side runs in its own child process
(``PYTHONPATH`` = its tree, checked through ``keymgr.__file__``) on its own fresh
SoftHSM token (both in one token directory), with its own log files. The two
children take turns case by case, the order flipping every round; each rate is
the median over rounds, each ratio the median of the per-round ratios
after / before. Cases (``k`` is a key of the default profile, ``s`` another one):

a. ``AuditLog(path, token=ts, fsync="entry", checkpoint_every=1, aggregate=())``,
   ``log.record("rotate", key="k", version=1)``: every entry written, fsynced,
   MACed and checkpointed on the token. Entries/s.
b. ``AuditLog(path, token=ts)`` (default aggregation: encrypt, decrypt, rewrap):
   ``with log.operation("encrypt", key="k", version=1): pass`` (``__enter__`` is
   where ``ready()`` runs, ``__exit__`` counts the success), and one
   ``log.flush()`` at the end of each timed batch (the aggregated entry written,
   MACed, checkpointed, fsynced). Entries counted per second.
c. ``keymgr.KeyManager(uri, audit=AuditLog(path))``: 1 KiB ``km.encrypt(msg,
   key="k")``, default aggregation, and one flush of the log at the end of each
   batch. Messages/s. Beside it, as a reference, **c0**: the same encrypt on a
   manager made with ``audit=False``, so that what the log itself adds on each
   side (c against c0, second table) is told apart from what else changed in
   the encrypt path between the two trees.
d. A second such manager (its own log): ``km.suspend("s", 1)`` then
   ``km.resume("s", 1)``. Pairs/s (after: 4 entries a pair, intent + outcome each;
   before: 2).

``ts`` is ``keymgr.hsm.open_token(uri)``. Target: the pre-append check costs at
most 10 % with aggregation on, i.e. after / before >= 0.90 for b and c, judged
on wall-clock rates. Beside them, the same ratio by the child's CPU time
(``time.process_time``: all its threads, SoftHSM included, fsync waits not),
which other load on the machine moves much less. With ``--profile auto`` (the
default) a case that misses its target runs once more per side under cProfile
(a batch twice the usual size) and the top of each profile is printed. At the
end each child flushes and closes its logs, verifies them against its token
(``verify_log``) and counts what they hold against the operations it ran.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
sys.path.insert(0, str(ROOT))

from bench._server import Server, add_token, reply  # noqa: E402 - after the path it needs

BEFORE = "b801766"
MESSAGE = os.urandom(1024)
#: case -> (what it does, unit, target ratio after / before or None); c0 keeps no log
CASES: dict[str, tuple[str, str, float | None]] = {
    "a": ("record('rotate'), aggregate=(), fsync per entry, checkpoint every entry", "entries/s", None),
    "b": ("log.operation('encrypt') as a context manager, default aggregation, flush per batch", "entries/s", 0.90),
    "c": ("km.encrypt 1 KiB, AuditLog(path), default aggregation, flush per batch", "messages/s", 0.90),
    "c0": ("reference: km.encrypt 1 KiB, audit=False (no log)", "messages/s", None),
    "d": ("km.suspend + km.resume, AuditLog(path)", "pairs/s", None),
}
LOGGED = ("a", "b", "c", "d")


def log(message: str) -> None:
    print(f"[audit_append {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the child: one side, one token ---------------------------------------------------------------


def _calibrate(fn: Callable[[], object], seconds: float) -> int:
    """How many calls of ``fn`` take about ``seconds``, after a warm-up (the first calls of a
    manager load its keyring and open sessions; as bench/envelope.py's measure otherwise)."""
    for _ in range(2):  # warm up, then measure
        start, n = time.perf_counter(), 0
        while n < 3 or time.perf_counter() - start < seconds / 2:
            fn()
            n += 1
    return max(3, int(n * seconds / (time.perf_counter() - start)))


def _log_counts(path: Path) -> dict[str, int]:
    """What a log holds: entries per ``op/outcome``, aggregated entries counted by their ``count``."""
    counts: dict[str, int] = {}
    with open(path, encoding="ascii") as f:
        for line in f:
            entry = json.loads(line)
            label = f"{entry['op']}/{entry['outcome']}"
            counts[label] = counts.get(label, 0) + int((entry.get("detail") or {}).get("count", 1))
    return counts


def child(tree: str, uri: str, logdir: str, seconds: float) -> None:
    """Serve timed batches of the cases on the keymgr of ``tree``: one JSON line per command on stdin."""
    sys.path.insert(0, tree)
    import keymgr  # this tree's: sys.path[0] is the tree
    from keymgr.audit import AuditLog, verify_log
    from keymgr.hsm import open_token

    where = Path(logdir)
    where.mkdir(parents=True)
    ts = open_token(uri)
    log_a = AuditLog(where / "a.log", token=ts, fsync="entry", checkpoint_every=1, aggregate=())
    log_b = AuditLog(where / "b.log", token=ts)
    log_c, log_d = AuditLog(where / "c.log"), AuditLog(where / "d.log")
    km_c = keymgr.KeyManager(uri, audit=log_c)
    km_d = keymgr.KeyManager(uri, audit=log_d)
    km_0 = keymgr.KeyManager(uri, audit=False)
    km_c.create_key("k")
    km_d.create_key("s")
    ran = {case: 0 for case in CASES}  # operations run in batches (profiled ones too)

    def op_a() -> None:
        log_a.record("rotate", key="k", version=1)

    def op_b() -> None:
        with log_b.operation("encrypt", key="k", version=1):
            pass

    def op_c() -> None:
        km_c.encrypt(MESSAGE, key="k")

    def op_c0() -> None:
        km_0.encrypt(MESSAGE, key="k")

    def op_d() -> None:
        km_d.suspend("s", 1)
        km_d.resume("s", 1)

    ops: dict[str, Callable[[], None]] = {"a": op_a, "b": op_b, "c": op_c, "c0": op_c0, "d": op_d}
    after_batch: dict[str, Callable[[], None]] = {"b": log_b.flush, "c": log_c.flush}
    sizes = {case: _calibrate(fn, seconds) for case, fn in ops.items()}
    # what the logs hold before the first batch (the calibration's operations): the check at the end
    base = {"a": _log_counts(where / "a.log").get("rotate/ok", 0)}
    for name, fn in (("b", log_b.flush), ("c", log_c.flush)):
        fn()
        base[name] = _log_counts(where / f"{name}.log").get("encrypt/ok", 0)
    base["d"] = _log_counts(where / "d.log").get("suspend/ok", 0)

    def batch(case: str, scale: int = 1) -> dict[str, float]:
        fn, n, end = ops[case], sizes[case] * scale, after_batch.get(case, lambda: None)
        cpu, start = time.process_time(), time.perf_counter()
        for _ in range(n):
            fn()
        end()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        ran[case] += n
        return {"rate": n / elapsed, "cpu_rate": n / max(cpu, 1e-9), "n": n, "seconds": elapsed}

    def profile(case: str) -> str:
        profiler = cProfile.Profile()
        profiler.enable()
        result = batch(case, 2)
        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(18)
        lines = [line for line in out.getvalue().splitlines() if line.strip()]
        start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
        head = f"{result['n']} operations in {result['seconds']:.3f} s under cProfile ({result['rate']:,.0f}/s)"
        text = "\n".join([head, *lines[start:]])
        for prefix in {str(Path(tree).resolve()), tree.rstrip("/"), str(ROOT), sys.prefix, sys.base_prefix}:
            text = text.replace(prefix + "/", "")
        return text

    reply({"ready": True, "keymgr": keymgr.__file__, "sizes": sizes})
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        if command.startswith("profile "):
            reply({"value": profile(command.split()[1])})
        else:
            reply({"value": batch(command)})
    for fn in (log_b.flush, log_c.flush, log_d.flush):
        fn()
    km_c.close()
    km_d.close()
    km_0.close()
    for each in (log_a, log_b, log_c, log_d):
        each.close()
    reports = {}
    for case in LOGGED:
        path = where / f"{case}.log"
        report = verify_log(path, token=ts)
        reports[case] = {"ok": report.ok, "entries": report.entries, "unmaced": len(report.unmaced),
                         "checkpoint_seq": report.checkpoint[0] if report.checkpoint else None,
                         "last_seq": report.last_seq, "counts": _log_counts(path)}
    expected = {"a": ("rotate/ok", base["a"] + ran["a"]), "b": ("encrypt/ok", base["b"] + ran["b"]),
                "c": ("encrypt/ok", base["c"] + ran["c"]), "d": ("suspend/ok", base["d"] + ran["d"])}
    for case, (label, want) in expected.items():
        reports[case]["expected"] = {label: want}
    reply({"logs": reports})


# -- the parent ---------------------------------------------------------------------------------


class Side(Server):
    """One child process: a keymgr tree on its own token."""

    def __init__(self, name: str, tree: Path, uri: str, logdir: Path, seconds: float, env: dict[str, str]) -> None:
        super().__init__([sys.executable, str(HERE), "--child", str(tree), uri, str(logdir), str(seconds)],
                         what=name, env={**env, "PYTHONPATH": str(tree)}, cwd=str(tree))
        if not str(Path(self.ready["keymgr"]).resolve()).startswith(str(tree.resolve()) + os.sep):
            sys.exit(f"bench: the {name} child meant for {tree} imported keymgr from {self.ready['keymgr']}")

    def logs(self) -> dict[str, Any]:
        """Stop the child; the verified logs it answers with."""
        return self.close(final_answer=True)["logs"]  # type: ignore[no-any-return]


def rate_text(rate: float) -> str:
    return f"{rate / 1000:,.1f}k" if rate >= 1000 else f"{rate:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description="audit log append rates before and after 73ee44c (one run).")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--case-seconds", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 0.1 s per case: a smoke run")
    parser.add_argument("--profile", default="auto",
                        help="auto (cases that miss their target), off, or cases to profile on both sides (e.g. b,c)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.child[2], float(args.child[3]))
        return
    if args.quick:
        args.rounds, args.case_seconds = 2, 0.1

    from bench.envelope import make_token, table

    workdir = Path(tempfile.mkdtemp(prefix="keymgr-bench-audit-"))
    uri_before = make_token(workdir)  # sets SOFTHSM2_CONF for the children too
    uri_after = add_token(uri_before, "bench-after")
    env = {key: value for key, value in os.environ.items() if key not in ("KEYMGR_AUDIT_LOG", "PYTHONPATH")}
    env.update(XDG_STATE_HOME=str(workdir / "state"), KEYMGR_HOME=str(workdir / "home"))
    tree = workdir / "before"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), BEFORE], cwd=ROOT, check=True,
                   capture_output=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True, check=False).stdout.strip()
    labels = list(CASES)
    rates: dict[str, dict[str, list[float]]] = {"before": {c: [] for c in labels}, "after": {c: [] for c in labels}}
    cpu_rates: dict[str, dict[str, list[float]]] = {side: {c: [] for c in labels} for side in ("before", "after")}
    profiles: dict[str, dict[str, str]] = {}
    try:
        log(f"before = {BEFORE} in {tree}, after = the working tree; {args.rounds} rounds of "
            f"{args.case_seconds} s per case and side")
        sides = {"before": Side("before", tree, uri_before, workdir / "logs-before", args.case_seconds, env),
                 "after": Side("after", ROOT, uri_after, workdir / "logs-after", args.case_seconds, env)}
        load_start = os.getloadavg()[0]
        for r in range(args.rounds):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for case in labels:
                for name in order:
                    answer = sides[name].ask(case)
                    rates[name][case].append(answer["rate"])
                    cpu_rates[name][case].append(answer["cpu_rate"])
            log(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{c} {rates['after'][c][-1] / rates['before'][c][-1]:.2f}" for c in labels))

        def ratios(case: str, of: dict[str, dict[str, list[float]]] = rates) -> list[float]:
            return [a / b for a, b in zip(of["after"][case], of["before"][case], strict=True)]

        if args.profile == "auto":
            wanted = [c for c in labels if (t := CASES[c][2]) is not None and statistics.median(ratios(c)) < t]
        elif args.profile == "off":
            wanted = []
        else:
            wanted = [c for c in labels if c in args.profile.split(",")]
        for case in wanted:
            log(f"profiling case {case} on both sides")
            profiles[case] = {name: sides[name].ask(f"profile {case}") for name in ("before", "after")}
        checks = {name: side.logs() for name, side in sides.items()}
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False,
                       capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"# audit log appends before and after 73ee44c\n\n{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
          f"Python {sys.version.split()[0]}; before = {BEFORE}, after = the working tree (HEAD {head}"
          f"{', with uncommitted changes' if dirty else ''}); each side in its own process on its own fresh "
          f"SoftHSM token; {args.rounds} alternating rounds of about {args.case_seconds} s per case and side; "
          f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")
    rows = []
    for case in labels:
        what, unit, target = CASES[case]
        before, after = statistics.median(rates["before"][case]), statistics.median(rates["after"][case])
        each, cpu = ratios(case), ratios(case, cpu_rates)
        ratio = statistics.median(each)
        verdict = "-" if target is None else ("met" if ratio >= target else "**not met**") + (
            " (by CPU time: " + ("met" if statistics.median(cpu) >= target else "**not met**") + ")")
        rows.append([f"({case}) {what}", unit, rate_text(before), rate_text(after), f"{ratio:.2f}",
                     f"{min(each):.2f}-{max(each):.2f}",
                     f"{statistics.median(cpu):.2f} ({min(cpu):.2f}-{max(cpu):.2f})",
                     f"{1e6 / before:,.1f} / {1e6 / after:,.1f}", f"{1e6 / after - 1e6 / before:+,.1f}",
                     "-" if target is None else f">= {target:.2f}", verdict])
    print(table(["case", "unit", "before (median)", "after (median)", "after / before (median of rounds)",
                 "per-round range", "after / before by CPU time (range)", "µs per op (before / after)", "µs added",
                 "target", ""], rows) + "\n")
    rows = []
    for name in ("before", "after"):
        for of, label in ((rates, "wall"), (cpu_rates, "CPU")):
            logged, bare = of[name]["c"], of[name]["c0"]
            added = statistics.median(1e6 / x - 1e6 / y for x, y in zip(logged, bare, strict=True))
            share = statistics.median(x / y for x, y in zip(logged, bare, strict=True))
            rows.append([name, label, f"{statistics.median(bare):,.0f}", f"{statistics.median(logged):,.0f}",
                         f"{share:.2f}", f"{added:+,.1f}"])
    print(table(["side", "time", "c0: no log, msg/s", "c: with the log, msg/s", "c / c0 (median of rounds)",
                 "µs the log adds per message (median of rounds)"], rows) + "\n")

    rows = []
    for name in ("before", "after"):
        for case in LOGGED:
            c = checks[name][case]
            label, want = next(iter(c["expected"].items()))
            got = c["counts"].get(label, 0)
            others = ", ".join(f"{k} {v:,}" for k, v in sorted(c["counts"].items()) if k != label)
            rows.append([name, case, "ok" if c["ok"] else "**broken**", f"{c['entries']:,}", str(c["unmaced"]),
                         f"{c['checkpoint_seq']} of {c['last_seq']}", f"{label}: {got:,} of {want:,}"
                         + ("" if got == want else " **mismatch**"), others or "-"])
    print(table(["side", "log", "verify_log", "entries", "unMACed", "checkpoint", "operations recorded / run",
                 "other entries"], rows))
    for case, sides_profile in profiles.items():
        print(f"\n## cProfile of case ({case}), one batch per side (sorted by own time)\n")
        for name in ("before", "after"):
            print(f"### {name}\n\n```\n{sides_profile[name]}\n```\n")


if __name__ == "__main__":
    main()
