"""``keymgr fields rewrap``: after a rotation, move an encrypted table's data keys (and, with
``--reencrypt``, its rows) to the key's current primary.

Thin (STYLE.md 10): :mod:`keymgr.fields.bulk` does the work, resumable and crash-safe; this
module reads the table from the database, draws the progress bar (stderr) and prints a
summary, or ``--json``. Database errors (unreachable server, missing table or driver) are
one line and exit status 1, like keymgr's own.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from keymgr.cli._common import CliState, console, emit_json, fail, pass_state

__all__ = ["fields_group"]


@click.group("fields")
def fields_group() -> None:
    """Encrypted database fields (docs/fields.md)."""


class _Bar:
    def __init__(self, label: str, show: bool) -> None:
        self._progress: Any = None
        if not show:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                  console=Console(file=sys.stderr), transient=True)
        self._task = self._progress.add_task(label, total=None)
        self._progress.start()

    def __call__(self, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def _codec(engine: Any, km: Any, *, table: str, key: str, columns: tuple[str, ...], keys_table: str) -> Any:
    import sqlalchemy as sa

    from keymgr.fields.sql import EncryptedBytes, EncryptedTable, SqlKeyStore

    reflected = sa.Table(table, sa.MetaData(), autoload_with=engine)
    pk = [c.name for c in reflected.primary_key.columns]
    missing = [c for c in columns if c not in reflected.c]
    if len(pk) != 1 or missing:
        fail(f"table {table!r}: " + (f"no column {', '.join(missing)}" if missing
                                     else "needs a one-column primary key"))
    pk_column = reflected.c[pk[0]]
    shaped = sa.Table(table, sa.MetaData(), sa.Column(pk[0], pk_column.type, primary_key=True),
                      *(sa.Column(c, EncryptedBytes) for c in columns))
    store = SqlKeyStore(engine, table=keys_table)
    return EncryptedTable(shaped, km.fields(key, store=store)), store


@fields_group.command("rewrap")
@click.option("--db", "url", required=True, help="SQLAlchemy database URL (postgresql+psycopg://..., sqlite:///...).")
@click.option("--table", required=True, help="The encrypted table.")
@click.option("--key", required=True, help="The keymgr key its fields are encrypted under.")
@click.option("--column", "columns", multiple=True, help="An encrypted column (repeat); needed with --reencrypt.")
@click.option("--reencrypt", is_flag=True,
              help="Also re-encrypt every row under fresh data keys (reads payloads; resumable, "
                   "one transaction per batch).")
@click.option("--batch", type=click.IntRange(1, 100_000), default=500, show_default=True, help="Rows per transaction.")
@click.option("--keys-table", default="keymgr_field_keys", show_default=True, help="The data-key table.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: on a terminal).")
@pass_state
def rewrap_fields_command(state: CliState, url: str, table: str, key: str, columns: tuple[str, ...], reencrypt: bool,
                          batch: int, keys_table: str, progress: bool | None) -> None:
    """Rewrap a table's field data keys under KEY's primary (no value read); with --reencrypt,
    re-encrypt its rows too. Safe to kill and run again: it continues where it stopped."""
    try:
        import sqlalchemy as sa
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:
        fail("keymgr fields needs SQLAlchemy: pip install 'keymgr[db]'")
    from keymgr.fields.bulk import reencrypt_table, rewrap_keys

    if reencrypt and not columns:
        fail("--reencrypt needs the encrypted columns (--column NAME, repeated)")
    show = progress if progress is not None else (sys.stderr.isatty() and not state.json_output)
    km = state.manager()
    try:
        engine = sa.create_engine(url)
        codec, store = _codec(engine, km, table=table, key=key, columns=columns, keys_table=keys_table)
        bar = _Bar("data keys", show)
        try:
            keys = rewrap_keys(codec.cipher, store, on_batch=bar)
        finally:
            bar.stop()
        rows = None
        if reencrypt:
            bar = _Bar("rows", show)
            try:
                rows = reencrypt_table(engine, codec, batch=batch, on_batch=bar)
            finally:
                bar.stop()
    except SQLAlchemyError as exc:
        fail(f"database: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    except (ModuleNotFoundError, ImportError) as exc:
        fail(f"database driver missing: {exc.name or exc}")
    finally:
        km.close()  # writes the aggregated audit counts now, not at interpreter exit
        state._manager = None
    summary = {"table": table, "key": key, "data_keys": keys.total, "data_keys_rewrapped": keys.done,
               "rows_reencrypted": None if rows is None else rows.done,
               "rows_total": None if rows is None else rows.total,
               "resumed_after": None if rows is None else rows.resumed_from}
    if state.json_output:
        emit_json(summary)
        return
    out = console()
    out.print(f"{table}: {keys.done} of {keys.total} data key(s) rewrapped under {key!r}'s primary")
    if rows is not None:
        resumed = f" (resumed after {rows.resumed_from})" if rows.resumed_from else ""
        out.print(f"{table}: {rows.done} row(s) re-encrypted in this run{resumed}, {rows.total} in the table")
