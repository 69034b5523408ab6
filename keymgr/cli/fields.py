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

from keymgr import errors
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


def _pairs(option: str, given: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in given:
        name, eq, value = item.partition("=")
        if not eq or not name:
            fail(f"{option} takes NAME=VALUE, not {item!r}")
        out[name] = value
    return out


def _is_uuid_key(engine: Any, column: Any, pk_kind: str) -> bool:
    """Whether the primary key holds UUIDs (bound in canonical form) or strings (bound as they are).
    auto: a Uuid column, or on SQLite the CHAR(32) that SQLAlchemy's Uuid makes there."""
    import sqlalchemy as sa

    if pk_kind != "auto":
        return pk_kind == "uuid"
    if isinstance(column.type, sa.Uuid):
        return True
    return engine.dialect.name == "sqlite" and isinstance(column.type, sa.CHAR) and column.type.length == 32


def _codec(engine: Any, km: Any, *, table: str, schema: str | None, key: str, columns: tuple[str, ...],
           keys_table: str, extra: dict[str, str], pk_kind: str) -> Any:
    import sqlalchemy as sa

    from keymgr.fields.sql import EncryptedBytes, EncryptedTable, SqlKeyStore

    reflected = sa.Table(table, sa.MetaData(), autoload_with=engine, schema=schema)
    pk = [c.name for c in reflected.primary_key.columns]
    missing = [c for c in columns if c not in reflected.c]
    if len(pk) != 1 or missing:
        fail(f"table {table!r}: " + (f"no column {', '.join(missing)}" if missing
                                     else "needs a one-column primary key"))
    plain = [c for c in columns if not isinstance(reflected.c[c].type, sa.LargeBinary | sa.types.BINARY
                                                  | sa.types.VARBINARY)]
    if plain:
        fail(f"table {table!r}: column {', '.join(plain)} is not a binary column, so it holds no encrypted values")
    pk_type = sa.Uuid() if _is_uuid_key(engine, reflected.c[pk[0]], pk_kind) else reflected.c[pk[0]].type
    shaped = sa.Table(table, sa.MetaData(), sa.Column(pk[0], pk_type, primary_key=True),
                      *(sa.Column(c, EncryptedBytes) for c in columns), schema=schema)
    store = SqlKeyStore(engine, table=keys_table)
    return EncryptedTable(shaped, km.fields(key, store=store), extra=extra), store


def _load_codec(spec: str, km: Any, engine: Any) -> Any:
    """The application's own codec, from ``--codec MODULE:FACTORY``: ``FACTORY(km, engine)``
    returns its EncryptedTable, with the blind indexes and normalisers that live in its code,
    so a re-encryption recomputes every term as the application would. The current directory
    is searched last (after keymgr's and the installed packages), so under the ``keymgr``
    command it cannot shadow them (``python -m keymgr`` is different: Python itself puts the
    current directory first)."""
    import os
    import pkgutil

    from keymgr.fields.sql import EncryptedTable

    module_name, _, attribute = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        factory = pkgutil.resolve_name(spec)
    except SystemExit as exc:  # the module called sys.exit(): its code is not keymgr's exit status
        fail(f"--codec: importing {module_name!r} called sys.exit({exc.code!r})")
    except AttributeError:
        fail(f"--codec: {module_name!r} has no function {attribute!r}")
    except Exception as exc:  # the application's module: any failure is one line, not a traceback
        fail(f"--codec: cannot import {module_name!r}: {type(exc).__name__}: {_first_line(exc)}")
    if not callable(factory):
        fail(f"--codec: {module_name!r} has no function {attribute!r}")
    try:
        codec = factory(km, engine)
    except errors.KeymgrError:
        raise  # keymgr's own: the CLI's usual one-line message
    except SystemExit as exc:
        fail(f"--codec: {spec}(km, engine) called sys.exit({exc.code!r})")
    except Exception as exc:
        fail(f"--codec: {spec}(km, engine) failed: {type(exc).__name__}: {_first_line(exc)}")
    if not isinstance(codec, EncryptedTable):
        fail(f"--codec: {spec} returned {type(codec).__name__}, not a keymgr.fields.sql.EncryptedTable")
    return codec


def _codec_of(engine: Any, km: Any, codec_spec: str | None, *, table: str | None, schema: str | None,
              key: str | None, columns: tuple[str, ...], keys_table: str, extra: dict[str, str],
              pk_kind: str) -> tuple[Any, Any]:
    """The codec and data-key store: the application's (``--codec``), or one shaped from the
    reflected table and the options."""
    if codec_spec is None:
        assert table is not None and key is not None  # the command checked
        codec, store = _codec(engine, km, table=table, schema=schema, key=key, columns=columns,
                              keys_table=keys_table, extra=extra, pk_kind=pk_kind)
        return codec, store
    given = {"--schema": schema is not None, "--column": bool(columns), "--extra": bool(extra),
             "--pk": pk_kind != "auto", "--keys-table": keys_table != "keymgr_field_keys"}
    return _given_codec(codec_spec, km, engine, table=table, key=key,
                        conflicting=[option for option, on in given.items() if on])


def _check_codec_spec(ctx: click.Context, param: click.Parameter, spec: str | None) -> str | None:
    """MODULE:FACTORY's shape, checked as click parses the arguments (a usage error, exit 2,
    before any token is opened)."""
    if spec is None:
        return None
    module_name, colon, attribute = spec.partition(":")
    if not colon or not all(p.isidentifier() for p in module_name.split(".")) or not attribute.isidentifier():
        raise click.BadParameter(f"takes MODULE:FACTORY (myapp.db:customers_codec), not {spec!r}")
    return spec


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""


def _given_codec(spec: str, km: Any, engine: Any, *, table: str | None, key: str | None,
                 conflicting: list[str]) -> tuple[Any, Any]:
    """The codec of ``--codec`` and its table and key, after checking the options that would
    contradict it (its table, key, columns and context come from the application's code)."""
    if conflicting:
        fail(f"--codec gives the table's columns and context; drop {', '.join(conflicting)}")
    codec = _load_codec(spec, km, engine)
    if table is not None and table not in (codec.table.name, codec.name):
        fail(f"--codec {spec} encrypts table {codec.name!r}, not {table!r}")
    if key is not None and key != codec.cipher.key:
        fail(f"--codec {spec} encrypts under key {codec.cipher.key!r}, not {key!r}")
    return codec, codec.cipher.store


@fields_group.command("rewrap")
@click.option("--db", "url", required=True, help="SQLAlchemy database URL (postgresql+psycopg://..., sqlite:///...).")
@click.option("--codec", "codec_spec", default=None, metavar="MODULE:FACTORY", callback=_check_codec_spec,
              help="The application's codec: FACTORY(km, engine) returns its EncryptedTable (columns, blind "
                   "indexes, normalisers, context), so --reencrypt also recomputes every blind-index term "
                   "with the newest index version. Runs that module's code. Instead of --table/--column/--extra.")
@click.option("--table", default=None, help="The encrypted table (required without --codec).")
@click.option("--schema", default=None, help="The table's schema (PostgreSQL; bound into its values).")
@click.option("--key", default=None, help="The keymgr key its fields are encrypted under (required without --codec).")
@click.option("--column", "columns", multiple=True, help="An encrypted column (repeat); needed with --reencrypt.")
@click.option("--reencrypt", is_flag=True,
              help="Also re-encrypt every row under fresh data keys (reads payloads; resumable, "
                   "one transaction per batch), then delete the old data keys no value names.")
@click.option("--extra", "extras", multiple=True, metavar="NAME=VALUE",
              help="Extra context the values are bound to (a tenant: --extra tenant=acme); repeat.")
@click.option("--filter", "filters", multiple=True, metavar="COLUMN=VALUE",
              help="Re-encrypt only rows where COLUMN equals VALUE (that tenant's rows); repeat.")
@click.option("--pk", "pk_kind", type=click.Choice(["auto", "uuid", "text"]), default="auto", show_default=True,
              help="How the primary key is bound: uuid (canonical form) or text (as stored); auto: uuid for a "
                   "UUID column (CHAR(32) on SQLite).")
@click.option("--keep-data-keys", is_flag=True,
              help="With --reencrypt: keep the old data keys (old values in backups then stay readable).")
@click.option("--batch", type=click.IntRange(1, 100_000), default=500, show_default=True, help="Rows per transaction.")
@click.option("--keys-table", default="keymgr_field_keys", show_default=True, help="The data-key table.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: on a terminal).")
@pass_state
def rewrap_fields_command(state: CliState, url: str, codec_spec: str | None, table: str | None,
                          schema: str | None, key: str | None, columns: tuple[str, ...], reencrypt: bool,
                          extras: tuple[str, ...], filters: tuple[str, ...], pk_kind: str, keep_data_keys: bool,
                          batch: int, keys_table: str, progress: bool | None) -> None:
    """Rewrap a table's field data keys under KEY's primary (no value read); with --reencrypt,
    re-encrypt its rows too. Safe to kill and run again: it continues where it stopped.
    Without --codec, terms of blind indexes are carried over as they are (normalisers are the
    application's code); with it, they are recomputed."""
    try:
        import sqlalchemy as sa
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:
        fail("keymgr fields needs SQLAlchemy: pip install 'keymgr[db]'")
    from keymgr.fields.bulk import reencrypt_table, rewrap_keys

    if codec_spec is None and (table is None or key is None):
        raise click.UsageError("give --table and --key, or --codec MODULE:FACTORY")
    if codec_spec is None and reencrypt and not columns:
        fail("--reencrypt needs the encrypted columns (--column NAME, repeated)")
    extra, wanted = _pairs("--extra", extras), _pairs("--filter", filters)
    show = progress if progress is not None else (sys.stderr.isatty() and not state.json_output)
    km = state.manager()
    try:
        engine = sa.create_engine(url)
        codec, store = _codec_of(engine, km, codec_spec, table=table, schema=schema, key=key, columns=columns,
                                 keys_table=keys_table, extra=extra, pk_kind=pk_kind)
        table, key, schema = codec.name, codec.cipher.key, codec.table.schema
        if not store.count(key):
            fail(f"{store.table.name} holds no data-key rows of key {key!r}: "
                 f"is it the key {table!r} is encrypted under?")
        bar = _Bar("data keys", show)
        try:
            keys = rewrap_keys(codec.cipher, store, on_batch=bar)
        finally:
            bar.stop()
        rows = None
        if reencrypt:
            where = _where(engine, codec.table, schema, wanted)
            bar = _Bar("rows", show)
            try:
                rows = reencrypt_table(engine, codec, batch=batch, on_batch=bar, where=where,
                                       drop_old_keys=not keep_data_keys)
            finally:
                bar.stop()
    except SQLAlchemyError as exc:
        fail(f"database: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    except (ModuleNotFoundError, ImportError) as exc:
        fail(f"database driver missing: {exc.name or exc}")
    finally:
        state.close_manager()  # writes the aggregated audit counts now, not at interpreter exit
    _report(state, table, key, keys, rows)


def _where(engine: Any, shaped: Any, schema: str | None, wanted: dict[str, str]) -> Any:
    """The row filter of --filter: equality on reflected columns (their own types)."""
    if not wanted:
        return None
    import sqlalchemy as sa

    reflected = sa.Table(shaped.name, sa.MetaData(), autoload_with=engine, schema=schema)
    missing = [c for c in wanted if c not in reflected.c]
    if missing:
        fail(f"--filter: table {shaped.name!r} has no column {', '.join(missing)}")
    return sa.and_(*(sa.column(name, reflected.c[name].type) == value for name, value in wanted.items()))


def _report(state: CliState, table: str, key: str, keys: Any, rows: Any) -> None:
    summary = {"table": table, "key": key, "data_keys": keys.total, "data_keys_rewrapped": keys.done,
               "data_keys_failed": list(keys.failed),
               "rows_reencrypted": None if rows is None else rows.done,
               "rows_total": None if rows is None else rows.total,
               "resumed_after": None if rows is None else rows.resumed_from,
               "rows_conflicting": None if rows is None else rows.conflicts,
               "data_keys_deleted": None if rows is None else rows.keys_deleted}
    if state.json_output:
        emit_json(summary)
    else:
        out = console()
        out.print(f"{table}: {keys.done} of {keys.total} data key(s) rewrapped under {key!r}'s primary")
        if rows is not None:
            resumed = f" (resumed after {rows.resumed_from})" if rows.resumed_from else ""
            out.print(f"{table}: {rows.done} row(s) walked in this run{resumed}, {rows.total} in the table; "
                      f"{rows.keys_deleted} old data key(s) deleted")
            if rows.conflicts:
                out.print(f"{table}: {rows.conflicts} row(s) changed by another writer meanwhile were left to it")
    if keys.failed:
        fail(f"{len(keys.failed)} data key(s) not rewrapped (tampered or not this key's): "
             f"{', '.join(keys.failed[:10])}{' ...' if len(keys.failed) > 10 else ''}", code=4)
