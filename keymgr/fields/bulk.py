"""Bulk work on an encrypted table after a rotation: rewrap its data keys, re-encrypt its rows.

Two passes, each resumable and safe to kill at any instant (SIGKILL included):

* :func:`rewrap_keys`: every data key of the table's key in the data-key table moves under
  the key's current primary (:meth:`FieldCipher.rewrap`). No value is read or written: a
  table of a million rows has about a hundred data keys (10,000 values each). Each row is
  replaced in its own transaction; a row already current is skipped, so a rerun after a
  kill simply continues.
* :func:`reencrypt_table`: every row is opened and sealed again under a fresh data key of
  the current primary, and its blind-index terms recomputed with the newest index version.
  Needed when data keys themselves must go (a suspected leak of the host, an old version to
  be destroyed without keeping its data keys alive under the new one, an index rotation).
  Rows are walked in primary-key order in batches; each batch, **and the cursor that says
  it is done**, commit in one transaction. A kill loses at most the open batch's work, which
  the database rolls back whole: no row is half-written, and the next run starts after the
  last committed batch. The job is named after its target (key version, index versions), so
  a later rotation starts a new pass instead of believing the old one finished.

Progress is reported through ``on_batch(done, total)`` (the CLI draws a bar from it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from keymgr.fields.cipher import FieldCipher
from keymgr.fields.keys import KeyStore
from keymgr.fields.sql import EncryptedTable

__all__ = ["PassResult", "reencrypt_table", "rewrap_keys"]

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PassResult:
    """What one run of a pass did: ``done`` items in this run, ``total`` in the whole pass."""

    done: int
    total: int
    resumed_from: int = 0


def rewrap_keys(cipher: FieldCipher, store: KeyStore, *, batch: int = 100,
                on_batch: Progress | None = None) -> PassResult:
    """Rewrap every data key of ``cipher``'s key in ``store``; returns how many moved."""
    after = b""
    moved = seen = 0
    while True:
        rows = store.scan(cipher.key, after=after, limit=batch)
        if not rows:
            return PassResult(moved, seen)
        for stored in rows:
            new = cipher.rewrap(stored)
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


def job_name(codec: EncryptedTable) -> str:
    """The pass's name: table, key version, index versions (a new rotation, a new pass)."""
    record = codec.cipher.describe()
    indexes = ",".join(f"{n}:v{spec.version}" for n, (spec, _) in sorted(codec.indexes.items()))
    return f"reencrypt {codec.table.name} {record.name}:v{record.primary} {indexes}"[:200]


def _start(conn: Connection, jobs: sa.Table, job: str) -> tuple[str | None, int, bool]:
    row = conn.execute(sa.select(jobs).where(jobs.c.job == job)).first()
    if row is None:
        conn.execute(jobs.insert().values(job=job, cursor=None, done=0, finished=False))
        return None, 0, False
    return row.cursor, int(row.done), bool(row.finished)


def _batch(conn: Connection, codec: EncryptedTable, jobs: sa.Table, job: str, size: int) -> int:
    """Re-encrypt the next ``size`` rows after the job's cursor, and move the cursor: one transaction."""
    table, pk = codec.table, codec.table.c[codec.pk]
    locked = sa.select(jobs).where(jobs.c.job == job)
    if conn.dialect.name == "postgresql":
        locked = locked.with_for_update()  # two runs of one pass take turns, batch by batch
    state = conn.execute(locked).one()
    query = sa.select(table).order_by(pk).limit(size)
    if state.cursor is not None:
        query = query.where(pk > pk.type.python_type(state.cursor))
    rows = conn.execute(query).all()
    if not rows:
        conn.execute(jobs.update().where(jobs.c.job == job).values(finished=True))
        return 0
    columns = list(codec.encrypted) + list(codec.indexes)
    params: list[dict[str, Any]] = []
    for row in rows:
        sealed = codec.encode(codec.decode(row))
        params.append({"_pk": getattr(row, codec.pk), **{c: sealed.get(c) for c in columns}})
    conn.execute(table.update().where(pk == sa.bindparam("_pk")).values({c: sa.bindparam(c) for c in columns}),
                 params)
    conn.execute(jobs.update().where(jobs.c.job == job)
                 .values(cursor=str(getattr(rows[-1], codec.pk)), done=state.done + len(rows)))
    return len(rows)


def reencrypt_table(engine: Engine, codec: EncryptedTable, *, batch: int = 500, on_batch: Progress | None = None,
                    job: str | None = None) -> PassResult:
    """Re-encrypt every row of ``codec``'s table (see the module docstring for the crash protocol)."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    jobs = _jobs_table(sa.MetaData())
    jobs.create(engine, checkfirst=True)
    job = job or job_name(codec)
    with engine.begin() as conn:
        _, already, finished = _start(conn, jobs, job)
        total = int(conn.execute(sa.select(sa.func.count()).select_from(codec.table)).scalar_one())
    if finished:
        return PassResult(0, total, already)
    done = 0
    while True:
        with engine.begin() as conn:
            count = _batch(conn, codec, jobs, job, batch)
        if not count:
            return PassResult(done, total, already)
        done += count
        if on_batch is not None:
            on_batch(already + done, total)
