"""The customers table the field tests, the example's shape and bench/fields.py share."""

from __future__ import annotations

import random
import uuid
from typing import Any

import sqlalchemy as sa

from keymgr.fields import chain, collapse_spaces, digits_only, last_digits, lowercase
from keymgr.fields.sql import BlindIndexTerm, EncryptedTable, EncryptedText, SqlKeyStore

ENCRYPTED = ("email", "card", "national_id")


def customers_table(metadata: sa.MetaData, name: str = "customers") -> sa.Table:
    return sa.Table(name, metadata,
                    sa.Column("id", sa.Uuid, primary_key=True),
                    sa.Column("name", sa.String(100), nullable=False),
                    sa.Column("email", EncryptedText), sa.Column("card", EncryptedText),
                    sa.Column("national_id", EncryptedText),
                    sa.Column("email_bidx", BlindIndexTerm, index=True),
                    sa.Column("card_last4_bidx", BlindIndexTerm, index=True))


def plain_table(metadata: sa.MetaData, name: str = "customers_plain") -> sa.Table:
    """The same data in the clear (the bench's baseline)."""
    return sa.Table(name, metadata,
                    sa.Column("id", sa.Uuid, primary_key=True),
                    sa.Column("name", sa.String(100), nullable=False),
                    sa.Column("email", sa.String(200), index=True), sa.Column("card", sa.String(30)),
                    sa.Column("national_id", sa.String(30)), sa.Column("card_last4", sa.String(4), index=True))


def codec(km: Any, engine: sa.Engine, table: sa.Table, *, key: str, index_prefix: str, email_bits: int = 32,
          last4_bits: int = 8, host_subkeys: bool = True) -> tuple[EncryptedTable, SqlKeyStore]:
    store = SqlKeyStore(engine)
    store.create()
    email = km.blind_index(f"{index_prefix}-email", bits=email_bits, normalise=chain(collapse_spaces, lowercase),
                           host_subkeys=host_subkeys)
    last4 = km.blind_index(f"{index_prefix}-card4", bits=last4_bits, transform=last_digits(4),
                           host_subkeys=host_subkeys)
    return EncryptedTable(table, km.fields(key, store=store),
                          indexes={"email_bidx": (email, "email"), "card_last4_bidx": (last4, "card")}), store


def customer(rng: random.Random, i: int) -> dict[str, Any]:
    card = "6222" + "".join(rng.choice("0123456789") for _ in range(12))
    return {"id": uuid.UUID(int=rng.getrandbits(128), version=4), "name": f"customer {i}",
            "email": f"user{i}@example.com", "card": " ".join(card[j:j + 4] for j in range(0, 16, 4)),
            "national_id": f"{rng.randrange(10**17, 10**18)}X"}


def plain_row(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "card_last4": digits_only(row["card"])[-4:]}
