"""The data-key table of the Django fields (:class:`DjangoKeyStore`, re-exported by
:mod:`keymgr.fields.django`): :mod:`keymgr.fields.keys`' store through Django's database
connections, with the columns of :class:`keymgr.fields.sql.SqlKeyStore`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from django.db import connections

from keymgr import errors
from keymgr.fields.keys import StoredKey


class DjangoKeyStore:
    """The data-key table (:mod:`keymgr.fields.keys`) through Django's database ``using``, with
    the columns of :class:`keymgr.fields.sql.SqlKeyStore` (one table serves both).

    Every call runs on a connection of its own, in autocommit: a new data key is durable before
    the value naming it is written, whatever transaction (``atomic()``) the caller is in, and a
    rollback of the caller's transaction cannot take the key row with it. On SQLite that
    connection waits for the caller's open write transaction (as SqlKeyStore's does): in
    ``atomic()`` blocks that write, save the first encrypted value before the block's first write,
    or keep such blocks short of the ``timeout``."""

    def __init__(self, using: str = "default", *, table: str = "keymgr_field_keys") -> None:
        self.using, self.table = using, table

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[list[tuple[Any, ...]], int]:
        """``sql`` (``{t}`` is the table) on a new connection: (rows fetched, rows affected).

        Called from an event loop's thread (an encrypted attribute read in async code whose data
        key is not cached yet), Django refuses any query there (SynchronousOnlyOperation): the
        connection, private to this call, is then opened, used and closed in a worker thread while
        the caller waits. The loop is blocked for that query, as it is for the decryption itself;
        ``await keymgr.fields.django.aopen(instance)`` does both off the loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._execute_here(sql, params)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="keymgr-key-store") as worker:
            return worker.submit(self._execute_here, sql, params).result()

    def _execute_here(self, sql: str, params: tuple[Any, ...]) -> tuple[list[tuple[Any, ...]], int]:
        conn = connections.create_connection(self.using)
        if conn.vendor == "sqlite" and conn.is_in_memory_db():
            raise errors.ConfigurationError("the data-key store needs a connection of its own: an in-memory SQLite "
                                            "database is another database on every connection; use a file")
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql.format(t=conn.ops.quote_name(self.table)), params)
                rows = [tuple(r) for r in cursor.fetchall()] if cursor.description else []
                return rows, int(cursor.rowcount)
        finally:
            conn.close()

    def create(self) -> None:
        """CREATE TABLE (and its index on key_name) if it does not exist."""
        conn = connections[self.using]
        binary = conn.data_types["BinaryField"]  # bytea, BLOB
        self._execute(f"CREATE TABLE IF NOT EXISTS {{t}} (key_ref {binary} PRIMARY KEY, key_name varchar(64) NOT NULL, "
                      f"recipient {binary} NOT NULL, commitment {binary} NOT NULL)")
        index = conn.ops.quote_name(f"ix_{self.table}_key_name")
        self._execute(f"CREATE INDEX IF NOT EXISTS {index} ON {{t}} (key_name)")

    def load(self, key_ref: bytes) -> StoredKey | None:
        rows, _ = self._execute("SELECT key_ref, key_name, recipient, commitment FROM {t} WHERE key_ref = %s",
                                (key_ref,))
        return _stored(rows[0]) if rows else None

    def save(self, stored: StoredKey) -> None:
        self._execute("INSERT INTO {t} (key_ref, key_name, recipient, commitment) VALUES (%s, %s, %s, %s)",
                      (stored.key_ref, stored.key, stored.recipient, stored.commitment))

    def replace(self, stored: StoredKey) -> None:
        self._execute("UPDATE {t} SET recipient = %s WHERE key_ref = %s", (stored.recipient, stored.key_ref))

    def delete(self, key: str, key_refs: Iterable[bytes]) -> int:
        return sum(self._execute("DELETE FROM {t} WHERE key_ref = %s AND key_name = %s", (ref, key))[1]
                   for ref in key_refs)

    def scan(self, key: str, *, after: bytes = b"", limit: int = 1000) -> list[StoredKey]:
        rows, _ = self._execute("SELECT key_ref, key_name, recipient, commitment FROM {t} WHERE key_name = %s "
                                "AND key_ref > %s ORDER BY key_ref LIMIT %s", (key, after, limit))
        return [_stored(r) for r in rows]

    def count(self, key: str) -> int:
        rows, _ = self._execute("SELECT COUNT(*) FROM {t} WHERE key_name = %s", (key,))
        return int(rows[0][0])


def _stored(row: tuple[Any, ...]) -> StoredKey:
    return StoredKey(bytes(row[0]), str(row[1]), bytes(row[2]), bytes(row[3]))
