"""Encrypted database fields on PostgreSQL, beside the same table in plaintext, in one run (not a test).

Run: ``python bench/fields.py [--rows 100000] [--token URI] [--db URL]`` (without ``--token``, a
fresh SoftHSM2 token of its own; without ``--db``, a throwaway PostgreSQL server from Debian's
binaries, tests/_postgres.py). What it measures and shows (issue 16):

* insert of ``--rows`` customers, three encrypted fields and two blind indexes per row (the
  data-key cache on: :meth:`KeyManager.fields`' default limits), against the same rows in
  plaintext with ordinary indexes: both in batches of 5,000 rows per ``executemany``, one
  transaction per batch, sealing included in the encrypted time;
* lookup by e-mail (the two lookups take turns e-mail by e-mail; both return the rows as dicts):
  blind-index term (a host HMAC under the subkey the token derived for the
  index's context; ``--token-only-index``: one HMAC in the token), ``WHERE email_bidx IN (...)``
  through the database index, decrypt, false positives dropped; against ``WHERE email = ...``
  on the plaintext table (EXPLAIN shows the index used);
* bytes per value: a 19-byte card number as stored, and the data-key table's share;
* HMAC-SHA256 per second: in the token (raw C_Sign), ``BlindIndex.term`` in both modes (host
  subkeys, the default, and token only), and on the host (``hmac.digest``);
* rotation, then ``keymgr fields rewrap --reencrypt`` over the whole table in a child
  process, SIGKILLed twice and run again; afterwards the old version is retired and every
  row must decrypt, none missing.

``--encode-only``: no PostgreSQL; µs a row of ``EncryptedTable.encode_rows`` alone (seal the
three fields, compute the two terms) in calls of 5,000 rows, on a SQLite file database (its
data-key table), ``--rounds`` times, beside the same encoding as ``insert_many`` does it (plain
bytes, no marker objects): the host's share of an insert, without the database's.
"""

from __future__ import annotations

import argparse
import gc
import hmac
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sqlalchemy as sa  # noqa: E402

import keymgr  # noqa: E402
from bench.envelope import make_token  # noqa: E402
from keymgr.fields._format import OVERHEAD, key_ref_of  # noqa: E402
from keymgr.fields.sql import EncryptedTable  # noqa: E402
from keymgr.hsm import objects  # noqa: E402
from tests._fields_schema import ENCRYPTED, codec, customer, customers_table, plain_row, plain_table  # noqa: E402
from tests._internals import token_of  # noqa: E402
from tests._postgres import TempPostgres  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BATCH = 5_000


def timed_inserts(engine: sa.Engine, table: sa.Table, rows: list[dict[str, Any]], seal: Any = None) -> float:
    start = time.perf_counter()
    for i in range(0, len(rows), BATCH):
        chunk = rows[i:i + BATCH]
        params = seal(chunk) if seal else chunk
        with engine.begin() as conn:
            conn.execute(table.insert(), params)
    return time.perf_counter() - start


def lookups(engine: sa.Engine, plain: Any, encrypted: Any, emails: list[str]) -> tuple[float, float, float]:
    """Median seconds per plaintext and per blind-index lookup, and the median of the per-e-mail
    ratios. The two take turns e-mail by e-mail (the first one flips every time) on one
    connection, after a warm-up pass of each, so a burst of other work on the machine lands on
    both instead of on whichever ran during it."""
    times: dict[Any, list[float]] = {plain: [], encrypted: []}
    with engine.connect() as conn:
        for email in emails[:200]:
            plain(conn, email)
            encrypted(conn, email)
        for i, email in enumerate(emails):
            for fn in (plain, encrypted) if i % 2 else (encrypted, plain):
                start = time.perf_counter()
                fn(conn, email)
                times[fn].append(time.perf_counter() - start)
    ratios = [e / p for p, e in zip(times[plain], times[encrypted], strict=True)]
    return statistics.median(times[plain]), statistics.median(times[encrypted]), statistics.median(ratios)


def rate(fn: Any, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def job_done(engine: sa.Engine) -> int:
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT coalesce(max(done), 0) FROM keymgr_field_jobs")).scalar_one())
    except sa.exc.SQLAlchemyError:
        return 0


def killed_rewrap(uri: str, url: str, engine: sa.Engine, rows: int, token_file: Path | None) -> list[str]:
    """The CLI pass, SIGKILLed at about a third and two thirds, then run to the end."""
    good = token_file.read_bytes() if token_file else None
    log: list[str] = []
    args = [sys.executable, "-m", "keymgr", "--token", uri, "fields", "rewrap", "--db", url, "--table", "customers",
            "--key", "customers", "--reencrypt", "--batch", "500", "--no-progress"]
    for column in ENCRYPTED:
        args += ["--column", column]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for threshold in (rows // 3, 2 * rows // 3):
        start = time.perf_counter()
        child = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while child.poll() is None and job_done(engine) < threshold:
            time.sleep(0.01)
        killed = child.poll() is None
        if killed:
            os.kill(child.pid, signal.SIGKILL)
        child.communicate()
        if good is not None and token_file is not None and token_file.stat().st_size < len(good):
            token_file.write_bytes(good)  # SoftHSM's own file, cut by the kill mid-login (STACK-FACTS 23)
        log.append(f"run {len(log) + 1}: {'SIGKILL' if killed else 'ended'} after {time.perf_counter() - start:.1f} s"
                   f" with {job_done(engine)} rows committed")
    start = time.perf_counter()
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    log.append(f"run 3: finished in {time.perf_counter() - start:.1f} s: {' / '.join(out.strip().splitlines())}")
    return log


def encode_only(rows: int, rounds: int, uri: str, workdir: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{workdir / 'encode.db'}")
    metadata = sa.MetaData()
    table = customers_table(metadata)
    metadata.create_all(engine)
    rng = random.Random(16)
    people = [customer(rng, i) for i in range(rows)]
    with keymgr.KeyManager(uri) as km:
        km.create_key("customers")
        enc, _ = codec(km, engine, table, key="customers", index_prefix="customers", email_bits=15, last4_bits=12)
        enc.encode_rows(people[:BATCH])  # the first data key and the two subkeys: once per process
        times: dict[str, list[float]] = {"encode_rows (Sealed and Term markers)": [],
                                         "insert_many's encoding (plain bytes)": []}
        def plain_bytes(chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return enc._encode(chunk, marked=False)  # noqa: SLF001 - what insert_many calls

        encoders = dict(zip(times, (enc.encode_rows, plain_bytes), strict=True))
        for _ in range(rounds):
            for name, encode in encoders.items():  # the two take turns
                gc.collect()
                start = time.perf_counter()
                for i in range(0, rows, BATCH):
                    encode(people[i:i + BATCH])
                times[name].append((time.perf_counter() - start) / rows * 1e6)
    for name, spent in times.items():
        print(f"{name}, {rows:,} rows in calls of {BATCH:,} (3 fields, 2 blind indexes), µs a row over {rounds} "
              f"rounds: min {min(spent):.1f}, median {statistics.median(spent):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--lookups", type=int, default=2_000)
    parser.add_argument("--token", default=None, help="pkcs11: URI with a PIN (default: a fresh SoftHSM token)")
    parser.add_argument("--db", default=None, help="PostgreSQL URL (default: a throwaway server)")
    parser.add_argument("--email-bits", type=int, default=15,
                        help="e-mail index bits (docs/fields.md, 'Choosing bits')")
    parser.add_argument("--token-only-index", action="store_true",
                        help="blind indexes with host_subkeys=False: one token HMAC per term")
    parser.add_argument("--encode-only", action="store_true",
                        help="no database server: time EncryptedTable.encode_rows alone (SQLite data-key table)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of --encode-only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="keymgr-bench-fields-") as tmp:
        workdir = Path(tmp)
        os.environ["KEYMGR_HOME"] = str(workdir / "home")
        os.environ.setdefault("KEYMGR_AUDIT_LOG", str(workdir / "audit.log"))
        uri = args.token or make_token(workdir)
        if args.encode_only:
            encode_only(args.rows, args.rounds, uri, workdir)
            return
        token_file = next((workdir / "tokens").glob("*/token.object"), None) if not args.token else None
        server = None if args.db else TempPostgres().start()
        try:
            run(args, uri, args.db or server.url(), token_file)  # type: ignore[union-attr]
        finally:
            if server is not None:
                server.stop()


def run(args: argparse.Namespace, uri: str, url: str, token_file: Path | None) -> None:
    engine = sa.create_engine(url)
    metadata = sa.MetaData()
    table, plain = customers_table(metadata), plain_table(metadata)
    bare = customers_table(metadata, "customers_fields_only")
    metadata.create_all(engine)
    rng = random.Random(16)
    people = [customer(rng, i) for i in range(args.rows)]
    with keymgr.KeyManager(uri) as km:
        km.create_key("customers")
        # bits per docs/fields.md "Choosing bits": 2^bits <= distinct values / 2 (>= 2 values per term)
        enc, store = codec(km, engine, table, key="customers", index_prefix="customers", email_bits=args.email_bits,
                           last4_bits=12, host_subkeys=not args.token_only_index)
        plain_s = timed_inserts(engine, plain, [plain_row(p) for p in people])
        fields_only = EncryptedTable(bare, km.fields("customers", store=store))  # no blind index: no token call
        start = time.perf_counter()
        fields_only.insert_many(engine, people, batch=BATCH)
        bare_s = time.perf_counter() - start
        start = time.perf_counter()
        enc.insert_many(engine, people, batch=BATCH)
        enc_s = time.perf_counter() - start
        with engine.begin() as conn:
            conn.execute(sa.text("ANALYZE"))
        sample = [p["email"] for p in rng.sample(people, min(args.lookups, len(people)))]
        plain_q = sa.select(plain).where(plain.c.email == sa.bindparam("e"))
        plain_lookup, enc_lookup, lookup_ratio = lookups(
            engine, lambda conn, e: [dict(r._mapping) for r in conn.execute(plain_q, {"e": e})],
            lambda conn, e: enc.find(conn, "email_bidx", e), sample)
        with engine.connect() as conn:
            plan = " | ".join(r[0] for r in conn.execute(sa.text(
                "EXPLAIN SELECT * FROM customers WHERE email_bidx IN (:t)"), {"t": enc.indexes["email_bidx"][0]
                                                                            .term(sample[0])}))
            cards = [len(v) for (v,) in conn.execute(sa.select(table.c.card).limit(1000))]
            key_rows = conn.execute(sa.select(store.table)).all()
        key_row_bytes = statistics.mean(len(r.key_ref) + len(r.key_name) + len(r.recipient) + len(r.commitment)
                                        for r in key_rows)
        index = enc.indexes["email_bidx"][0]
        key_id = index.key_ids()[0]
        ts = token_of(km)
        n = 20_000
        token_raw = rate(lambda i: objects.hmac_sha256(ts, key_id, b"user%d@example.com" % i), n)
        host_index = km.blind_index("customers-email", bits=args.email_bits, cache=0)
        token_index = km.blind_index("customers-email", bits=args.email_bits, cache=0, host_subkeys=False)
        context = enc.index_context("email_bidx")
        subkey_term = rate(lambda i: host_index.term(f"user{i}@example.com", context=context), n * 5)
        token_term = rate(lambda i: token_index.term(f"user{i}@example.com", context=context), n)
        host_key = os.urandom(32)
        host = rate(lambda i: hmac.digest(host_key, b"user%d@example.com" % i, "sha256"), n * 10)
        with engine.connect() as conn:
            before = {key_ref_of(v) for (v,) in conn.execute(sa.select(table.c.card))}
        km.rotate("customers")
    kills = killed_rewrap(uri, url, engine, args.rows, token_file)
    with keymgr.KeyManager(uri) as km:
        km.retire("customers", below=2, immediately=True)  # this bench is the only host
        enc2, _ = codec(km, engine, table, key="customers", index_prefix="customers", email_bits=args.email_bits,
                        last4_bits=12, host_subkeys=not args.token_only_index)
        start = time.perf_counter()
        with engine.connect() as conn:
            got = {r["id"]: r for r in map(enc2.decode, conn.execute(sa.select(table)))}
            after = {key_ref_of(v) for c in ENCRYPTED for (v,) in conn.execute(sa.select(table.c[c]))}
        check_s = time.perf_counter() - start
    intact = sum(got.get(p["id"], {}).get("card") == p["card"] and got[p["id"]]["email"] == p["email"]
                 and got[p["id"]]["national_id"] == p["national_id"] for p in people)
    values = 2 * 3 * args.rows  # the data-key table serves both encrypted tables
    mode = "token only" if args.token_only_index else "host subkeys"
    print(f"## keymgr.fields on PostgreSQL, {args.rows:,} customers (3 encrypted fields, 2 blind indexes ({mode}): "
          f"e-mail {args.email_bits} bits, last four 12 bits)\n")
    print("| measure | plaintext | encrypted | ratio |\n|---|---|---|---|")
    print(f"| insert, rows/s | {args.rows / plain_s:,.0f} | {args.rows / enc_s:,.0f} | {plain_s / enc_s:.2f}x |")
    print(f"| insert, rows/s, 3 encrypted fields without the 2 blind indexes | {args.rows / plain_s:,.0f} | "
          f"{args.rows / bare_s:,.0f} | {plain_s / bare_s:.2f}x |")
    print(f"| lookup by e-mail, median ms (ratio: median of per-e-mail ratios, taking turns) | "
          f"{plain_lookup * 1e3:.3f} | {enc_lookup * 1e3:.3f} | {lookup_ratio:.2f}x time |")
    print(f"\nEXPLAIN of the blind-index lookup: {plan}")
    print(f"\nstored card (19 bytes): {statistics.mean(cards):.0f} bytes (overhead {OVERHEAD} = 1 version + 8 key_ref"
          f" + 12 nonce + 16 tag); data-key table: {len(key_rows)} rows of ~{key_row_bytes:.0f} bytes for "
          f"{values:,} values = {len(key_rows) * key_row_bytes / values:.3f} bytes per value")
    print("\n| HMAC-SHA256 of an e-mail | per second |\n|---|---|")
    print(f"| token C_Sign (objects.hmac_sha256) | {token_raw:,.0f} |")
    print(f"| BlindIndex.term, token only (one C_Sign; normalise, audit) | {token_term:,.0f} |")
    print(f"| BlindIndex.term, host subkey (default; normalise, audit) | {subkey_term:,.0f} |")
    print(f"| host hmac.digest | {host:,.0f} |")
    print(f"| ratio host-subkey term / token-only term | {subkey_term / token_term:.0f}x |")
    print("\nrotation, then `keymgr fields rewrap --reencrypt`:")
    for line in kills:
        print(f"- {line}")
    print(f"- after retiring version 1: {len(got):,} rows read, {intact:,} intact (all three fields equal to what "
          f"was inserted), {len(after & before)} values still under a pre-rotation data key; read+decrypt "
          f"{check_s:.1f} s")
    if intact != args.rows or after & before:
        sys.exit("bench: rows lost or not re-encrypted")


if __name__ == "__main__":
    main()
