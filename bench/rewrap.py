"""Bulk rewrap envelopes/s beside the bare unwrap + wrap rate of the token, in one run (not a test).

Run: ``python bench/rewrap.py [--token URI] [--files 1000] [--rounds 3]`` (without
``--token``, a fresh SoftHSM2 token of its own, as bench/envelope.py makes).

For each key profile (kw, gcm), ``--files`` 1 KiB messages are written to a
temporary directory under version 1; every round rotates the key (so all
files are stale again) and then measures, interleaved:

* ``bare pkcs11``: one unwrap and one wrap of a 32-byte key by python-pkcs11
  directly on keymgr's session and KEK objects (bench/_cases.py's bare calls):
  the token's ceiling for any rewrap;
* ``KeyManager.rewrap`` on the blobs in memory: parse, unwrap, commitment
  check, wrap, re-encode, no file I/O;
* ``bulk_rewrap.run`` over the directory as ``keymgr rewrap`` runs it (read,
  rewrap, temporary file, fsync, rename, directory fsync), with 1 or 4
  threads, 2 processes, and with the journal (one more fsync per file);
* ``file protocol only``: the same files read and replaced with their own bytes
  by :func:`keymgr.files.atomic_write` (temporary file, fsync, rename,
  directory fsync), no token, 1 and 4 threads: the disk's ceiling for any
  crash-safe bulk rewrap.

Rates are medians over rounds; ratios are medians of per-round ratios against
the bare rate of the same round (this shared 2-vCPU VM drifts within a minute).
docs/rewrap.md records a run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keymgr  # noqa: E402
from bench._cases import bare_cases  # noqa: E402
from bench.envelope import make_token  # noqa: E402
from keymgr.files import atomic_write  # noqa: E402
from keymgr.rewrap import bulk as bulk_rewrap  # noqa: E402

MESSAGE_SIZE = 1024
#: (label, jobs, threads, journal)
BULK = (("keymgr rewrap, 1 thread", 1, 1, False), ("keymgr rewrap, 4 threads (default)", 1, 4, False),
        ("keymgr rewrap, 2 processes x 4 threads", 2, 4, False),
        ("keymgr rewrap, 4 threads + journal", 1, 4, True))


def bare_rate(unwrap: Callable[[], object], wrap: Callable[[], object], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        unwrap()
        wrap()
    return count / (time.perf_counter() - start)


def in_memory_rate(km: keymgr.KeyManager, blobs: list[bytes]) -> float:
    start = time.perf_counter()
    for blob in blobs:
        km.rewrap(blob)
    return len(blobs) / (time.perf_counter() - start)


def bulk_rate(km: keymgr.KeyManager, folder: Path, jobs: int, threads: int, journal: Path | None) -> float:
    summary = bulk_rewrap.run(km.rewrapper(), [folder], jobs=jobs, threads=threads, journal=journal)
    if not summary.ok or summary.counts["rewrapped"] != len(list(folder.iterdir())):
        sys.exit(f"bench: bulk rewrap did not rewrap every file: {summary.to_json()}")
    return summary.counts["rewrapped"] / summary.elapsed


def file_protocol_rate(folder: Path, threads: int) -> float:
    def replace(path: Path) -> None:
        atomic_write(path, path.read_bytes(), mode=0o644)

    paths = sorted(folder.iterdir())
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(replace, paths))
    return len(paths) / (time.perf_counter() - start)


def run_profile(km: keymgr.KeyManager, profile: str, files: int, rounds: int, workdir: Path,
                bare: tuple[Callable[[], object], Callable[[], object]]) -> dict[str, list[float]]:
    key = f"bench-rewrap-{profile}-{uuid.uuid4().hex[:6]}"
    km.create_key(key, profile=profile)
    folder = workdir / profile
    folder.mkdir()
    payload = bytes(MESSAGE_SIZE)
    for i in range(files):
        (folder / f"m{i:05d}.cms").write_bytes(km.encrypt(payload, key=key, context={"n": str(i)}))
    rates: dict[str, list[float]] = {"bare": [], "memory": [], **{label: [] for label, *_ in BULK},
                                     "files 1": [], "files 4": []}
    for round_no in range(rounds):
        km.rotate(key)
        blobs = [p.read_bytes() for p in sorted(folder.iterdir())]
        rates["bare"].append(bare_rate(*bare, count=files))
        rates["memory"].append(in_memory_rate(km, blobs))
        for label, jobs, threads, journal in BULK:
            km.rotate(key)
            log = workdir / f"{profile}-{round_no}-{jobs}-{threads}.journal" if journal else None
            rates[label].append(bulk_rate(km, folder, jobs, threads, log))
        for threads in (1, 4):
            rates[f"files {threads}"].append(file_protocol_rate(folder, threads))
    return rates


def report(profile: str, rates: dict[str, list[float]]) -> None:
    print(f"\n### profile {profile}\n")
    print("| case | envelopes/s | ratio to bare unwrap+wrap | ratio to file protocol, same threads |")
    print("|---|---:|---:|---:|")
    names = {"bare": "bare pkcs11 unwrap + wrap (python-pkcs11 directly)", "memory": "KeyManager.rewrap, in memory",
             **{f"files {n}": f"file protocol only (no token), {n} thread{'s' * (n > 1)}" for n in (1, 4)}}
    for label, values in rates.items():
        ratio = statistics.median(v / b for v, b in zip(values, rates["bare"], strict=True))
        threads = 1 if "1 thread" in label else 4 if label.startswith("keymgr") else 0
        files = rates.get(f"files {threads}")
        io_ratio = f"{statistics.median(v / f for v, f in zip(values, files, strict=True)):.2f}" if files else ""
        print(f"| {names.get(label, label)} | {statistics.median(values):,.0f} | {ratio:.2f} | {io_ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--token", default=None, help="pkcs11: URI with a PIN (default: a fresh SoftHSM token)")
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="keymgr-bench-rewrap-") as tmp:
        workdir = Path(tmp)
        uri = args.token or make_token(workdir)
        data = workdir / "data"
        data.mkdir()
        with keymgr.KeyManager(uri) as km:
            kw, gcm = (f"bench-bare-{p}-{uuid.uuid4().hex[:6]}" for p in ("kw", "gcm"))
            km.create_key(kw, profile="kw")
            km.create_key(gcm, profile="gcm")
            cases = {c.name: c for c in bare_cases(km, kw, gcm)}
            print(f"bulk rewrap of {args.files} messages of {MESSAGE_SIZE} B per round, {args.rounds} rounds, "
                  f"token {km.token_info.label!r}")
            for profile in ("kw", "gcm"):
                bare = cases[f"bare pkcs11, {profile}"]
                report(profile, run_profile(km, profile, args.files, args.rounds, data, (bare.decrypt, bare.encrypt)))


if __name__ == "__main__":
    main()
