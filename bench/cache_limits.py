"""What the encrypt-side ``max_messages`` limit buys (not a test): docs/performance.md, "Cache defaults".

Run: ``python bench/cache_limits.py [--seconds 0.3] [--rounds 5]``

On a fresh SoftHSM token (as bench/envelope.py makes one), 1 KiB messages with a
context are encrypted under a ``kw`` and a ``gcm`` key by managers whose cache
allows 1, 10, 100, 1,000 and 10,000 messages per data key (``max_messages=1``
is a token call per message, as without a cache). Rounds interleave the
limits; rates are medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._cases import manager  # noqa: E402
from bench.envelope import make_token, table  # noqa: E402
from keymgr.envelope.cache import CachePolicy  # noqa: E402

LIMITS = (1, 10, 100, 1_000, 10_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    uri = make_token(Path(tempfile.mkdtemp(prefix="keymgr-cache-bench-")))
    message, context = os.urandom(1024), {"tenant": "acme"}
    setup = manager(uri)
    for profile in ("kw", "gcm"):
        setup.create_key(f"cache-{profile}", profile=profile)
    managers = {(p, n): manager(uri, cache=CachePolicy(max_messages=n)) for p in ("kw", "gcm") for n in LIMITS}
    rates: dict[tuple[str, int], list[float]] = {k: [] for k in managers}
    for _ in range(args.rounds):
        for (profile, limit), km in managers.items():
            key, count = f"cache-{profile}", 0
            end = time.perf_counter() + args.seconds
            start = time.perf_counter()
            while time.perf_counter() < end:
                km.encrypt(message, key=key, context=context)
                count += 1
            rates[(profile, limit)].append(count / (time.perf_counter() - start))
    rows = []
    for limit in LIMITS:
        row = [f"{limit:,}"]
        for profile in ("kw", "gcm"):
            rate = statistics.median(rates[(profile, limit)])
            row.append(f"{rate / 1000:,.1f}k ({1e6 / rate:,.1f} µs)")
        rows.append(row)
    print(table(["max_messages", "kw: encrypt /s (µs each)", "gcm: encrypt /s (µs each)"], rows))


if __name__ == "__main__":
    main()
