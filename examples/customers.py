"""A customers table whose card number, e-mail and national id are encrypted, searchable by
e-mail and by a card's last four digits, with keys that never leave the token.

Run once set up (``bash scripts/setup.sh --dev``)::

    .venv/bin/python examples/customers.py                          # SQLite file customers.db here
    .venv/bin/python examples/customers.py --db postgresql+psycopg://me@/shop?host=/run/postgresql

What it does, in order: creates the key ``customers`` and two blind indexes in the local token;
inserts 300 customers in one bulk insert (row ids are UUIDs made here, so each value is bound
to its row before the insert); finds a customer by e-mail (any case) and by the last four
digits of a card; shows what a collection agent may see (masked values); rotates the key and
the e-mail index, rewraps the table's data keys and re-encrypts its rows; checks every row.
See docs/fields.md.
"""

from __future__ import annotations

import argparse
import random
import uuid

import sqlalchemy as sa

import keymgr
from keymgr.fields import chain, collapse_spaces, last_digits, mask_card, mask_email, unicode_fold
from keymgr.fields.bulk import reencrypt_table, rewrap_keys
from keymgr.fields.sql import BlindIndexTerm, EncryptedTable, EncryptedText, SqlKeyStore
from keymgr.hsm.local import LocalToken

metadata = sa.MetaData()
customers = sa.Table(
    "customers", metadata,
    sa.Column("id", sa.Uuid, primary_key=True),  # made by the application: no round trip before the insert
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("email", EncryptedText), sa.Column("card", EncryptedText), sa.Column("national_id", EncryptedText),
    sa.Column("email_bidx", BlindIndexTerm, index=True),  # a database index on the blind-index term
    sa.Column("card_last4_bidx", BlindIndexTerm, index=True),
    # what a restricted role may read: masked copies, written at insert (docs/fields.md, "Masked-only roles")
    sa.Column("card_masked", sa.String(30)), sa.Column("email_masked", sa.String(200)))


def fake_customers(count: int) -> list[dict[str, object]]:
    rng = random.Random(2026)
    people = []
    for i in range(count):
        digits = "6222" + "".join(rng.choice("0123456789") for _ in range(12))
        card = " ".join(digits[j:j + 4] for j in range(0, 16, 4))
        email = f"customer{i}@example.com"
        people.append({"id": uuid.uuid4(), "name": f"Customer {i}", "email": email, "card": card,
                       "national_id": f"{rng.randrange(10**17, 10**18)}X",
                       "card_masked": mask_card(card), "email_masked": mask_email(email)})
    return people


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="sqlite:///customers.db", help="SQLAlchemy URL (default: %(default)s)")
    args = parser.parse_args()
    LocalToken.default().init()
    engine = sa.create_engine(args.db)
    metadata.create_all(engine)
    with keymgr.KeyManager() as km:
        if "customers" not in [k.name for k in km.list_keys()]:
            km.create_key("customers")
        store = SqlKeyStore(engine)  # the data-key table: each data key, wrapped by the token, stored once
        store.create()
        email_index = km.blind_index("customers-email", bits=16, normalise=chain(collapse_spaces, unicode_fold))
        card_index = km.blind_index("customers-card4", bits=8, transform=last_digits(4))
        table = EncryptedTable(customers, km.fields("customers", store=store),
                               indexes={"email_bidx": (email_index, "email"), "card_last4_bidx": (card_index, "card")})

        people = fake_customers(300)
        # sealed before the write transaction opens: a new data key is stored in a transaction of
        # its own (it must outlive a rollback of this one), which SQLite would make wait for this one
        rows = table.encode_rows(people)
        with engine.begin() as conn:
            conn.execute(customers.delete())
            conn.execute(customers.insert(), rows)
        print(f"inserted {len(people)} customers; {store.count('customers')} data key(s) in the data-key table")

        wanted = people[123]
        with engine.connect() as conn:
            by_email = table.find(conn, "email_bidx", "  CUSTOMER123@Example.com ")
            last4 = str(wanted["card"])[-4:]
            by_card = table.find(conn, "card_last4_bidx", last4)
            masked = conn.execute(sa.select(customers.c.name, customers.c.card_masked, customers.c.email_masked)
                                  .where(customers.c.id == wanted["id"])).one()
        assert [r["id"] for r in by_email] == [wanted["id"]], "lookup by e-mail failed"
        assert wanted["id"] in [r["id"] for r in by_card], "lookup by last four failed"
        print(f"found by e-mail: {by_email[0]['name']}; {len(by_card)} customer(s) with a card ending {last4}")
        print(f"a collection agent sees: {masked.name}, card {masked.card_masked}, e-mail {masked.email_masked}")

        version = km.rotate("customers").primary
        email_index.rotate()
        moved = rewrap_keys(table.cipher, store)
        print(f"rotated: {moved.done} data key(s) rewrapped under version {version} without touching a value")
        done = reencrypt_table(engine, table, batch=100)
        print(f"re-encrypted {done.done} rows under fresh data keys and e-mail index version {email_index.version}")

        km.retire("customers", below=version, immediately=True)  # one host; a fleet waits 10 minutes
        with engine.connect() as conn:
            rows = {r["id"]: r for r in map(table.decode, conn.execute(sa.select(customers)))}
            again = table.find(conn, "email_bidx", "customer123@example.com")
        assert len(rows) == len(people) and all(rows[p["id"]]["card"] == p["card"] for p in people)
        assert [r["id"] for r in again] == [wanted["id"]]
        print(f"all {len(rows)} rows decrypt under version {version} alone; lookups still work")


if __name__ == "__main__":
    main()
