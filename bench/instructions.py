"""Instructions per 1 KiB message, the working tree against an older commit, under callgrind.

Run: ``python bench/instructions.py [--before 602e358] [--messages 1000]`` (about two minutes;
needs valgrind: ``apt-get install valgrind``). Markdown table on stdout, progress on stderr.

Why: on a shared 2-vCPU VM a timed A/B run of one tree against itself spreads 0.95-1.01, so a
2-5 % cost of the per-message path cannot be found, nor its removal shown, by timing alone
(bench/keyring_fleet.py part 1 says whether it is there, not where). Instructions executed do not
depend on the machine's load: each (tree, case) runs in a child of its own under
``valgrind --tool=callgrind --instr-atstart=no`` on its own fresh SoftHSM token, makes its key
and warms up (300 messages) uninstrumented, and the parent switches instrumentation on
(``callgrind_control -i on``) for ``--messages`` messages only. The keyring's refresh is off in
both trees (``refresh_interval`` 1e9: under valgrind a 1 s interval would fall inside the
measured messages at random), so this counts the per-message path alone; part 3 of
bench/keyring_fleet.py measures encrypts while refreshes run. The audit log is off
(``bench._cases.manager``). Instructions are not time (a syscall counts only its user-space
side; cache misses do not count), so a ratio here explains a timed one, it does not replace it.
To see where a difference lies, keep the files (``--keep``) and compare them with
``callgrind_annotate``; counting bytecodes per Python function (``sys.settrace`` with
``f_trace_opcodes``) names the Python side (docs/performance.md, "The fact keyring").
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
sys.path.insert(0, str(ROOT))

from bench._server import Server, add_token, reply  # noqa: E402 - after the path it needs

CASES = ("gcm, no cache, encrypt", "gcm, no cache, decrypt", "kw, no cache, encrypt", "kw, no cache, decrypt",
         "gcm, cached, encrypt", "gcm, cached, decrypt")
WARM_UP = 300


def log(message: str) -> None:
    print(f"[instructions {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def case_child(tree: str, uri: str, case: str, messages: int) -> None:
    """One case of the keymgr in ``tree``: set up, warm up, then run ``messages`` messages when
    told (``go``), instrumentation switched on by the parent meanwhile."""
    import uuid

    sys.path.insert(0, tree)
    import keymgr  # first: bench._cases below must get this tree's keymgr
    from bench import _cases

    profile, cache, direction = case.split(", ")
    km = _cases.manager(uri, cache=cache == "cached")
    getattr(km, "_keyring").refresh_interval = 1e9  # noqa: B009 - both trees' keyring, no public name in 602e358
    name = f"instr-{uuid.uuid4().hex[:8]}"
    km.create_key(name, profile=profile)
    blob = km.encrypt(_cases.MESSAGE, key=name, context=_cases.CONTEXT)

    def one() -> object:
        if direction == "encrypt":
            return km.encrypt(_cases.MESSAGE, key=name, context=_cases.CONTEXT)
        return km.decrypt(blob, context=_cases.CONTEXT)

    for _ in range(WARM_UP):
        one()
    reply({"ready": True, "pid": os.getpid(), "keymgr": keymgr.__file__})
    for line in sys.stdin:
        if line.strip() == "go":
            for _ in range(messages):
                one()
            reply({"value": "done"})
        elif line.strip() == "quit":
            return


def _total(path: Path) -> int:
    """The instructions a callgrind output file counts (its ``totals:`` line: the ``summary:`` line
    above it stays 0 when instrumentation starts switched off)."""
    found = re.search(r"^totals:\s*(\d+)", path.read_text(), re.MULTILINE)
    if found is None:
        sys.exit(f"bench: no instruction total in {path}")
    return int(found.group(1))


def measure(tree: Path, uri: str, case: str, messages: int, out: Path) -> float:
    """Instructions per message of ``case`` in ``tree`` (one child under callgrind)."""
    argv = ["valgrind", "-q", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", sys.executable,
            str(HERE), "--child", str(tree), uri, case, str(messages)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    child = Server(argv, what=f"{case} in {tree.name}", env=env, cwd=str(ROOT))
    if not str(child.ready["keymgr"]).startswith(str(tree.resolve())):
        sys.exit(f"bench: the child meant for {tree} imported keymgr from {child.ready['keymgr']}")
    pid = str(child.ready["pid"])
    subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
    child.ask("go")
    subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
    child.close()
    return _total(out) / messages


def main() -> None:
    parser = argparse.ArgumentParser(description="keymgr: instructions per 1 KiB message, before vs after.")
    parser.add_argument("--before", default="602e358", help="the commit to compare with (a temporary worktree)")
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--keep", action="store_true", help="keep the callgrind files and tokens")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case_child(args.child[0], args.child[1], args.child[2], int(args.child[3]))
        return
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        sys.exit("bench: needs valgrind (apt-get install valgrind)")
    from bench.envelope import make_token, table

    workdir = Path(tempfile.mkdtemp(prefix="keymgr-bench-instr-"))
    before = workdir / "before"
    subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        uris = {"before": make_token(workdir)}
        uris["after"] = add_token(uris["before"], "bench-after")
        rows = []
        for case in CASES:
            counts = {}
            for side, tree in (("before", before), ("after", ROOT)):
                log(f"{case}: {side}")
                counts[side] = measure(tree, uris[side], case, args.messages,
                                       workdir / f"{side}-{case.replace(', ', '-').replace(' ', '_')}.cg")
            rows.append([case, f"{counts['before']:,.0f}", f"{counts['after']:,.0f}",
                         f"{counts['after'] / counts['before']:.3f}"])
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False,
                       capture_output=True)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"# Instructions per 1 KiB message, {args.before} vs the working tree\n\n{time.strftime('%Y-%m-%d %H:%M')}, "
          f"{args.messages:,} messages per case after {WARM_UP} uninstrumented, refresh off, audit off\n")
    print(table(["1 KiB message", f"before ({args.before})", "after (working tree)", "after / before"], rows))
    if args.keep:
        log(f"callgrind files and tokens kept in {workdir}")


if __name__ == "__main__":
    main()
