"""keymgr.fields on real databases: PostgreSQL (a throwaway server, tests/_postgres.py) and SQLite.

Bulk inserts, lookups through a database index on blind-index columns, context binding inside
the database, the column types refusing plaintext, and a rotation whose bulk rewrap and
re-encryption (the `keymgr fields rewrap` CLI, in a child process) is SIGKILLed twice and resumed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("KEYMGR_REQUIRE_INTEROP") != "1":
    pytest.importorskip("sqlalchemy")
import sqlalchemy as sa  # noqa: E402

import keymgr  # noqa: E402
from keymgr import errors  # noqa: E402
from keymgr.fields._format import key_ref_of  # noqa: E402
from keymgr.fields.sql import Sealed  # noqa: E402
from tests._crash_token import crash_token  # noqa: E402
from tests._fields_schema import ENCRYPTED, codec, customer, customers_table  # noqa: E402
from tests._postgres import TempPostgres, missing_reason  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def postgres() -> Iterator[TempPostgres]:
    reason = missing_reason()
    if reason is not None:
        if os.environ.get("KEYMGR_REQUIRE_INTEROP") == "1":
            pytest.fail(f"KEYMGR_REQUIRE_INTEROP=1 but {reason}")
        pytest.skip(reason)
    with TempPostgres() as server:
        yield server


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fields.db'}"
    server: TempPostgres = request.getfixturevalue("postgres")
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return server.url(name)


def _setup(km: Any, url: str, key: str, rows: int, seed: int = 7) -> tuple[sa.Engine, sa.Table, Any, Any, list]:
    engine = sa.create_engine(url)
    table = customers_table(sa.MetaData())
    table.metadata.create_all(engine)
    km.create_key(key)
    enc, store = codec(km, engine, table, key=key, index_prefix=key)
    rng = random.Random(seed)
    people = [customer(rng, i) for i in range(rows)]
    if people:
        with engine.begin() as conn:
            conn.execute(table.insert(), enc.encode_rows(people))  # one executemany
    return engine, table, enc, store, people


@pytest.mark.slow
def test_bulk_insert_find_and_decrypt(km_a, key_name, db_url) -> None:
    engine, table, enc, store, people = _setup(km_a, db_url, key_name, 300)
    assert store.count(key_name) == 1  # 900 values, one data key
    with engine.connect() as conn:
        found = enc.find(conn, "email_bidx", "  USER17@Example.com")
        assert [r["id"] for r in found] == [people[17]["id"]]
        assert found[0]["card"] == people[17]["card"] and found[0]["national_id"] == people[17]["national_id"]
        last4 = people[42]["card"][-4:]
        by_card = enc.find(conn, "card_last4_bidx", last4)
        assert people[42]["id"] in {r["id"] for r in by_card}
        assert all(r["card"].endswith(last4) for r in by_card)  # false positives of 8 bits dropped
        raw = conn.execute(sa.select(table.c.card_last4_bidx).where(enc.where("card_last4_bidx", last4))).all()
        assert len(raw) >= len(by_card)
        rows = [enc.decode(r) for r in conn.execute(sa.select(table))]
    assert sorted((r["id"], r["email"], r["card"]) for r in rows) == sorted(
        (p["id"], p["email"], p["card"]) for p in people)
    with engine.connect() as conn:
        stored = conn.execute(sa.select(table.c.card).limit(1)).scalar_one()
    assert isinstance(stored, Sealed) and len(stored) == 19 + 37


@pytest.mark.slow
def test_a_value_moved_inside_the_database_does_not_decrypt(km_a, key_name, db_url) -> None:
    engine, table, enc, _, people = _setup(km_a, db_url, key_name, 3)
    a, b = people[0]["id"], people[1]["id"]
    with engine.begin() as conn:
        card_a = conn.execute(sa.select(table.c.card).where(table.c.id == a)).scalar_one()
        conn.execute(table.update().where(table.c.id == b).values(card=card_a))  # another row
        conn.execute(table.update().where(table.c.id == a).values(email=card_a))  # another column
    with engine.connect() as conn:
        for row_id in (a, b):
            row = conn.execute(sa.select(table).where(table.c.id == row_id)).one()
            with pytest.raises(errors.IntegrityError):
                enc.decode(row)
        intact = conn.execute(sa.select(table).where(table.c.id == people[2]["id"])).one()
        assert enc.decode(intact)["card"] == people[2]["card"]


@pytest.mark.slow
def test_a_row_of_another_tenant_does_not_decrypt(km_a, key_name, db_url) -> None:
    from keymgr.fields.sql import EncryptedTable

    engine, table, enc, _, people = _setup(km_a, db_url, key_name, 0)
    acme = EncryptedTable(table, enc.cipher, extra={"tenant": "acme"})
    other = EncryptedTable(table, enc.cipher, extra={"tenant": "globex"})
    person = customer(random.Random(3), 1)
    rows = acme.encode_rows([person])
    with engine.begin() as conn:
        conn.execute(table.insert(), rows)
    with engine.connect() as conn:
        row = conn.execute(sa.select(table)).one()
        assert acme.decode(row)["card"] == person["card"]
        with pytest.raises(errors.IntegrityError):
            other.decode(row)


@pytest.mark.slow
def test_encrypted_columns_refuse_plaintext(km_a, key_name, db_url) -> None:
    engine, table, _, _, _ = _setup(km_a, db_url, key_name, 1)
    with pytest.raises(sa.exc.StatementError) as caught, engine.begin() as conn:
        conn.execute(table.insert().values(id=uuid.uuid4(), name="x", card="6222 0000 0000 1234"))
    assert isinstance(caught.value.orig, errors.ConfigurationError)


@pytest.mark.slow
def test_index_rotation_lookups_find_both_versions_until_reencrypted(km_a, key_name, db_url) -> None:
    engine, table, enc, _, people = _setup(km_a, db_url, key_name, 20)
    email_index = enc.indexes["email_bidx"][0]
    email_index.rotate()
    extra = customer(random.Random(99), 20)
    with engine.begin() as conn:
        conn.execute(table.insert(), [enc.encode(extra)])
    with engine.connect() as conn:
        assert [r["id"] for r in enc.find(conn, "email_bidx", people[3]["email"])] == [people[3]["id"]]  # v1 term
        assert [r["id"] for r in enc.find(conn, "email_bidx", extra["email"])] == [extra["id"]]  # v2 term
    from keymgr.fields.bulk import reencrypt_table

    assert reencrypt_table(engine, enc, batch=7).done == 21
    with engine.connect() as conn:
        versions = {t[0] for (t,) in conn.execute(sa.select(table.c.email_bidx))}
    assert versions == {2}


def _job_done(url: str) -> int:
    engine = sa.create_engine(url, connect_args={"timeout": 0.2} if url.startswith("sqlite") else {})
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT coalesce(max(done), 0) FROM keymgr_field_jobs")).scalar_one())
    except (sa.exc.OperationalError, sa.exc.ProgrammingError):
        return 0
    finally:
        engine.dispose()


def _cli(token_uri: str, url: str, key: str, home: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "KEYMGR_HOME": str(home), "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "keymgr", "--token", token_uri, "fields", "rewrap", "--db", url, "--table",
            "customers", "--key", key, "--reencrypt", "--batch", "20", "--no-progress"]
    for column in ENCRYPTED:
        args += ["--column", column]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_rotation_and_bulk_rewrap_survive_two_sigkills(db_url, key_name, tmp_path) -> None:
    """2,000 customers; rotate; `keymgr fields rewrap --reencrypt` killed with SIGKILL twice mid-way
    and run again: every row decrypts under the new version alone, no row lost or half-written."""
    crash = crash_token()
    token = crash.token
    rows = 2000
    with keymgr.KeyManager(token.uri()) as km:
        engine, table, enc, store, people = _setup(km, db_url, key_name, rows)
        with engine.connect() as conn:
            before = {key_ref_of(v) for (v,) in conn.execute(sa.select(table.c.card))}
        km.rotate(key_name)
    kills = 0
    for threshold in (300, 1100):
        child = _cli(token.uri(), db_url, key_name, tmp_path / "home")
        while child.poll() is None and _job_done(db_url) < threshold:
            time.sleep(0.005)
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        child.communicate(timeout=60)
        crash.mend()
        assert 0 < _job_done(db_url) < rows, "the pass must be cut short for this test to mean anything"
    assert kills == 2
    child = _cli(token.uri(), db_url, key_name, tmp_path / "home")
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    assert "resumed after" in out, out
    assert _job_done(db_url) == rows  # the cursor moved with each committed batch, never past one
    with keymgr.KeyManager(token.uri()) as km:
        km.retire(key_name, below=2, immediately=True)  # version 1 decrypts nothing any more
        enc2, _ = codec(km, engine, table, key=key_name, index_prefix=key_name)
        with engine.connect() as conn:
            got = [enc2.decode(r) for r in conn.execute(sa.select(table))]
            refs = {key_ref_of(r) for c in ENCRYPTED for (r,) in conn.execute(sa.select(table.c[c]))}
            found = enc2.find(conn, "email_bidx", people[1234]["email"])
    assert len(got) == rows
    assert sorted((r["id"], r["email"], r["card"], r["national_id"]) for r in got) == sorted(
        (p["id"], p["email"], p["card"], p["national_id"]) for p in people)
    assert not refs & before  # every value was sealed again after the rotation
    assert [r["id"] for r in found] == [people[1234]["id"]]


def _invoke(*args: str) -> tuple[int, str, str]:
    from click.testing import CliRunner

    from keymgr.cli import cli

    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.slow
def test_cli_rewrap_reports_and_is_idempotent(km_a, softhsm, key_name, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    engine, table, enc, store, people = _setup(km_a, url, key_name, 30)
    km_a.rotate(key_name)
    code, out, err = _invoke("--token", softhsm.uri(), "--json", "fields", "rewrap", "--db", url, "--table",
                             "customers", "--key", key_name)
    assert code == 0, err
    import json

    summary = json.loads(out)
    assert summary["data_keys"] == 1 and summary["data_keys_rewrapped"] == 1 and summary["rows_reencrypted"] is None
    code, out, err = _invoke("--token", softhsm.uri(), "fields", "rewrap", "--db", url, "--table", "customers",
                             "--key", key_name)
    assert code == 0 and "0 of 1 data key(s) rewrapped" in out, (out, err)
    km_a.retire(key_name, below=2, immediately=True)
    reader = codec(km_a, engine, table, key=key_name, index_prefix=key_name)[0]
    with engine.connect() as conn:
        assert len([reader.decode(r) for r in conn.execute(sa.select(table))]) == 30  # payloads untouched


@pytest.mark.parametrize("args", [
    ("--db", "sqlite:////nonexistent-dir/x.db", "--table", "customers", "--key", "k"),
    ("--db", "nosuchdialect://x", "--table", "customers", "--key", "k"),
    ("--db", "sqlite://", "--table", "customers", "--key", "k", "--reencrypt"),
])
def test_cli_errors_are_one_line(softhsm, args: tuple[str, ...]) -> None:
    code, out, err = _invoke("--token", softhsm.uri(), "fields", "rewrap", *args)
    assert code != 0
    errors_shown = [line for line in err.splitlines() if line.startswith("keymgr: error: ")]
    assert len(errors_shown) == 1 and "Traceback" not in err, err


@pytest.mark.slow
def test_insert_many_in_batches(km_a, key_name, db_url) -> None:
    engine, table, enc, store, _ = _setup(km_a, db_url, key_name, 0)
    rng = random.Random(5)
    people = [customer(rng, i) for i in range(1200)]
    for p in people[::2]:
        del p["id"]  # made by the codec
    assert enc.insert_many(engine, people, batch=500) == 1200
    with engine.connect() as conn:
        rows = [enc.decode(r) for r in conn.execute(sa.select(table))]
        found = enc.find(conn, "email_bidx", people[777]["email"])
    assert sorted(r["email"] for r in rows) == sorted(p["email"] for p in people)
    assert [r["card"] for r in found] == [people[777]["card"]]


def test_a_role_granted_masked_columns_only_sees_masked_values(km_a, key_name, postgres) -> None:
    """docs/fields.md, "Masking": PostgreSQL column privileges give an agent the masked copies and
    nothing else (no ciphertext, no blind-index terms)."""
    from keymgr.fields import mask_card

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        conn.execute(sa.text(f"CREATE ROLE agent_{name} LOGIN"))
    admin.dispose()
    url = postgres.url(name)
    engine, table, enc, _, people = _setup(km_a, url, key_name, 5)
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE customers ADD COLUMN card_masked varchar(30)"))
        for p in people:
            conn.execute(sa.text("UPDATE customers SET card_masked = :m WHERE id = :i"),
                         {"m": mask_card(p["card"]), "i": p["id"]})
        conn.execute(sa.text(f"GRANT SELECT (id, name, card_masked) ON customers TO agent_{name}"))
    agent = sa.create_engine(url.replace("keymgr@", f"agent_{name}@"))
    with agent.connect() as conn:
        masked = {r.card_masked for r in conn.execute(sa.text("SELECT card_masked FROM customers"))}
        assert masked == {mask_card(p["card"]) for p in people}
        assert all(m.startswith("6222 **** **** ") for m in masked)
    for column in ("card", "email_bidx", "*"):
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied"), agent.connect() as conn:
            conn.execute(sa.text(f"SELECT {column} FROM customers"))
    agent.dispose()
