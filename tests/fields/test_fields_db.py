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

#: every test here is slow (a PostgreSQL server and a database per test):
#: `pytest -m "not slow"` skips the module, CI runs it
pytestmark = pytest.mark.slow

if os.environ.get("KEYMGR_REQUIRE_INTEROP") != "1":
    pytest.importorskip("sqlalchemy")
import sqlalchemy as sa  # noqa: E402

import keymgr  # noqa: E402
from keymgr import errors  # noqa: E402
from keymgr.fields._format import key_ref_of  # noqa: E402
from keymgr.fields.sql import Sealed  # noqa: E402
from tests._crash_token import crash_token  # noqa: E402
from tests._fields_schema import ENCRYPTED, codec, customer, customers_table  # noqa: E402
from tests._postgres import TempPostgres  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


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


def _setup(km: Any, url: str, key: str, rows: int, seed: int = 7,
           host_subkeys: bool = True) -> tuple[sa.Engine, sa.Table, Any, Any, list]:
    engine = sa.create_engine(url)
    table = customers_table(sa.MetaData())
    table.metadata.create_all(engine)
    km.create_key(key)
    enc, store = codec(km, engine, table, key=key, index_prefix=key, host_subkeys=host_subkeys)
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
def test_encrypted_columns_refuse_plaintext_without_showing_it(km_a, key_name, db_url) -> None:
    """Plaintext given to an encrypted column: keymgr's ConfigurationError itself, not SQLAlchemy's
    StatementError, whose text lists the statement's parameters (the plaintext among them)."""
    engine, table, _, _, _ = _setup(km_a, db_url, key_name, 1)
    secret = "6222 0000 0000 1234"
    for statement in (table.insert().values(id=uuid.uuid4(), name="x", card=secret),
                      table.update().values(email=secret)):
        with pytest.raises(errors.ConfigurationError) as caught, engine.begin() as conn:
            conn.execute(statement)
        assert not isinstance(caught.value, sa.exc.StatementError)
        chain: BaseException | None = caught.value
        seen: set[int] = set()
        while chain is not None and id(chain) not in seen:
            seen.add(id(chain))
            assert secret not in str(chain) and secret not in repr(chain)
            chain = chain.__cause__ or chain.__context__


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


@pytest.mark.slow
def test_a_token_only_index_finds_its_rows_and_a_host_subkey_index_does_not(km_a, key_name, db_url) -> None:
    """The two modes write different terms (docs/fields.md): each finds its own rows, through the
    database index, and a token-only table re-encrypted after a rotation is found in host mode."""
    engine, table, enc, _, people = _setup(km_a, db_url, key_name, 12, host_subkeys=False)
    host_enc, _ = codec(km_a, engine, table, key=key_name, index_prefix=key_name)
    email = people[5]["email"]
    with engine.connect() as conn:
        assert [r["id"] for r in enc.find(conn, "email_bidx", email)] == [people[5]["id"]]
        assert people[5]["id"] not in [r["id"] for r in host_enc.find(conn, "email_bidx", email)]
    from keymgr.fields.bulk import reencrypt_table

    host_enc.indexes["email_bidx"][0].rotate()
    host_enc.indexes["card_last4_bidx"][0].rotate()
    assert reencrypt_table(engine, host_enc, batch=5).done == 12
    with engine.connect() as conn:
        assert [r["id"] for r in host_enc.find(conn, "email_bidx", email)] == [people[5]["id"]]


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
    ids = enc.insert_many(engine, (p for p in people), batch=500)  # a generator: batched as it comes
    assert len(ids) == 1200 and len(set(ids)) == 1200
    assert all(ids[i] == people[i]["id"] for i in range(1, 1200, 2))  # given ids kept, in order
    with engine.connect() as conn:
        assert {r.id for r in conn.execute(sa.select(table.c.id))} == set(ids)  # the generated ones returned
        rows = [enc.decode(r) for r in conn.execute(sa.select(table))]
        found = enc.find(conn, "email_bidx", people[777]["email"])
    assert sorted(r["email"] for r in rows) == sorted(p["email"] for p in people)
    assert [r["card"] for r in found] == [people[777]["card"]]


def test_a_suspension_between_two_insert_batches_stops_the_second(km_a, key_name, db_url) -> None:
    """insert_many seals and commits batch by batch: a suspension made after the first batch is
    committed refuses the second at its one check of the key's state (PolicyError), and none of
    the second batch's rows is written; the first batch's rows all decrypt."""
    engine, table, enc, _, _ = _setup(km_a, db_url, key_name, 0)
    rng = random.Random(9)
    people = [customer(rng, i) for i in range(600)]

    def rows() -> Iterator[dict[str, Any]]:
        for i, person in enumerate(people):
            if i == 300:  # asked for after the first batch's transaction committed
                km_a.suspend(key_name, 1)
            yield person

    with pytest.raises(errors.PolicyError):
        enc.insert_many(engine, rows(), batch=300)
    km_a.resume(key_name, 1)  # a suspended version decrypts nothing either
    with engine.connect() as conn:
        stored = [enc.decode(r) for r in conn.execute(sa.select(table))]
    assert sorted((r["id"], r["card"], r["email"]) for r in stored) == sorted(
        (p["id"], p["card"], p["email"]) for p in people[:300])


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


# -- review of issue 16 ------------------------------------------------------------------------------


def _accounts(metadata: sa.MetaData, pk: Any = sa.String(64), schema: str | None = None) -> sa.Table:
    from keymgr.fields.sql import BlindIndexTerm, EncryptedBytes, EncryptedText

    return sa.Table("acct", metadata, sa.Column("id", pk, primary_key=True), sa.Column("tenant", sa.String(20)),
                    sa.Column("email", EncryptedText), sa.Column("blob", EncryptedBytes),
                    sa.Column("email_bidx", BlindIndexTerm), sa.Column("blob_bidx", BlindIndexTerm),
                    schema=schema)


def _accounts_in(url: str, km: Any, key: str) -> tuple[sa.Engine, sa.Table]:
    """An engine on ``url`` with the ``acct`` table made, and key ``key`` created."""
    engine = sa.create_engine(url)
    table = _accounts(sa.MetaData())
    table.metadata.create_all(engine)
    km.create_key(key)
    return engine, table


def _accounts_codec(km: Any, engine: sa.Engine, table: sa.Table, key: str, bits: int = 32,
                    extra: dict[str, str] | None = None) -> Any:
    from keymgr.fields import lowercase
    from keymgr.fields.sql import EncryptedTable, SqlKeyStore

    store = SqlKeyStore(engine)
    store.create()
    email = km.blind_index(f"{key}-email", bits=bits, normalise=lowercase)
    blob = km.blind_index(f"{key}-blob", bits=64)
    return EncryptedTable(table, km.fields(key, store=store), extra=extra,
                          indexes={"email_bidx": (email, "email"), "blob_bidx": (blob, "blob")})


def test_string_keys_that_spell_one_uuid_are_different_rows(km_a, key_name, db_url) -> None:
    engine, table = _accounts_in(db_url, km_a, key_name)
    enc = _accounts_codec(km_a, engine, table, key_name)
    keys = ["A" * 32, "a" * 8 + "-" + "a" * 4 + "-" + "a" * 4 + "-" + "a" * 4 + "-" + "a" * 12,
            "a-a-a-a-" + "a" * 28]
    with engine.begin() as conn:
        conn.execute(table.insert(), enc.encode_rows([{"id": k, "email": f"{i}@x"} for i, k in enumerate(keys)]))
        first = conn.execute(sa.select(table.c.email).where(table.c.id == keys[0])).scalar_one()
        for k in keys[1:]:
            conn.execute(table.update().where(table.c.id == k).values(email=first))
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(sa.select(table))}
    assert enc.decode(rows[keys[0]])["email"] == "0@x"
    for k in keys[1:]:
        with pytest.raises(errors.IntegrityError):
            enc.decode(rows[k])


def _two_tenant_schemas(km: Any, key: str, postgres: Any) -> tuple[sa.Engine, sa.Table, sa.Table, Any, Any]:
    """A fresh database with schemas tenant_a and tenant_b, an ``acct`` table in each, and a codec
    for each under key ``key`` (made here) sharing one data-key table."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    engine = sa.create_engine(postgres.url(name))
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA tenant_a; CREATE SCHEMA tenant_b"))
    km.create_key(key)
    a, b = _accounts(sa.MetaData(), schema="tenant_a"), _accounts(sa.MetaData(), schema="tenant_b")
    for t in (a, b):
        t.metadata.create_all(engine)
    return engine, a, b, _accounts_codec(km, engine, a, key), _accounts_codec(km, engine, b, key)


def test_schema_per_tenant_tables_are_different_places(km_a, key_name, postgres) -> None:
    engine, a, b, enc_a, enc_b = _two_tenant_schemas(km_a, key_name, postgres)
    with engine.begin() as conn:
        conn.execute(a.insert(), enc_a.encode_rows([{"id": "5", "email": "alice@a"}]))
        conn.execute(b.insert(), enc_b.encode_rows([{"id": "5", "email": "bob@b"}]))
        value_a = conn.execute(sa.select(a.c.email)).scalar_one()
        conn.execute(b.update().values(email=value_a))  # tenant a's value into tenant b's row 5
    with engine.connect() as conn:
        with pytest.raises(errors.IntegrityError):
            enc_b.decode(conn.execute(sa.select(b)).one())
        assert enc_a.decode(conn.execute(sa.select(a)).one())["email"] == "alice@a"


def test_reencrypting_one_schema_keeps_the_data_keys_another_schema_uses(km_a, key_name, postgres) -> None:
    """tenant_a.acct and tenant_b.acct under one key and one data-key table: re-encrypting
    tenant_a deletes only what no value in any schema names (it once deleted tenant_b's keys
    too, and tenant_b's rows never decrypted again)."""
    from keymgr.fields.bulk import reencrypt_table

    engine, a, b, enc_a, enc_b = _two_tenant_schemas(km_a, key_name, postgres)
    for enc, t in ((enc_a, a), (enc_b, b)):
        with engine.begin() as conn:
            conn.execute(t.insert(), enc.encode_rows([{"id": str(i), "email": f"u{i}@x"} for i in range(6)]))
    km_a.rotate(key_name)
    result = reencrypt_table(engine, _accounts_codec(km_a, engine, a, key_name))
    assert result.keys_deleted == 1  # tenant_a's old data key, not tenant_b's
    reader = _accounts_codec(km_a, engine, b, key_name)
    with engine.connect() as conn:
        assert sorted(reader.decode(r)["email"] for r in conn.execute(sa.select(b))) == sorted(
            f"u{i}@x" for i in range(6))


def test_tenants_sharing_a_table_get_unrelated_terms_and_lookups_skip_each_other(km_a, key_name, db_url,
                                                                                 caplog) -> None:
    engine, table = _accounts_in(db_url, km_a, key_name)
    acme = _accounts_codec(km_a, engine, table, key_name, bits=1, extra={"tenant": "acme"})
    globex = _accounts_codec(km_a, engine, table, key_name, bits=1, extra={"tenant": "globex"})
    rows = [{"id": f"a{i}", "tenant": "acme", "email": f"user{i}@x"} for i in range(32)]
    other = [{"id": f"g{i}", "tenant": "globex", "email": f"user{i}@x"} for i in range(32)]
    acme.insert_many(engine, rows)
    globex.insert_many(engine, other)
    with engine.connect() as conn:
        terms = {r.id: r.email_bidx for r in conn.execute(sa.select(table))}
        found = acme.find(conn, "email_bidx", "USER3@x")  # 1 bit: the bucket holds globex's rows too
    assert [r["id"] for r in found] == ["a3"] and found[0]["email"] == "user3@x"
    assert acme.skipped > 0 and "failed authentication" in caplog.text
    assert acme.index_context("email_bidx") != globex.index_context("email_bidx")
    wide = _accounts_codec(km_a, engine, table, key_name, bits=64, extra={"tenant": "acme"})
    wide_other = _accounts_codec(km_a, engine, table, key_name, bits=64, extra={"tenant": "globex"})
    assert wide.where("email_bidx", "x").right.value != wide_other.where("email_bidx", "x").right.value
    assert terms  # both tenants' rows are in the table


def test_reencrypt_of_one_tenant_with_a_filter(km_a, key_name, db_url) -> None:
    from keymgr.fields.bulk import reencrypt_table

    engine, table = _accounts_in(db_url, km_a, key_name)
    acme = _accounts_codec(km_a, engine, table, key_name, extra={"tenant": "acme"})
    globex = _accounts_codec(km_a, engine, table, key_name, extra={"tenant": "globex"})
    acme.insert_many(engine, [{"id": f"a{i}", "tenant": "acme", "email": f"{i}@x"} for i in range(5)])
    globex.insert_many(engine, [{"id": f"g{i}", "tenant": "globex", "email": f"{i}@x"} for i in range(5)])
    km_a.rotate(key_name)
    result = reencrypt_table(engine, acme, where=table.c.tenant == "acme", drop_old_keys=False)
    assert result.total == 5
    other = reencrypt_table(engine, globex, where=table.c.tenant == "globex", drop_old_keys=False)
    assert other.total == 5 and other.resumed_from == 0  # another filter, another job
    with engine.connect() as conn:
        assert len([acme.decode(r) for r in conn.execute(sa.select(table).where(table.c.tenant == "acme"))]) == 5
        assert len([globex.decode(r) for r in conn.execute(sa.select(table).where(table.c.tenant == "globex"))]) == 5


def test_reencrypt_then_destroy_shreds_pre_rotation_values(km_a, key_name, db_url) -> None:
    """A backup of a value from before the rotation names a data key the pass deleted."""
    from keymgr.fields.bulk import reencrypt_table, rewrap_keys

    engine, table, enc, store, people = _setup(km_a, db_url, key_name, 20)
    with engine.connect() as conn:
        backup = conn.execute(sa.select(table).where(table.c.id == people[0]["id"])).one()
    before = store.count(key_name)
    km_a.rotate(key_name)
    rewrap_keys(enc.cipher, store)
    result = reencrypt_table(engine, enc, batch=7)
    assert result.keys_deleted == before
    assert store.count(key_name) == 1  # the pass's own data key; the table no longer grows
    km_a.retire(key_name, below=2, immediately=True)
    reader = codec(km_a, engine, table, key=key_name, index_prefix=key_name)[0]
    with pytest.raises(errors.IntegrityError):
        reader.decode(backup)
    with engine.connect() as conn:
        assert len([reader.decode(r) for r in conn.execute(sa.select(table))]) == 20


def test_reencrypt_leaves_a_row_changed_meanwhile_to_its_writer(km_a, key_name, db_url) -> None:
    from keymgr.fields.bulk import reencrypt_table
    from keymgr.fields.sql import EncryptedTable

    engine, table, enc, _, people = _setup(km_a, db_url, key_name, 5)
    people.sort(key=lambda p: p["id"])
    target = people[2]["id"] if db_url.startswith("postgresql") else people[0]["id"]  # SQLite: before any write
    km_a.rotate(key_name)
    writer = sa.create_engine(db_url, connect_args={"timeout": 0.2} if db_url.startswith("sqlite") else {})
    outcome: list[str] = []

    class Racing(EncryptedTable):
        def encode(self, row: Any) -> dict[str, Any]:
            if row[self.pk] == target and not outcome:
                person = next(p for p in people if p["id"] == target)
                params = enc.encode({**person, "email": "changed@example.com"})
                try:
                    with writer.begin() as conn:
                        if conn.dialect.name == "postgresql":
                            conn.execute(sa.text("SET LOCAL lock_timeout = '200ms'"))
                        conn.execute(table.update().where(table.c.id == target).values(
                            email=params["email"], email_bidx=params["email_bidx"]))
                    outcome.append("written")
                except sa.exc.OperationalError:
                    outcome.append("locked")
            return super().encode(row)

    racing = Racing(table, enc.cipher, indexes=enc.indexes)
    result = reencrypt_table(engine, racing, batch=10)
    with engine.connect() as conn:
        row = enc.decode(conn.execute(sa.select(table).where(table.c.id == target)).one())
    if db_url.startswith("postgresql"):
        assert outcome == ["locked"]  # FOR UPDATE: the other writer waits for the batch
        assert row["email"] == people[2]["email"] and result.done == 5
    else:
        assert outcome == ["written"] and result.conflicts == 1
        assert row["email"] == "changed@example.com"  # not overwritten with the value read before
    writer.dispose()


def test_a_second_column_set_is_a_second_pass(km_a, key_name, db_url) -> None:
    from keymgr.fields.bulk import reencrypt_table
    from keymgr.fields.sql import EncryptedBytes, EncryptedTable

    engine, table, enc, _, people = _setup(km_a, db_url, key_name, 6)
    km_a.rotate(key_name)
    narrow = sa.Table("customers", sa.MetaData(), sa.Column("id", sa.Uuid, primary_key=True),
                      sa.Column("email", EncryptedBytes))
    reencrypt_table(engine, EncryptedTable(narrow, enc.cipher), drop_old_keys=False)
    wide = sa.Table("customers", sa.MetaData(), sa.Column("id", sa.Uuid, primary_key=True),
                    sa.Column("email", EncryptedBytes), sa.Column("card", EncryptedBytes))
    second = reencrypt_table(engine, EncryptedTable(wide, enc.cipher), drop_old_keys=False)
    assert second.resumed_from == 0 and second.done == 6
    km_a.retire(key_name, below=2, immediately=True)
    with engine.connect() as conn:
        for r in conn.execute(sa.select(table.c.id, table.c.email, table.c.card)):
            enc.decode(r)  # card too is under the new version


def test_the_final_sweep_catches_a_stale_writers_old_index_version(km_a, key_name, db_url) -> None:
    from keymgr.fields.bulk import reencrypt_table

    engine, table, enc, _, people = _setup(km_a, db_url, key_name, 4)
    stale_enc, _ = codec(km_a, engine, table, key=key_name, index_prefix=key_name)  # knows index v1 only
    enc.indexes["email_bidx"][0].rotate()
    late = customer(random.Random(11), 50)

    class Interleaved(type(enc)):  # type: ignore[misc]
        def encode(self, row: Any) -> dict[str, Any]:
            if not getattr(self, "_wrote", False):
                self._wrote = True
                stale_enc.insert_many(engine, [late])  # a host that has not seen the rotation yet
            return super().encode(row)

    pass_codec = Interleaved(table, enc.cipher, indexes=enc.indexes)
    reencrypt_table(engine, pass_codec, batch=100)
    with engine.connect() as conn:
        versions = {t[0] for (t,) in conn.execute(sa.select(table.c.email_bidx))}
    assert versions == {2}
    later = codec(km_a, engine, table, key=key_name, index_prefix=key_name)[0]
    with engine.connect() as conn:
        assert [r["id"] for r in later.find(conn, "email_bidx", late["email"])] == [late["id"]]


def test_bytes_columns_are_indexed_as_bytes_and_kinds_are_checked(km_a, key_name, db_url) -> None:
    engine, table = _accounts_in(db_url, km_a, key_name)
    enc = _accounts_codec(km_a, engine, table, key_name)
    enc.insert_many(engine, [{"id": "1", "blob": b"\x00\xff"}])
    blob_index = enc.indexes["blob_bidx"][0]
    with engine.connect() as conn:
        stored = conn.execute(sa.select(table.c.blob_bidx)).scalar_one()
        assert stored == blob_index.term(b"\x00\xff", context=enc.index_context("blob_bidx"))
        assert [r["id"] for r in enc.find(conn, "blob_bidx", b"\x00\xff")] == ["1"]
        with pytest.raises(errors.ConfigurationError):
            enc.find(conn, "no_such_index", "x")
        with pytest.raises(errors.ConfigurationError):
            enc.find(conn, "email_bidx", None)
        with pytest.raises(errors.ConfigurationError):
            enc.decode(conn.execute(sa.select(table.c.email)).one())  # no primary key selected
    with pytest.raises(errors.ConfigurationError):
        enc.encode({"id": "2", "email": b"bytes into text"})
    with pytest.raises(errors.ConfigurationError):
        enc.encode({"id": "3", "blob": "text into bytes"})
    with pytest.raises(errors.ConfigurationError):
        enc.where("nope", "x")


def test_sql_key_store_refuses_a_single_shared_connection() -> None:
    from keymgr.fields.sql import SqlKeyStore

    with pytest.raises(errors.ConfigurationError, match="connections of its own"):
        SqlKeyStore(sa.create_engine("sqlite://"))


def test_cli_rewrap_input_errors(km_a, softhsm, key_name, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    engine, table, enc, store, people = _setup(km_a, url, key_name, 5)
    km_a.create_key(key_name + "-other")
    base = ("--token", softhsm.uri(), "fields", "rewrap", "--db", url, "--table", "customers")
    code, out, err = _invoke(*base, "--key", key_name, "--reencrypt", "--column", "name")
    assert code != 0 and "not a binary column" in err and "Traceback" not in err, err
    for extra in ((), ("--reencrypt", "--column", "email")):
        code, out, err = _invoke(*base, "--key", key_name + "-other", *extra)
        assert code != 0 and "no data-key rows of key" in err, (code, out, err)
    # one tampered data-key row: reported by key_ref, the others still rewrapped, exit non-zero
    km_a.rotate(key_name)
    enc.cipher.renew()
    with engine.begin() as conn:
        conn.execute(table.insert(), enc.encode_rows([customer(random.Random(1), 99)]))
    rows = store.scan(key_name)
    assert len(rows) == 2
    bad = rows[0]
    with engine.begin() as conn:
        conn.execute(store.table.update().where(store.table.c.key_ref == bad.key_ref)
                     .values(commitment=bytes(32)))
    km_a.rotate(key_name)
    code, out, err = _invoke(*base, "--key", key_name)
    assert code == 4 and bad.key_ref.hex() in err, (code, out, err)
    assert "1 of 2 data key(s) rewrapped" in out, out


def test_cli_reencrypts_one_tenant_at_a_time(km_a, softhsm, key_name, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'tenants.db'}"
    engine = sa.create_engine(url)
    table = _accounts(sa.MetaData())
    table.metadata.create_all(engine)
    km_a.create_key(key_name)
    codecs = {t: _accounts_codec(km_a, engine, table, key_name, extra={"tenant": t}) for t in ("acme", "globex")}
    for tenant, enc in codecs.items():
        enc.insert_many(engine, [{"id": f"{tenant}{i}", "tenant": tenant, "email": f"{i}@x"} for i in range(4)])
        enc.cipher.renew()
    km_a.rotate(key_name)
    base = ("--token", softhsm.uri(), "--json", "fields", "rewrap", "--db", url, "--table", "acct", "--key", key_name,
            "--reencrypt", "--column", "email", "--column", "blob")
    import json

    deleted = []
    for tenant in ("acme", "globex"):
        code, out, err = _invoke(*base, "--extra", f"tenant={tenant}", "--filter", f"tenant={tenant}")
        assert code == 0, err
        summary = json.loads(out)
        assert summary["rows_total"] == 4
        deleted.append(summary["data_keys_deleted"])
    assert deleted[0] == 1 and deleted[1] == 1  # each tenant's old data key goes once no row names it
    km_a.retire(key_name, below=2, immediately=True)
    with engine.connect() as conn:
        for tenant, enc in codecs.items():
            rows = conn.execute(sa.select(table).where(table.c.tenant == tenant)).all()
            assert sorted(enc.decode(r)["email"] for r in rows) == ["0@x", "1@x", "2@x", "3@x"]


def test_a_long_job_name_still_changes_with_every_index_version(km_a, key_name, tmp_path) -> None:
    """Six indexes with ordinary long names push the index versions past the jobs table's 200
    characters: the name must still change when the last index rotates (a cut name made the
    pass after an index rotation look finished)."""
    from keymgr.fields.bulk import job_name
    from keymgr.fields.sql import BlindIndexTerm, EncryptedTable, EncryptedText, SqlKeyStore

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'long.db'}")
    names = [f"email_lookup_{kind}_bidx" for kind in ("prefix", "suffix", "domain", "local", "exact", "folded")]
    table = sa.Table("acct", sa.MetaData(), sa.Column("id", sa.String(64), primary_key=True),
                     sa.Column("email", EncryptedText), *(sa.Column(n, BlindIndexTerm) for n in names))
    km_a.create_key(key_name)
    store = SqlKeyStore(engine)
    indexes = {n: (km_a.blind_index(f"{key_name}-{n}", bits=16), "email") for n in names}
    codec = EncryptedTable(table, km_a.fields(key_name, store=store), indexes=indexes)
    before = job_name(codec)
    indexes[sorted(names)[-1]][0].rotate()  # the last in the name
    after = job_name(codec)
    assert len(before) <= 200 and len(after) <= 200 and before != after
    assert job_name(codec) == after  # and stable


def test_a_term_column_refuses_plaintext(km_a, key_name, db_url) -> None:
    """A term column takes only terms a BlindIndex computed: str, bytes or int plaintext written
    to it by mistake is PlaintextRefused (not wrapped with the parameters) and nothing is stored;
    terms read back from it can be written again."""
    from keymgr.fields.sql import PlaintextRefused

    engine, table, enc, _, people = _setup(km_a, db_url, key_name, 2)
    for plaintext in ("alice@example.com", b"bob@example.com", 12345):
        with pytest.raises(PlaintextRefused) as caught, engine.begin() as conn:
            conn.execute(table.update().where(table.c.id == people[0]["id"]).values(email_bidx=plaintext))
        assert "example.com" not in str(caught.value)
    with engine.begin() as conn:
        term = conn.execute(sa.select(table.c.email_bidx).where(table.c.id == people[0]["id"])).scalar_one()
        conn.execute(table.update().where(table.c.id == people[1]["id"]).values(email_bidx=term))
    with engine.connect() as conn:
        stored = [r[0] for r in conn.execute(sa.select(table.c.email_bidx))]
    assert all(isinstance(t, bytes) and b"example.com" not in t for t in stored)
    assert len(enc.find(engine.connect(), "email_bidx", people[0]["email"])) == 1


def test_cli_codec_recomputes_terms_after_an_index_rotation(km_a, softhsm, key_name, tmp_path, monkeypatch) -> None:
    """With --codec, the operator's re-encryption uses the application's codec (its normalisers),
    so every term moves to the newest index version and a lookup of a differently cased e-mail
    still finds its row; the options the codec already gives are refused beside it."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    engine, table, enc, _, people = _setup(km_a, url, key_name, 12)
    enc.indexes["email_bidx"][0].rotate()
    module = f"shop_codec_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        "import sqlalchemy as sa\n"
        "from tests._fields_schema import codec, customers_table\n"
        "def customers(km, engine):\n"
        f"    table = customers_table(sa.MetaData())\n"
        f"    return codec(km, engine, table, key={key_name!r}, index_prefix={key_name!r})[0]\n"
        "def broken(km, engine):\n"
        "    raise RuntimeError('no such table')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    base = ("--token", softhsm.uri(), "fields", "rewrap", "--db", url)
    for args, message in [(("--codec", f"{module}:customers", "--column", "email"), "drop --column"),
                          (("--codec", f"{module}:customers", "--key", "other"), "not 'other'"),
                          (("--codec", f"{module}:broken"), "RuntimeError: no such table"),
                          (("--codec", f"{module}:absent"), "no function 'absent'"),
                          (("--codec", "no_such_module_here:f"), "cannot import"),
                          (("--codec", "nocolon"), "MODULE:FACTORY")]:
        code, out, err = _invoke(*base, *args)
        assert code != 0 and message in err and "Traceback" not in err, (args, err)
    code, out, err = _invoke(*base, "--codec", f"{module}:customers", "--reencrypt")
    assert code == 0, err
    with engine.connect() as conn:
        versions = {t[0] for (t,) in conn.execute(sa.select(table.c.email_bidx))}
        assert versions == {2}  # every term recomputed under the new index version
        shouted = people[5]["email"].upper()
        assert [r["id"] for r in enc.find(conn, "email_bidx", shouted)] == [people[5]["id"]]


def test_a_lookup_drops_a_match_whose_other_field_was_swapped_in(km_a, key_name, db_url, caplog) -> None:
    """The looked-up e-mail opens, but the row's card was copied from another row: the row is
    dropped and counted, never returned with a field that is not its own; its neighbour is
    still found, and reading the row by its key is the integrity error."""
    engine, table, enc, _, people = _setup(km_a, db_url, key_name, 8)
    victim, donor = people[3], people[4]
    with engine.begin() as conn:
        card = conn.execute(sa.select(table.c.card).where(table.c.id == donor["id"])).scalar_one()
        conn.execute(table.update().where(table.c.id == victim["id"]).values(card=Sealed(card)))
    with engine.connect() as conn:
        assert enc.find(conn, "email_bidx", victim["email"]) == []
        assert enc.skipped == 1 and "failed authentication" in caplog.text
        assert [r["card"] for r in enc.find(conn, "email_bidx", donor["email"])] == [donor["card"]]
        row = conn.execute(sa.select(table).where(table.c.id == victim["id"])).one()
    with pytest.raises(errors.IntegrityError):
        enc.decode(row)


def test_cli_codec_usage_errors_come_before_the_token_and_a_codec_exit_is_one_line(softhsm, tmp_path,
                                                                                    monkeypatch) -> None:
    """A malformed --codec is a usage error (exit 2) found while parsing, before any token is
    opened (a missing token would otherwise hide it behind exit 6); a codec module that calls
    sys.exit(3) is a one-line error, not keymgr's exit 3 ('PIN or login failed') in silence."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    for spec in ("nope", "a b:c", "mod:", ":f", "mod:f-g"):
        code, out, err = _invoke("--token", "pkcs11:token=no-such-token-here", "fields", "rewrap", "--db", url,
                                 "--codec", spec)
        assert code == 2 and "--codec" in err and "Traceback" not in err, (spec, code, err)
    module = f"exiting_codec_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.chdir(tmp_path)
    code, out, err = _invoke("--token", softhsm.uri(), "fields", "rewrap", "--db", url, "--codec", f"{module}:make")
    assert code == 1 and "called sys.exit(3)" in err and "Traceback" not in err, (code, err)


def test_insert_many_writes_only_what_it_computed_and_keeps_every_other_check(km_a, key_name, db_url) -> None:
    """insert_many writes its encrypted and term columns without the per-value marker check (a
    copy of the table): a caller's plaintext given in those columns is replaced by what the codec
    computed, never written; a term column the codec does not fill still refuses plaintext and
    the batch writes nothing; a column default of the declared table still applies."""
    from keymgr.fields.sql import BlindIndexTerm, EncryptedTable, PlaintextRefused

    engine = sa.create_engine(db_url)
    table = customers_table(sa.MetaData())
    table.append_column(sa.Column("phone_bidx", BlindIndexTerm))  # not one of the codec's indexes
    table.append_column(sa.Column("source", sa.String(20), default="import"))
    table.metadata.create_all(engine)
    km_a.create_key(key_name)
    enc, _ = codec(km_a, engine, table, key=key_name, index_prefix=key_name)
    rng = random.Random(3)
    people = [dict(customer(rng, i), email_bidx="alice@example.com", card_last4_bidx=b"1234") for i in range(300)]
    enc.insert_many(engine, people, batch=100)
    with engine.connect() as conn:
        stored = {r.id: r for r in conn.execute(sa.select(table))}
    index = enc.indexes["email_bidx"][0]
    for p in people:
        row = stored[p["id"]]
        assert bytes(row.email_bidx) == index.term(p["email"], context=enc.index_context("email_bidx"))
        assert b"example.com" not in bytes(row.email) and bytes(row.card_last4_bidx) != b"1234"
        assert row.source == "import" and row.phone_bidx is None
    assert enc.find(engine.connect(), "email_bidx", people[5]["email"])[0]["card"] == people[5]["card"]
    late = [dict(customer(rng, 1000 + i), phone_bidx="+44 20 7946 0000") for i in range(3)]
    with pytest.raises(PlaintextRefused) as refused:
        enc.insert_many(engine, late)
    assert "7946" not in str(refused.value)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one() == 300
    assert isinstance(EncryptedTable(table, enc.cipher).encode(people[0])["email"], Sealed)  # encode_rows: marked


def test_an_encrypted_or_term_column_with_another_key_is_refused_at_once(km_a, key_name, tmp_path) -> None:
    """Rows and statements name a column by its key, places by its name: a column whose key is not
    its name is refused when the codec is made (not a KeyError, nor a column left unsealed)."""
    from keymgr.fields.sql import BlindIndexTerm, EncryptedTable, EncryptedText, SqlKeyStore

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'k.db'}")
    km_a.create_key(key_name)
    cipher = km_a.fields(key_name, store=SqlKeyStore(engine))
    for column in (sa.Column("email", EncryptedText, key="mail"), sa.Column("email_bidx", BlindIndexTerm, key="b")):
        table = sa.Table("t", sa.MetaData(), sa.Column("id", sa.Uuid, primary_key=True), column)
        with pytest.raises(errors.ConfigurationError, match="key == name"):
            EncryptedTable(table, cipher)


def test_what_the_codec_fills_is_fixed_when_it_is_made(km_a, key_name, tmp_path) -> None:
    """insert_many writes the codec's columns without the per-value check: the set of columns it
    fills cannot change afterwards (taking an index out of ``indexes`` would leave its column
    unchecked and unfilled, so a caller's plaintext there would be written); the copy keeps the
    table's ``implicit_returning``."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'fixed.db'}")
    table = customers_table(sa.MetaData())
    table.implicit_returning = False
    km_a.create_key(key_name)
    enc, _ = codec(km_a, engine, table, key=key_name, index_prefix=key_name)
    with pytest.raises(AttributeError):
        enc.indexes.pop("email_bidx")  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        enc.encrypted["email"] = True  # type: ignore[index]
    with pytest.raises(TypeError):
        del enc.indexes["email_bidx"]  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        enc.indexes = {}  # type: ignore[misc]
    with pytest.raises(AttributeError):
        enc.encrypted = {}  # type: ignore[misc]
    assert set(enc.indexes) == {"email_bidx", "card_last4_bidx"} and set(enc.encrypted) == set(ENCRYPTED)
    assert enc._writer().implicit_returning is False  # noqa: SLF001


def test_insert_many_writes_the_table_as_it_is_declared_at_each_call(km_a, key_name, tmp_path) -> None:
    """insert_many's unchecked copy is made from the table at each call: a column declared
    encrypted after an earlier insert_many still refuses plaintext, a column appended since is
    written; a compound index's source list changed by its caller afterwards changes nothing."""
    from keymgr.fields.sql import EncryptedTable, EncryptedText, PlaintextRefused

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'declared.db'}")
    table = customers_table(sa.MetaData())
    table.append_column(sa.Column("notes", sa.String(50)))
    table.metadata.create_all(engine)
    km_a.create_key(key_name)
    enc, _ = codec(km_a, engine, table, key=key_name, index_prefix=key_name)
    rng = random.Random(9)
    enc.insert_many(engine, [customer(rng, 0)])
    table.append_column(sa.Column("notes", EncryptedText), replace_existing=True)  # declared encrypted now
    with pytest.raises(PlaintextRefused):
        enc.insert_many(engine, [dict(customer(rng, 1), notes="ssn 123-45-6789")])
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE customers ADD COLUMN extra VARCHAR(50)"))
    table.append_column(sa.Column("extra", sa.String(50)))  # appended after the first insert_many
    later = dict(customer(rng, 2), extra="kept")
    enc.insert_many(engine, [later])
    with engine.connect() as conn:
        assert conn.execute(sa.select(table.c.extra).where(table.c.id == later["id"])).scalar_one() == "kept"
        assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one() == 2
    sources = ["email", "card"]
    compound = EncryptedTable(table, enc.cipher, indexes={"email_bidx": (enc.indexes["email_bidx"][0], sources)})
    sources[:] = ["name"]  # a plain column: refused at construction, and not followed afterwards
    assert compound.indexes["email_bidx"][1] == ("email", "card")


def test_insert_many_follows_the_table_and_leaves_the_statement_cache_alone(km_a, key_name, tmp_path) -> None:
    """The unchecked copy is the table as declared at each call: a type changed in place and a
    new default are followed, a codec column replaced by one with another key is a keymgr error;
    and the copies never fill the engine's compiled-statement cache (one entry per call)."""
    from keymgr.fields.sql import EncryptedText

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'follow.db'}")
    table = customers_table(sa.MetaData())
    table.append_column(sa.Column("source", sa.String(20), default="v1"))
    table.metadata.create_all(engine)
    km_a.create_key(key_name)
    enc, _ = codec(km_a, engine, table, key=key_name, index_prefix=key_name)
    rng = random.Random(4)
    enc.insert_many(engine, [customer(rng, 0)])
    cached = len(engine._compiled_cache)  # noqa: SLF001 - SQLAlchemy's statement cache
    for i in range(1, 6):
        enc.insert_many(engine, [customer(rng, i)])
    assert len(engine._compiled_cache) == cached  # noqa: SLF001
    table.c.source.default.arg = "v2"  # type: ignore[union-attr]  # changed in place
    later = customer(rng, 6)
    enc.insert_many(engine, [later])
    with engine.connect() as conn:
        assert conn.execute(sa.select(table.c.source).where(table.c.id == later["id"])).scalar_one() == "v2"
    table.append_column(sa.Column("email", EncryptedText, key="mail"), replace_existing=True)
    with pytest.raises(errors.ConfigurationError, match="removed or replaced"):
        enc.insert_many(engine, [customer(rng, 7)])


def test_rows_that_are_not_mappings_of_names_are_a_configuration_error(km_a, key_name, tmp_path) -> None:
    """A row keyed by Column objects (SQLAlchemy's own TypeError from deep inside, before) or a
    row that is no mapping: a keymgr ConfigurationError without the values, nothing written."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'rows.db'}")
    table = customers_table(sa.MetaData())
    table.metadata.create_all(engine)
    km_a.create_key(key_name)
    enc, _ = codec(km_a, engine, table, key=key_name, index_prefix=key_name)
    person = customer(random.Random(1), 0)
    for bad in ([{table.c[name]: value for name, value in person.items()}], ["alice@example.com"], [42]):
        for write in (enc.encode_rows, lambda rows: enc.insert_many(engine, rows)):
            with pytest.raises(errors.ConfigurationError, match="maps column names") as refused:
                write(bad)
            assert "example.com" not in str(refused.value) and person["card"] not in str(refused.value)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one() == 0
