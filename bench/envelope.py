"""keymgr envelope encryption against its baselines and peers, in one run (not a test).

Run: ``bash scripts/bench.sh`` (sets up the ``bench`` extra, then runs this), or
``python bench/envelope.py [--token URI] [--rounds 7] [--case-seconds 0.2] [--quick]``.

Without ``--token`` it makes a fresh SoftHSM2 token of its own (file object
store, as the tests use) in a temporary directory. It prints markdown tables:

1. 1 KiB messages, encrypt and decrypt per second: keymgr per profile without
   a cache and with one; ``cryptography`` AESGCM; the bare python-pkcs11 calls
   each profile makes, on the same token, alone and with the AESGCM around them
   (the floor for keymgr); Tink AEAD and KmsEnvelopeAead; the AWS Encryption SDK.
   Cases are interleaved round by round and each rate is the median of the
   rounds, each ratio the median of per-round ratios (this 2-vCPU VM drifts by
   20-30 % within a minute).
2. Ratios against the targets of issue 3.
3. 64 MiB and 1 GiB streams (each size in its own process): MiB/s and peak
   RSS growth, beside raw AESGCM over the same segments.
4. 1 process against 2 on 1 KiB round trips without a cache.
5. ``import keymgr`` time, and its peers'.

docs/performance.md records a run and what follows from it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
HERE = Path(__file__).resolve()


def make_token(workdir: Path) -> str:
    """A fresh SoftHSM2 token ``bench`` (its own config); SOFTHSM2_CONF is set for this process and its children."""
    from keymgr.hsm.discovery import SOFTHSM_CANDIDATES

    module = next((c for c in SOFTHSM_CANDIDATES if os.path.isfile(c)), None)
    if module is None:
        sys.exit("bench: SoftHSM2 is not installed (run scripts/setup.sh)")
    (workdir / "tokens").mkdir()
    conf = workdir / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {workdir / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench", "--so-pin", "bench-so",
                    "--pin", "bench-pin"], check=True, capture_output=True)
    return f"pkcs11:token=bench?module-path={module}&pin-value=bench-pin"


def measure(cases: list, rounds: int, seconds: float) -> dict[str, list[float]]:  # type: ignore[type-arg]
    """ops/s per (case, direction) for each round; every round visits every case."""
    ops = [(f"{case.name}|{direction}", getattr(case, direction)) for case in cases
           for direction in ("encrypt", "decrypt")]
    sizes = {}
    for label, op in ops:  # calibrate: about ``seconds`` per case and round
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds / 4:
            op()
            n += 1
        sizes[label] = max(5, int(n * 4 / ((time.perf_counter() - start) / (seconds / 4)) / 4))
    rates: dict[str, list[float]] = {label: [] for label, _ in ops}
    for _ in range(rounds):
        for label, op in ops:
            n = sizes[label]
            start = time.perf_counter()
            for _ in range(n):
                op()
            rates[label].append(n / (time.perf_counter() - start))
    return rates


def median_ratio(rates: dict[str, list[float]], top: str, bottom: str) -> float:
    return statistics.median(a / b for a, b in zip(rates[top], rates[bottom], strict=True))


def child(args: list[str]) -> dict:  # type: ignore[type-arg]
    proc = subprocess.run([sys.executable, str(HERE), "--child", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"bench child failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def processes(uri: str, key: str, count: int, seconds: float) -> float:
    """Round trips per second summed over ``count`` processes started together."""
    start_at = time.time() + 3.0
    procs = [subprocess.Popen([sys.executable, str(HERE), "--child", "messages", uri, key, str(seconds), str(start_at)],
                              stdout=subprocess.PIPE, text=True) for _ in range(count)]
    total = 0
    for proc in procs:
        out, _ = proc.communicate()
        total += json.loads(out.strip().splitlines()[-1])["round_trips"]
    return total / seconds


def import_time(statement: str, runs: int = 7) -> float:
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    times = []
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                              cwd=str(HERE.parents[1]))
        if proc.returncode != 0:
            return float("nan")
        times.append(float(proc.stdout))
    return statistics.median(times) * 1000


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def k(rate: float) -> str:
    return f"{rate / 1000:,.1f}k" if rate >= 1000 else f"{rate:,.0f}"


def message_tables(rates: dict[str, list[float]], names: list[str]) -> str:
    rows = []
    for name in names:
        enc, dec = (statistics.median(rates[f"{name}|{d}"]) for d in ("encrypt", "decrypt"))
        rows.append([name, k(enc), k(dec), f"{1e6 / enc:,.1f} / {1e6 / dec:,.1f}"])
    return table(["1 KiB message", "encrypt /s", "decrypt /s", "µs per op (enc / dec)"], rows)


def ratio_table(rates: dict[str, list[float]]) -> str:
    checks = [
        ("keymgr kw, no cache / bare pkcs11 + raw AESGCM, kw", "keymgr, kw profile, no cache",
         "bare pkcs11 + raw AESGCM, kw", 0.8),
        ("keymgr gcm, no cache / bare pkcs11 + raw AESGCM, gcm", "keymgr, gcm profile, no cache",
         "bare pkcs11 + raw AESGCM, gcm", 0.8),
        ("keymgr cached / Tink KmsEnvelopeAead", "keymgr, with cache (kw key)", "Tink KmsEnvelopeAead (local KEK)",
         1.0),
        ("keymgr cached / AWS ESDK caching CMM", "keymgr, with cache (kw key)",
         "AWS ESDK raw AES, caching CMM (unsigned)", 10.0),
        ("bare pkcs11 + keymgr format layer / bare pkcs11 + raw AESGCM, kw", "bare pkcs11 + keymgr format layer, kw",
         "bare pkcs11 + raw AESGCM, kw", None),
        ("bare pkcs11 + keymgr format layer / bare pkcs11 + raw AESGCM, gcm", "bare pkcs11 + keymgr format layer, gcm",
         "bare pkcs11 + raw AESGCM, gcm", None),
        ("keymgr kw, no cache / bare pkcs11 + keymgr format layer, kw", "keymgr, kw profile, no cache",
         "bare pkcs11 + keymgr format layer, kw", None),
        ("keymgr gcm, no cache / bare pkcs11 + keymgr format layer, gcm", "keymgr, gcm profile, no cache",
         "bare pkcs11 + keymgr format layer, gcm", None),
        ("keymgr gcm, no cache / keymgr kw, no cache", "keymgr, gcm profile, no cache", "keymgr, kw profile, no cache",
         None),
        ("keymgr kw, audit log on / off", "keymgr, kw profile, no cache, audit log on", "keymgr, kw profile, no cache",
         None),
    ]
    rows = []
    for label, top, bottom, target in checks:
        enc, dec = (median_ratio(rates, f"{top}|{d}", f"{bottom}|{d}") for d in ("encrypt", "decrypt"))
        verdict = "" if target is None else ("met" if min(enc, dec) >= target else "met for encrypt"
                                             if enc >= target else "met for decrypt" if dec >= target else "not met")
        rows.append([label, f"{enc:.2f}", f"{dec:.2f}", "-" if target is None else f">= {target:g}", verdict])
    return table(["ratio (median of per-round ratios)", "encrypt", "decrypt", "target", ""], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description="keymgr envelope benchmark (one process, one run).")
    parser.add_argument("--token", help="pkcs11: URI of the token (default: a fresh SoftHSM token)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--case-seconds", type=float, default=0.2)
    parser.add_argument("--quick", action="store_true", help="no 1 GiB stream, shorter process runs")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        from bench._children import run_child

        run_child(args.child)
        return
    workdir = Path(tempfile.mkdtemp(prefix="keymgr-bench-"))
    uri = args.token or make_token(workdir)

    from bench import _cases

    km = _cases.manager(uri)  # audit off: the peers keep no log; one row below with it on
    cached = _cases.manager(uri, cache=True)
    audited = _cases.manager(uri, audit=str(workdir / "audit.log"))
    suffix = uuid.uuid4().hex[:8]
    kw_key, gcm_key = f"bench-kw-{suffix}", f"bench-gcm-{suffix}"
    km.create_key(kw_key, profile="kw")
    km.create_key(gcm_key, profile="gcm")
    cases = [*_cases.raw_cases(), *_cases.bare_cases(km, kw_key, gcm_key),
             _cases.keymgr_case("keymgr, kw profile, no cache", km, kw_key),
             _cases.keymgr_case("keymgr, gcm profile, no cache", km, gcm_key),
             _cases.keymgr_case("keymgr, with cache (kw key)", cached, kw_key),
             _cases.keymgr_case("keymgr, with cache (gcm key)", cached, gcm_key),
             _cases.keymgr_case("keymgr, kw profile, no cache, audit log on", audited, kw_key),
             *_cases.format_cases(), *_cases.tink_cases(), *_cases.esdk_cases()]
    print(f"# keymgr envelope benchmark\n\n{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
          f"Python {sys.version.split()[0]}, token {km.token_info.label!r}; {args.rounds} interleaved rounds; "
          f"load average {os.getloadavg()[0]:.1f} (other work on the machine skews rates, less so ratios)\n",
          flush=True)
    rates = measure(cases, args.rounds, args.case_seconds)
    print(message_tables(rates, [c.name for c in cases]) + "\n")
    print(ratio_table(rates) + "\n", flush=True)

    rows = []
    for size in (64, *(() if args.quick else (1024,))):
        r = child(["stream", uri, kw_key, str(size * 1024 * 1024), str(workdir)])
        rows.append([f"{size} MiB" if size < 1024 else "1 GiB", *(f"{x:,.0f} / {y:,.0f}" for x, y in (
            r["keymgr"], r["raw_io"], r["raw_mem"])),
            f"{r['vs_io'][0]:.2f} / {r['vs_io'][1]:.2f}", f"{r['vs_mem'][0]:.2f} / {r['vs_mem'][1]:.2f}",
            f"{r['rss_growth_mib'][0]:.1f} / {r['rss_growth_mib'][1]:.1f} (of {r['rss_baseline_mib']:.0f})"])
    print(table(["stream (enc / dec)", "keymgr MiB/s", "raw io MiB/s", "raw mem MiB/s", "keymgr / raw io",
                 "keymgr / raw mem", "peak RSS growth MiB"], rows) + "\n", flush=True)

    seconds = 2.0 if args.quick else 4.0
    rows = []
    for name, key in (("gcm", gcm_key), ("kw", kw_key)):
        one, two = processes(uri, key, 1, seconds), processes(uri, key, 2, seconds)
        rows.append([f"keymgr {name}, no cache", k(one), k(two), f"{two / one:.2f}"])
    print(table(["1 KiB round trips (encrypt + decrypt) /s", "1 process", "2 processes", "2 / 1"], rows) + "\n")

    statements = ["import keymgr", "import keymgr; keymgr.KeyManager", "import keymgr.cli",
                  *(f"import {m}" for m in ("cryptography.hazmat.primitives.ciphers.aead", "pkcs11", "tink",
                                            "aws_encryption_sdk"))]
    rows = [[f"`{s}`", f"{import_time(s):.0f}"] for s in statements]
    print(table(["import", "ms (median of 7 fresh processes)"], rows))
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    km.close()
    cached.close()
    audited.close()


if __name__ == "__main__":
    main()
