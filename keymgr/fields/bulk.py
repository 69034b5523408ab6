"""Bulk work on an encrypted table after a rotation: rewrap its data keys, re-encrypt its rows.

Two passes, each resumable and safe to kill at any instant (SIGKILL included):

* :func:`rewrap_keys`: every data key of the table's key in the data-key table moves under
  the key's current primary (:meth:`FieldCipher.rewrap`). No value is read or written: a
  table of a million rows has about a hundred data keys (10,000 values each). Each row is
  replaced in its own transaction; a row already current is skipped, so a rerun after a
  kill simply continues. A row that fails (tampered, relabelled) is reported by its
  ``key_ref`` and the walk goes on with the others. Rewrap keeps the old data keys alive
  under the new KEK: destroying the old version then shreds nothing.
* :func:`reencrypt_table`: every row that still names a data key from before the pass, or
  holds a term of an older index version, is opened and sealed again under a fresh data key
  of the current primary, its blind-index terms recomputed with the newest index version;
  then the data-key rows the pass moved values away from, and that no value in the database
  names any more, are **deleted**. That is what makes ``key destroy`` of the old version shred
  pre-rotation data (a backup of the table from before the pass names data keys that no
  longer exist), and what keeps the data-key table from growing forever.

The re-encryption protocol:

1. Job start (one transaction): the job row, and a snapshot of the key's data-key refs as
   they are now: the *old* data keys. The job is named after its target (schema.table, key
   version, index versions, the re-encrypted column set, the extra context, the row filter),
   so a later rotation or another column set starts a new pass instead of believing the old
   one finished.
2. Batches in primary-key order. Each batch reads its rows ``FOR UPDATE`` (PostgreSQL) and
   writes each row back only if none of its encrypted or term columns changed since it was
   read (``WHERE col = old`` for each: SQLite, and any writer that slipped in); a row changed
   meanwhile is left alone and counted (``conflicts``). The batch **and the cursor that says
   it is done** commit in one transaction: a kill loses at most the open batch, which the
   database rolls back whole.
3. Sweeps: the table is walked again (no decryption: the data-key ref and term version of
   each value are read from its bytes) until a sweep finds nothing stale: rows skipped for a
   conflict, and rows a writer that had not yet seen an index rotation (up to
   ``REFRESH_INTERVAL``) or still held an old data key wrote during the pass.
4. Old data keys that no binary column of any table in any schema of the database still
   names are deleted (a schema that cannot be read keeps them all); then the job is marked
   finished. Values in **another database** that share the data-key table are not seen:
   re-encrypt such tables with ``drop_old_keys=False`` (``--keep-data-keys``). A kill before
   that repeats 3 and 4 on the next run.

Progress is reported through ``on_batch(done, total)`` (the CLI draws a bar from it).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection, Engine

from keymgr import errors
from keymgr.fields._format import FORMAT_VERSION, KEY_REF_SIZE, OVERHEAD
from keymgr.fields.cipher import FieldCipher
from keymgr.fields.keys import KeyStore
from keymgr.fields.sql import EncryptedTable

__all__ = ["PassResult", "reencrypt_table", "rewrap_keys"]

Progress = Callable[[int, int], None]
_log = logging.getLogger("keymgr.fields")
#: Sweeps after the main walk, at most (each one cheap: no decryption unless a row is stale).
MAX_SWEEPS = 3


@dataclass(frozen=True)
class PassResult:
    """What one run of a pass did: ``done`` items in this run, ``total`` in the whole pass;
    ``failed``: key_refs (hex) that could not be rewrapped; ``conflicts``: rows left alone
    because another writer changed them meanwhile (then retried by the sweeps); ``keys_deleted``:
    old data-key rows deleted at the end."""

    done: int
    total: int
    resumed_from: int = 0
    failed: tuple[str, ...] = ()
    conflicts: int = 0
    keys_deleted: int = 0


def rewrap_keys(cipher: FieldCipher, store: KeyStore, *, batch: int = 100,
                on_batch: Progress | None = None) -> PassResult:
    """Rewrap every data key of ``cipher``'s key in ``store``; returns how many moved, and which
    failed (each reported, none stopping the others)."""
    after = b""
    moved = seen = 0
    failed: list[str] = []
    while True:
        rows = store.scan(cipher.key, after=after, limit=batch)
        if not rows:
            return PassResult(moved, seen, failed=tuple(failed))
        for stored in rows:
            try:
                new = cipher.rewrap(stored)
            except (errors.IntegrityError, errors.FormatError, errors.ConfigurationError) as exc:
                _log.error("data key %s of %s not rewrapped: %s", stored.key_ref.hex(), cipher.key,
                           type(exc).__name__)
                failed.append(stored.key_ref.hex())
                continue
            if new is not None:
                store.replace(new)
                moved += 1
        seen += len(rows)
        after = rows[-1].key_ref
        if on_batch is not None:
            on_batch(seen, seen)


def _jobs_table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table("keymgr_field_jobs", metadata,
                    sa.Column("job", sa.String(200), primary_key=True),
                    sa.Column("cursor", sa.String(200), nullable=True),
                    sa.Column("done", sa.Integer, nullable=False),
                    sa.Column("finished", sa.Boolean, nullable=False),
                    extend_existing=True)


def _job_keys_table(metadata: sa.MetaData) -> sa.Table:
    """The old data keys of each job: the refs that existed when it started."""
    return sa.Table("keymgr_field_job_keys", metadata,
                    sa.Column("job", sa.String(200), primary_key=True),
                    sa.Column("key_ref", sa.LargeBinary(KEY_REF_SIZE), primary_key=True),
                    extend_existing=True)


def _filter_text(where: sa.ColumnElement[bool] | None, dialect: sa.Dialect) -> str:
    if where is None:
        return ""
    try:
        return str(where.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
    except (sa.exc.CompileError, NotImplementedError, TypeError):
        compiled = where.compile(dialect=dialect)
        return f"{compiled} {sorted((k, repr(v)) for k, v in compiled.params.items())}"


#: Longest job name the jobs table holds.
_JOB_NAME_SIZE = 200


def job_name(codec: EncryptedTable, where: sa.ColumnElement[bool] | None = None,
             dialect: sa.Dialect | None = None) -> str:
    """The pass's name: table, key version, index versions, and a digest of what else decides
    which values it rewrites (the column set, the extra context, the row filter): another
    rotation, another column set or another tenant is another pass."""
    record = codec.cipher.describe()
    indexes = ",".join(f"{n}:v{spec.version}" for n, (spec, _) in sorted(codec.indexes.items()))
    scope = "\n".join([",".join(sorted(codec.encrypted)), ",".join(sorted(codec.indexes)),
                       repr(sorted(codec.extra.items())), _filter_text(where, dialect or sqlite.dialect())])
    digest = hashlib.sha256(scope.encode()).hexdigest()[:16]
    name = f"reencrypt {codec.name} {record.name}:v{record.primary} {digest} {indexes}"
    if len(name) <= _JOB_NAME_SIZE:
        return name
    # too long for the column: a readable start and a digest of the whole (cutting it off once
    # dropped the index versions, and a pass after an index rotation believed itself finished)
    return f"{name[:_JOB_NAME_SIZE - 42]} #{hashlib.sha256(name.encode()).hexdigest()[:40]}"


@dataclass
class _Walk:
    """One run's shared state: what is old, what is newest, what to read."""

    codec: EncryptedTable
    jobs: sa.Table
    job: str
    where: sa.ColumnElement[bool] | None
    old_refs: frozenset[bytes]
    newest: dict[str, int]

    def stale(self, row: Any) -> bool:
        """Whether ``row`` names an old data key or holds an older index version's term (from the
        bytes alone: no decryption)."""
        for column in self.codec.encrypted:
            value = getattr(row, column)
            if value is not None and len(value) >= OVERHEAD and value[0] == FORMAT_VERSION \
                    and bytes(value[1:1 + KEY_REF_SIZE]) in self.old_refs:
                return True
        return any(getattr(row, name) is not None and getattr(row, name)[0] < version
                   for name, version in self.newest.items())


def _start(conn: Connection, walk_jobs: sa.Table, keys: sa.Table, job: str, codec: EncryptedTable) -> tuple[
        str | None, int, bool]:
    row = conn.execute(sa.select(walk_jobs).where(walk_jobs.c.job == job)).first()
    if row is None:
        conn.execute(walk_jobs.insert().values(job=job, cursor=None, done=0, finished=False))
        refs = _all_refs(codec)
        if refs:
            conn.execute(keys.insert(), [{"job": job, "key_ref": ref} for ref in refs])
        return None, 0, False
    return row.cursor, int(row.done), bool(row.finished)


def _all_refs(codec: EncryptedTable) -> list[bytes]:
    refs: list[bytes] = []
    after = b""
    while page := codec.cipher.store.scan(codec.cipher.key, after=after, limit=1000):
        refs.extend(stored.key_ref for stored in page)
        after = page[-1].key_ref
    return refs


def _rows(conn: Connection, walk: _Walk, after: Any, size: int) -> Sequence[Any]:
    table, pk = walk.codec.table, walk.codec.table.c[walk.codec.pk]
    query = sa.select(table).order_by(pk).limit(size)
    if after is not None:
        query = query.where(pk > after)
    if walk.where is not None:
        query = query.where(walk.where)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()  # no writer changes a row between its read and its rewrite
    return conn.execute(query).all()


def _rewrite(conn: Connection, walk: _Walk, rows: Sequence[Any]) -> tuple[int, int]:
    """Re-encrypt the stale ``rows``, each only if unchanged since read: (rewritten, conflicts)."""
    codec = walk.codec
    table = codec.table
    columns = list(codec.encrypted) + list(codec.indexes)
    stale = [row for row in rows if walk.stale(row)]
    rewritten = conflicts = 0
    for row in stale:
        sealed = codec.encode(codec.decode(row))
        unchanged = [table.c[codec.pk] == getattr(row, codec.pk)]
        for column in columns:
            old = getattr(row, column)
            unchanged.append(table.c[column].is_(None) if old is None else table.c[column] == old)
        result = conn.execute(table.update().where(*unchanged).values({c: sealed.get(c) for c in columns}))
        if result.rowcount == 1:
            rewritten += 1
        else:
            conflicts += 1
    return rewritten, conflicts


def _batch(conn: Connection, walk: _Walk, size: int) -> tuple[int, int]:
    """Re-encrypt the stale rows among the next ``size`` after the job's cursor, and move the
    cursor: one transaction. (rows walked, conflicts)."""
    jobs, job, codec = walk.jobs, walk.job, walk.codec
    pk = codec.table.c[codec.pk]
    locked = sa.select(jobs).where(jobs.c.job == job)
    if conn.dialect.name == "postgresql":
        locked = locked.with_for_update()  # two runs of one pass take turns, batch by batch
    state = conn.execute(locked).one()
    after = None if state.cursor is None else pk.type.python_type(state.cursor)
    rows = _rows(conn, walk, after, size)
    if not rows:
        return 0, 0
    _, conflicts = _rewrite(conn, walk, rows)
    conn.execute(jobs.update().where(jobs.c.job == job)
                 .values(cursor=str(getattr(rows[-1], codec.pk)), done=state.done + len(rows)))
    return len(rows), conflicts


def _sweep(engine: Engine, walk: _Walk, size: int) -> tuple[int, int]:
    """One walk over the whole table re-encrypting what is still stale: (rewritten, conflicts)."""
    rewritten = conflicts = 0
    after = None
    while True:
        with engine.begin() as conn:
            rows = _rows(conn, walk, after, size)
            if not rows:
                return rewritten, conflicts
            done, clashed = _rewrite(conn, walk, rows)
        rewritten += done
        conflicts += clashed
        after = getattr(rows[-1], walk.codec.pk)


#: Schemas of the database's own catalogue, never a place of field values.
_SYSTEM_SCHEMAS = ("information_schema", "pg_catalog", "pg_toast")


def _value_schemas(conn: Connection) -> list[str]:
    """Every schema of the database that may hold field values (PostgreSQL: each user schema;
    SQLite: ``main`` and every attached database)."""
    names = sa.inspect(conn).get_schema_names()
    return [n for n in names if n not in _SYSTEM_SCHEMAS and not n.startswith(("pg_temp", "pg_toast"))]


def _used_refs(conn: Connection, candidates: frozenset[bytes]) -> set[bytes]:
    """Which of ``candidates`` a binary column of any table in **any schema** of the database
    still names. A data key may serve several tables (one cipher, one store): the same table in
    ``tenant_a`` and ``tenant_b``, or two tables of one schema; checking the codec's schema
    alone deleted keys another schema's rows still needed. A schema that cannot be read makes
    the whole check fail (:class:`StorageError`): then nothing is deleted."""
    used: set[bytes] = set()
    for schema in _value_schemas(conn):
        metadata = sa.MetaData()
        try:
            metadata.reflect(conn, schema=schema)
        except sa.exc.SQLAlchemyError as exc:
            raise errors.StorageError(f"schema {schema!r} could not be read ({type(exc).__name__}): old data keys "
                                      "are kept, since values there may name them") from None
        for table in metadata.tables.values():
            for column in table.columns:
                if not isinstance(column.type, sa.types._Binary):
                    continue
                ref = sa.func.substr(column, 2, KEY_REF_SIZE)
                query = sa.select(ref).where(sa.func.length(column) >= OVERHEAD).distinct()
                used.update(bytes(r) for (r,) in conn.execute(query) if r is not None and bytes(r) in candidates)
    return used


def _drop_old_keys(engine: Engine, walk: _Walk) -> int:
    store = walk.codec.cipher.store
    if not walk.old_refs:
        return 0
    with engine.connect() as conn:
        unused = walk.old_refs - _used_refs(conn, walk.old_refs)
    count = store.delete(walk.codec.cipher.key, sorted(unused))
    if count:
        _log.info("%s: %d old data key(s) of %s deleted", walk.codec.name, count, walk.codec.cipher.key)
    return count


def reencrypt_table(engine: Engine, codec: EncryptedTable, *, batch: int = 500, on_batch: Progress | None = None,
                    job: str | None = None, where: sa.ColumnElement[bool] | None = None,
                    drop_old_keys: bool = True) -> PassResult:
    """Re-encrypt every stale row of ``codec``'s table, or of the rows ``where`` selects (one
    tenant's, when the codec carries that tenant's ``extra``), then delete the old data keys no
    value names (``drop_old_keys``). See the module docstring for the crash protocol."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise errors.ConfigurationError("batch must be at least 1")
    metadata = sa.MetaData()
    jobs, keys = _jobs_table(metadata), _job_keys_table(metadata)
    metadata.create_all(engine, checkfirst=True)
    for spec, _ in codec.indexes.values():
        spec.refresh()  # the newest index version now, not as of the last refresh interval
    job = job or job_name(codec, where, engine.dialect)
    with engine.begin() as conn:
        _, already, finished = _start(conn, jobs, keys, job, codec)
        old = frozenset(bytes(r) for (r,) in conn.execute(sa.select(keys.c.key_ref).where(keys.c.job == job)))
        count = sa.select(sa.func.count()).select_from(codec.table)
        total = int(conn.execute(count if where is None else count.where(where)).scalar_one())
    if finished:
        return PassResult(0, total, already)
    codec.cipher.renew()  # nothing this run seals names an old data key
    walk = _Walk(codec, jobs, job, where, old, {n: spec.version for n, (spec, _) in codec.indexes.items()})
    done = conflicts = 0
    while True:
        with engine.begin() as conn:
            count_done, clashed = _batch(conn, walk, batch)
        if not count_done:
            break
        done += count_done
        conflicts += clashed
        if on_batch is not None:
            on_batch(already + done, total)
    for _ in range(MAX_SWEEPS):
        rewritten, clashed = _sweep(engine, walk, batch)
        conflicts += clashed
        if not rewritten and not clashed:
            break
    deleted = _drop_old_keys(engine, walk) if drop_old_keys else 0
    with engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.job == job).values(finished=True))
    return PassResult(done, total, already, conflicts=conflicts, keys_deleted=deleted)
