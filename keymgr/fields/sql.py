"""SQLAlchemy integration: column types, the data-key table, and a table codec (extra ``[db]``).

::

    customers = Table("customers", metadata,
        Column("id", Uuid, primary_key=True),                  # client-generated: no round trip
        Column("email", EncryptedText), Column("card", EncryptedText), Column("national_id", EncryptedText),
        Column("email_bidx", BlindIndexTerm, index=True),       # a database index on the term
        Column("card_last4_bidx", BlindIndexTerm, index=True))
    codec = EncryptedTable(customers, km.fields("customers", store=SqlKeyStore(engine)),
                           indexes={"email_bidx": (email_index, "email"), "card_last4_bidx": (last4, "card")})
    conn.execute(customers.insert(), codec.encode_rows(rows))   # bulk insert (executemany)
    codec.find(conn, "email_bidx", "Alice@example.com")          # lookup by term, decrypt, drop false positives

Each value is bound to (schema-qualified table name, column name, primary key, extra context):
the codec assigns a UUID4 to a row without one, so values are sealed before the insert and a
whole batch goes in one ``executemany``. A ``Uuid`` primary key is bound in its canonical form
whichever way the database returns it; any other key is bound as the string it is. Each
blind-index term is bound to (table, index column, extra context) too: equal values in two
tables or two tenants get unrelated terms. The column types store bytes and refuse anything
that did not come out of the codec (:class:`Sealed`): plaintext handed to an encrypted column
by mistake is a :class:`PlaintextRefused` (a ConfigurationError that SQLAlchemy raises as it is,
not wrapped in a ``StatementError`` whose text would show the statement's parameters, the
plaintext among them). Reads return :class:`Sealed` values for :meth:`EncryptedTable.decode`.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import SingletonThreadPool, StaticPool

from keymgr import errors
from keymgr.fields._format import FIELD_INTEGRITY, Place
from keymgr.fields.cipher import FieldCipher
from keymgr.fields.index import BlindIndex, Part, Term, index_context
from keymgr.fields.keys import StoredKey

__all__ = ["BlindIndexTerm", "EncryptedBytes", "EncryptedTable", "EncryptedText", "PlaintextRefused", "Sealed",
           "SqlKeyStore"]

_log = logging.getLogger("keymgr.fields")


class PlaintextRefused(errors.ConfigurationError, sa.exc.DontWrapMixin):
    """A value that is not sealed, given to an encrypted column. Raised as it is through
    SQLAlchemy (``DontWrapMixin``): a ``StatementError`` would print the parameters, and with
    them the plaintext, unless the engine was made with ``hide_parameters=True``."""


class SealedValueMissing(errors.IntegrityError, sa.exc.DontWrapMixin):
    """An encrypted column returned something other than bytes (a plaintext column declared
    encrypted by mistake): never shown."""

#: A blind index fed by one column, or by several (compound), of the same row's plaintext.
IndexSpec = tuple[BlindIndex, str | Sequence[str]]


class Sealed(bytes):
    """A value in the field form, as it goes to and comes from an encrypted column."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Sealed({len(self)} bytes)"


class _MarkedBytes(sa.types.TypeDecorator[bytes]):
    """A binary column that takes only values of one marker type (what keymgr computed: a
    plaintext written by mistake is refused, not stored in the clear) and returns them as that
    type, so a value read back can be written again."""

    impl = sa.LargeBinary
    cache_ok = True
    marker: type[bytes] = bytes
    refusal = ""

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> bytes | None:
        if value is None:
            return None
        if not isinstance(value, self.marker):
            raise PlaintextRefused(self.refusal)
        return bytes(value)

    def bind_processor(self, dialect: sa.Dialect) -> Callable[[Any], Any] | None:
        """:meth:`process_bind_param`'s check alone where the driver takes ``bytes`` (and its
        subclasses) for ``bytea``/``BLOB`` as they are (:func:`native_bytes`): no copy, and not
        ``LargeBinary``'s wrapping of each value in the driver's ``Binary`` (~2 µs a value with its
        dumping on psycopg 3; five values a row here)."""
        if not native_bytes(dialect):
            return super().bind_processor(dialect)
        marker, refuse = self.marker, self.process_bind_param

        def process(value: Any) -> Any:
            if value is None or value.__class__ is marker:
                return value
            return refuse(value, dialect)
        return process

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> bytes | None:
        if value is None:
            return None
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise SealedValueMissing(FIELD_INTEGRITY)
        return self.marker(value)


class EncryptedBytes(_MarkedBytes):
    """A column holding field-form values (``bytea`` / ``BLOB``); plaintext bytes."""

    cache_ok = True
    text = False
    marker = Sealed
    refusal = ("an encrypted column takes only values sealed by EncryptedTable (encode / encode_rows); "
               "refusing to write it in the clear")


class EncryptedText(EncryptedBytes):
    """:class:`EncryptedBytes` whose plaintext is UTF-8 text."""

    cache_ok = True
    text = True


class BlindIndexTerm(_MarkedBytes):
    """A blind-index term column (give it ``index=True``). Takes only terms a :class:`BlindIndex`
    computed (:class:`~keymgr.fields.index.Term`, as the codec and lookups pass them, or as the
    column returned them): a plaintext written here by mistake is refused, never stored."""

    cache_ok = True
    marker = Term
    refusal = ("a blind-index term column takes only terms a BlindIndex computed (encode / encode_rows / "
               "index.term); refusing to write it in the clear")


class _CodecBytes(sa.types.TypeDecorator[bytes]):
    """A binary column as :meth:`EncryptedTable.insert_many` writes it: values it sealed or
    computed itself, as plain ``bytes``, taken without a check each (:meth:`EncryptedTable._writer`)."""

    impl = sa.LargeBinary
    cache_ok = True

    def bind_processor(self, dialect: sa.Dialect) -> Callable[[Any], Any] | None:
        return None if native_bytes(dialect) else super().bind_processor(dialect)


def native_bytes(dialect: sa.Dialect) -> bool:
    """Whether the driver binds ``bytes`` as ``bytea``/``BLOB`` itself (psycopg 3, sqlite3):
    then SQLAlchemy's wrapping of each value in ``dbapi.Binary`` is only a cost."""
    return dialect.driver in ("psycopg", "pysqlite")


class SqlKeyStore:
    """The data-key table (:mod:`keymgr.fields.keys`) in the same database.

    :meth:`save` commits in a transaction of its own before the value that names the key is
    written, so a rolled-back insert leaves at most an unused row, never a value whose key is
    gone. Rows carry no secret (wrapped keys and commitments)."""

    def __init__(self, engine: Engine, *, table: str = "keymgr_field_keys", metadata: sa.MetaData | None = None):
        if isinstance(engine.pool, (SingletonThreadPool, StaticPool)):
            # one DBAPI connection for everything (sqlite:// in memory): the store's own transaction
            # would commit, or roll back, the caller's open one
            raise errors.ConfigurationError("the data-key store needs connections of its own: an engine with a "
                                            "single shared connection (in-memory SQLite) would commit the "
                                            "caller's transaction; use a database file")
        self._engine = engine
        self.table = sa.Table(
            table, metadata or sa.MetaData(),
            sa.Column("key_ref", sa.LargeBinary(8), primary_key=True),
            sa.Column("key_name", sa.String(64), nullable=False, index=True),
            sa.Column("recipient", sa.LargeBinary, nullable=False),
            sa.Column("commitment", sa.LargeBinary(32), nullable=False),
            extend_existing=True)

    def create(self) -> None:
        self.table.create(self._engine, checkfirst=True)

    @staticmethod
    def _row(row: Any) -> StoredKey:
        return StoredKey(bytes(row.key_ref), row.key_name, bytes(row.recipient), bytes(row.commitment))

    def load(self, key_ref: bytes) -> StoredKey | None:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(self.table).where(self.table.c.key_ref == key_ref)).first()
        return None if row is None else self._row(row)

    def save(self, stored: StoredKey) -> None:
        with self._engine.begin() as conn:
            conn.execute(self.table.insert().values(key_ref=stored.key_ref, key_name=stored.key,
                                                    recipient=stored.recipient, commitment=stored.commitment))

    def replace(self, stored: StoredKey) -> None:
        with self._engine.begin() as conn:
            conn.execute(self.table.update().where(self.table.c.key_ref == stored.key_ref)
                         .values(recipient=stored.recipient))

    def delete(self, key: str, key_refs: Iterable[bytes]) -> int:
        """Delete these data-key rows of ``key`` (a re-encryption pass's last step: the values
        that named them are gone, so old data keys die with the KEK version); how many went."""
        refs = list(key_refs)
        with self._engine.begin() as conn:
            return sum(int(conn.execute(self.table.delete().where(self.table.c.key_ref.in_(refs[i:i + 500]),
                                                                  self.table.c.key_name == key)).rowcount)
                       for i in range(0, len(refs), 500))

    def scan(self, key: str, *, after: bytes = b"", limit: int = 1000) -> list[StoredKey]:
        t = self.table
        query = (sa.select(t).where(t.c.key_name == key, t.c.key_ref > after).order_by(t.c.key_ref).limit(limit))
        with self._engine.connect() as conn:
            return [self._row(r) for r in conn.execute(query)]

    def count(self, key: str) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(self.table)
                                    .where(self.table.c.key_name == key)).scalar_one())


class EncryptedTable:
    """Seal and open the rows of one table: every :class:`EncryptedBytes` column through
    ``cipher``, bound to (schema.table, column, primary key, extra); blind-index columns from
    ``indexes``, each term bound to (schema.table, index column, extra)."""

    def __init__(self, table: sa.Table, cipher: FieldCipher, *, indexes: Mapping[str, IndexSpec] | None = None,
                 pk: str | None = None, extra: Mapping[str, str] | None = None) -> None:
        """``extra``: context bound into every value and term besides its place (a tenant: one
        codec per tenant)."""
        keys = [c.name for c in table.primary_key.columns]
        self.pk = pk or (keys[0] if len(keys) == 1 else "")
        if not self.pk or self.pk not in table.c:
            raise errors.ConfigurationError(f"table {table.name!r} needs a single-column primary key for its fields")
        self.table = table
        self.name = table.fullname  # schema.table: tenant_a.acct and tenant_b.acct are two places
        self.cipher = cipher
        self.extra = dict(extra or {})
        self.uuid_key = _is_uuid(table.c[self.pk])
        #: Lookup candidates dropped because they failed authentication (see :meth:`find`).
        self.skipped = 0
        renamed = [c.name for c in table.columns if isinstance(c.type, _MarkedBytes) and c.key != c.name]
        if renamed:  # rows, statements and places name these columns by name: one spelling only
            raise errors.ConfigurationError(f"{table.name}: encrypted and blind-index columns need key == name "
                                            f"({', '.join(renamed)} has another key)")
        self._encrypted: Mapping[str, bool] = MappingProxyType(
            {c.name: bool(c.type.text) for c in table.columns if isinstance(c.type, EncryptedBytes)})
        self._text = frozenset(name for name, text in self.encrypted.items() if text)
        self._text_columns = tuple(name for name, text in self.encrypted.items() if text)
        self._bytes_columns = tuple(name for name, text in self.encrypted.items() if not text)
        self._written: tuple[str, ...] = ()  # the columns _encode fills in every row
        self._columns = tuple(self.encrypted)
        self._statements: dict[tuple[str, bool], sa.Select[Any]] = {}
        self._indexes: Mapping[str, IndexSpec] = MappingProxyType(
            {name: (index, source if isinstance(source, str) else tuple(source))
             for name, (index, source) in (indexes or {}).items()})
        self._contexts: dict[str, bytes] = {}
        extras = [part for name in sorted(self.extra) for part in (name, self.extra[name])]
        for name, (_, source) in self.indexes.items():
            sources = [source] if isinstance(source, str) else list(source)
            if name not in table.c or not isinstance(table.c[name].type, BlindIndexTerm):
                raise errors.ConfigurationError(f"{table.name}.{name} is not a BlindIndexTerm column")
            if not set(sources) <= set(self.encrypted):
                raise errors.ConfigurationError(f"blind index {name!r} reads a column that is not encrypted")
            self._contexts[name] = index_context(self.name, name, *extras)
        self._written = self._columns + tuple(self._indexes)

    @property
    def encrypted(self) -> Mapping[str, bool]:
        """Encrypted column → whether it holds text (read-only: fixed when the codec is made)."""
        return self._encrypted

    @property
    def indexes(self) -> Mapping[str, IndexSpec]:
        """Blind-index column → (index, source column or columns) (read-only: fixed when the
        codec is made, as :meth:`insert_many` writes exactly these columns unchecked)."""
        return self._indexes

    def place(self, column: str, row_id: object) -> Place:
        return Place(self.name, column, self.row_text(row_id), self.extra)

    def row_text(self, row_id: object) -> str:
        """A row identity as bound into its values (see :func:`row_text`)."""
        return row_text(row_id, uuid_key=self.uuid_key)

    def index_context(self, index: str) -> bytes:
        """What ``index``'s terms in this table are bound to (table, column, extra)."""
        self._spec(index)
        return self._contexts[index]

    def _spec(self, index: str) -> IndexSpec:
        spec = self.indexes.get(index)
        if spec is None:
            raise errors.ConfigurationError(f"{self.name} has no blind index {index!r} "
                                            f"(known: {', '.join(sorted(self.indexes)) or 'none'})")
        return spec

    def _new_id(self) -> object:
        if not self.uuid_key:
            raise errors.ConfigurationError(f"give every row of {self.name!r} its {self.pk!r} before sealing "
                                            "(only a UUID key is generated here)")
        return uuid.uuid4()

    def encode(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Database parameters for a row given in plaintext (a UUID primary key is made if absent)."""
        return self.encode_rows([row])[0]

    def encode_rows(self, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """:meth:`encode` for many rows, all or nothing: each index's terms for the batch as one
        audited operation, the fields through :meth:`FieldCipher.prepare_columns` and
        :meth:`FieldCipher.seal`, the two halves of :meth:`FieldCipher.encrypt_columns` (from 256 rows on,
        one audited operation and one check of the key's state per batch of at most 16,384
        values; fewer rows, one per row). Text columns take ``str``, bytes columns ``bytes`` (a value of
        the wrong kind would seal, then fail at every read). Every row is checked before any term
        is computed: a bad row costs no HMAC, no subkey and no ``index`` entry (the cipher's check
        records its one failed ``encrypt`` entry)."""
        return self._encode(rows, marked=True)

    def _encode(self, rows: Iterable[Mapping[str, Any]], *, marked: bool) -> list[dict[str, Any]]:
        """:meth:`encode_rows`; ``marked=False``: sealed values and terms as plain ``bytes``, for
        :meth:`insert_many`, which writes them through :meth:`_writer`."""
        refused = f"{self.name}: each row maps column names (str) to values"
        try:
            out = [dict(row) for row in rows]
        except (TypeError, ValueError):  # a row that is no mapping
            raise errors.ConfigurationError(refused) from None
        try:
            row_ids = self._row_ids(out)
        except TypeError:  # a row keyed by Column objects (their == builds SQL, which has no truth value)
            if all(type(name) is str for row in out for name in row):
                raise
            raise errors.ConfigurationError(refused) from None
        columns = self._columns
        batch = self.cipher.prepare_columns(out, row_ids, table=self.name, columns=columns, extra=self.extra)
        for name, (index, source) in self._indexes.items():  # exactly the columns of _written
            inputs: list[Part | list[Part] | None]
            if isinstance(source, str):
                inputs = [value if (value := row.get(source)).__class__ is str else _part(value) for row in out]
            else:
                inputs = [_index_input(row, source) for row in out]
            terms = index.term_many(inputs, context=self._contexts[name], marked=marked)
            for row, term in zip(out, terms, strict=True):
                row[name] = term
        sealed = self.cipher.seal(batch)
        width = len(columns)
        for at, column in enumerate(columns):
            if marked:
                for row, value in zip(out, sealed[at::width], strict=True):
                    row[column] = None if value is None else Sealed(value)
            else:
                for row, value in zip(out, sealed[at::width], strict=True):
                    row[column] = value
        return out

    def _row_ids(self, out: list[dict[str, Any]]) -> list[str]:
        """Every row's kinds checked (:meth:`_check_kinds`, written out: a bulk insert's rows) and
        its identity as bound (a UUID key made for a row without one)."""
        pk, text_columns, bytes_columns = self.pk, self._text_columns, self._bytes_columns
        row_ids = []
        for row in out:
            for column in text_columns:
                value = row.get(column)
                if value is not None and value.__class__ is not str and not isinstance(value, str):
                    self._check_kinds(row)
            for column in bytes_columns:
                if not isinstance(row.get(column), (bytes, bytearray, memoryview, type(None))):
                    self._check_kinds(row)
            key = row.get(pk)
            if key is None:
                if not all(type(name) is str for name in row):  # keyed by Column objects, say
                    raise TypeError("a row key that is not a column name")
                key = row[pk] = self._new_id()
            row_ids.append(str(key) if key.__class__ is uuid.UUID else self.row_text(key))
        return row_ids

    def _check_kinds(self, row: Mapping[str, Any]) -> None:
        for column, text in self.encrypted.items():
            value = row.get(column)
            if value is None:
                continue
            if text and not isinstance(value, str):
                raise errors.ConfigurationError(f"{self.name}.{column} is EncryptedText: give it str, "
                                                f"not {type(value).__name__}")
            if not text and not isinstance(value, (bytes, bytearray, memoryview)):
                raise errors.ConfigurationError(f"{self.name}.{column} is EncryptedBytes: give it bytes, "
                                                f"not {type(value).__name__}")

    def insert_many(self, engine: Engine, rows: Iterable[Mapping[str, Any]], *, batch: int = 5_000) -> list[Any]:
        """Insert ``rows`` (plaintext; any iterable, a generator included) in batches: each batch
        sealed first, then one transaction and one ``executemany``. A batch that fails rolls back
        alone; earlier batches stay committed. Returns the rows' primary keys in order (the UUIDs
        made here for rows given without one).

        Sealing is not overlapped with the insert in a thread: tried, it was slower (9.5k against
        11.7k rows/s with two blind indexes, bench machine): each short token call releases the
        GIL and then waits for the inserting thread to give it back."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise errors.ConfigurationError("batch must be at least 1")
        ids: list[Any] = []
        writer = self._writer().insert()
        source = iter(rows)
        while chunk := list(itertools.islice(source, batch)):
            params = self._encode(chunk, marked=False)  # sealed before the transaction opens
            with engine.begin() as conn:
                conn.execution_options(compiled_cache=None).execute(writer, params)
            ids.extend(p[self.pk] for p in params)
        return ids

    def _writer(self) -> sa.Table:
        """The table as :meth:`insert_many` writes it: a copy whose encrypted and blind-index
        columns, every one of which :meth:`_encode` fills itself in every row, take plain
        ``bytes`` without a check (:class:`_CodecBytes`); every other column as declared. The
        checks of :class:`EncryptedBytes` and :class:`BlindIndexTerm` stop plaintext a caller
        hands them; here no value of those columns comes from the caller. And their marker
        objects (:class:`Sealed`, :class:`~keymgr.fields.index.Term`) are ones the garbage
        collector tracks: five a row, alive for a whole batch, they made its full collections of
        a large heap come six times as often, 4 µs a row of a 15 µs encode (bench/fields.py).
        Made for each :meth:`insert_many` call from the table as declared then (a column
        appended, replaced or retyped since, a type changed in place, a new default: as
        declared), and executed without the engine's compiled-statement cache (a copy per call
        would be an entry per call there; compiling costs ~0.5 ms a call)."""
        copy = self.table.to_metadata(sa.MetaData())  # each call: the table as declared now
        copy.implicit_returning = self.table.implicit_returning  # to_metadata does not copy it
        for name in self._written:
            if name not in copy.c or copy.c[name].name != name:
                raise errors.ConfigurationError(f"{self.name}.{name}: the column the codec fills was removed or "
                                                "replaced by one whose key is not its name")
            copy.c[name].type = _CodecBytes()
        return copy

    def decode(self, row: Any) -> dict[str, Any]:
        """A fetched row (``Row`` or mapping) with its encrypted columns opened."""
        data = dict(row._mapping) if hasattr(row, "_mapping") else dict(row)
        if data.get(self.pk) is None:
            raise errors.ConfigurationError(f"decode needs the row's {self.pk!r} (its values are bound to it): "
                                            "select it too")
        opened = self.cipher.decrypt_row({c: data.get(c) for c in self.encrypted if c in data}, table=self.name,
                                         row=self.row_text(data[self.pk]), extra=self.extra, text=self._text)
        data.update(opened)
        return data

    def where(self, index: str, value: Part | Sequence[Part]) -> sa.ColumnElement[bool]:
        """``column IN (terms)``: every live index version's term, so rows written before an
        index rotation are found too."""
        spec = self._spec(index)
        return self.table.c[index].in_(spec[0].terms(value, context=self._contexts[index]))

    def find(self, conn: Connection, index: str, value: Part | Sequence[Part]) -> list[dict[str, Any]]:
        """The rows whose ``index`` matches ``value``, decrypted, false positives dropped. The
        statements are built once per index (one term: ``=``; during an index rotation: ``IN``).

        A candidate that fails authentication under this codec's context is not this context's
        row (another tenant's row sharing the term's bucket) and is dropped, not an error for the
        whole lookup. A row tampered with in the database is dropped the same way: each drop is
        counted in :attr:`skipped` and logged (count only) on the ``keymgr.fields`` logger, and
        reading the row by its key still raises the integrity error."""
        spec, source = self._spec(index)
        if value is None:
            raise errors.ConfigurationError("find() needs a value (to find NULLs, query IS NULL)")
        terms = spec.terms(value, context=self._contexts[index])
        if len(terms) == 1:
            result = conn.execute(self._lookup(index, False), {"term": terms[0]})
        else:
            result = conn.execute(self._lookup(index, True), {"terms": terms})
        sources = frozenset([source] if isinstance(source, str) else source)
        wanted = spec.normalised(value)  # once, not once per candidate
        candidates = [dict(row._mapping) for row in result]
        opened, dropped = self.cipher.open_candidates(
            [({c: d.get(c) for c in self.encrypted if c in d}, self.row_text(d[self.pk])) for d in candidates],
            probe=sources, accept=lambda probe: self._same(spec, source, probe, wanted),
            table=self.name, extra=self.extra, text=self._text)
        if dropped:
            self.skipped += dropped
            _log.warning("%s: %d lookup candidate(s) on %s failed authentication in this context and were "
                         "dropped (another context's rows, or tampered)", self.name, dropped, index)
        found = []
        for i, plain in opened:
            candidates[i].update(plain)
            found.append(candidates[i])
        return found

    def _lookup(self, index: str, many: bool) -> sa.Select[Any]:
        statement = self._statements.get((index, many))
        if statement is None:
            column = self.table.c[index]
            where = column.in_(sa.bindparam("terms", expanding=True)) if many else column == sa.bindparam("term")
            statement = self._statements[(index, many)] = sa.select(self.table).where(where)
        return statement

    @staticmethod
    def _same(spec: BlindIndex, source: str | Sequence[str], row: Mapping[str, Any],
              wanted: tuple[str | bytes, ...]) -> bool:
        """Whether a candidate's opened source is the value looked up (``wanted``, normalised)."""
        stored = _index_input(row, source)
        return stored is not None and spec.normalised(stored) == wanted


def _is_uuid(column: sa.Column[Any]) -> bool:
    if isinstance(column.type, sa.Uuid):
        return True
    try:
        return column.type.python_type is uuid.UUID
    except NotImplementedError:
        return False


def row_text(row_id: object, *, uuid_key: bool = False) -> str:
    """A row identity as bound into its values. A ``uuid.UUID``, or any value of a UUID key
    (``uuid_key``), in its canonical 36-character form whichever way the database hands it back
    (PostgreSQL ``uuid``, SQLite ``CHAR(32)`` hex); anything else as ``str``, exactly: two string
    keys that spell the same UUID differently are two rows."""
    if isinstance(row_id, uuid.UUID):
        return str(row_id)
    if uuid_key:
        try:
            return str(uuid.UUID(str(row_id)))
        except ValueError:
            raise errors.ConfigurationError("a UUID primary key holds a value that is not a UUID") from None
    return str(row_id)


def _index_input(row: Mapping[str, Any], source: str | Sequence[str]) -> Part | list[Part] | None:
    """The plaintext a blind index reads from ``row`` (None when a part is missing): text as text,
    bytes as bytes (not ``str(b"...")``)."""
    if isinstance(source, str):
        return _part(row.get(source))
    parts = [_part(row.get(s)) for s in source]
    return None if any(p is None for p in parts) else [p for p in parts if p is not None]


def _part(value: Any) -> Part | None:
    if value is None or isinstance(value, (str, bytes)):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return str(value)
