"""Django model fields: values sealed to their row, blind-index columns, lookups (needs Django).

::

    class Customer(models.Model):
        id = models.UUIDField(primary_key=True, default=uuid.uuid4)   # client-generated: known before the insert
        email = EncryptedTextField(cipher="customers", null=True)
        card = EncryptedTextField(cipher="customers")
        email_bidx = BlindIndexField(source="email", index="customers-email")   # a database index on the term
        objects = EncryptedManager()

    store = DjangoKeyStore(); store.create()                      # the data-key table, beside the model's
    register(ciphers={"customers": km.fields("customers", store=store)},
             indexes={"customers-email": km.blind_index("customers-email", bits=15, normalise=unicode_fold)})
    Customer.objects.create(email="alice@example.com", card="6222 0212 3456 1234")
    Customer.objects.find(email="Alice@Example.com")             # every live index version; false positives dropped

Django hands ``get_db_prep_value`` no row, so a value is sealed in :meth:`EncryptedField.pre_save`,
which gets the instance (for ``save()`` and ``bulk_create()`` alike), bound to (``db_table``,
column, primary key as text; the key of the table that holds the column, for a multi-table
child the parent's): the same place :class:`keymgr.fields.sql.EncryptedTable` binds, so either
side reads the other's rows. The primary key must exist before the insert (a
``UUIDField(default=uuid.uuid4)``); a missing one is a :class:`~keymgr.errors.ConfigurationError`.
``from_db_value`` has no instance either: a value read from the database stays sealed in the
instance, remembers the row it was read for (``post_init``, for proxies and subclasses too), and
opens on first attribute access (a descriptor; a deferred value is loaded sealed;
:func:`aopen` opens them off an event loop). An UPDATE of that row, to the database alias it was
read from, leaves an unchanged value's column, and its blind index's, to what the database holds
(``F(column)``: a re-encryption pass may have replaced the value read, and deleted its data key);
an INSERT, or a save to another alias (a copy between databases, a read replica), seals every
value again, and one copied to another primary key is opened under its old row and sealed under
the new one. A changed source saved without its blind-index column (``update_fields``, or the
loaded fields Django saves after ``only()``), or upserted without it, is refused, checked in the
fields' own ``pre_save`` after every ``pre_save`` receiver: the term would go stale. Only an
instance ``Model.from_db`` makes binds its values to its row and alias (keymgr wraps the model's
``from_db``): a ``values()`` value, bound to no row, is refused when given to an instance;
``refresh_from_db()`` (wrapped too) keeps values as read.

Nothing but what :meth:`EncryptedField.pre_save` returned (a sealed value, its NULL, a term
:class:`BlindIndexField` computed) is written to a sealed or term column, besides ``F()`` of the
column itself: ``QuerySet.update()`` and ``bulk_update()`` (which bypass ``pre_save``) of these
columns are a ConfigurationError, NULL and another row's term included (values change through
``save()``); plaintext given to ``filter()`` and any expression compared with the column, on
either side (``Value(...)``, ``Lower(...)``, another column), is refused too, never a cleartext
write or query parameter, and so is any lookup but ``exact``, ``in`` and ``isnull`` with keymgr's
own values (``icontains``, ``gt``...), any function of the column in a query (``Cast``,
``Substr``: their output field's lookups take plaintext; ``Count`` passes) and a subquery that
selects the column as its value. ``bulk_create(update_conflicts=True)`` upserts sealed
columns only on the primary key, the row they were sealed to.
Ciphers and indexes are registered by name (:func:`register`), so fields deconstruct into
migrations as plain strings and the KeyManager can be opened after the models are imported.
"""

from __future__ import annotations

import contextvars
import functools
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from asgiref.sync import sync_to_async
from django.core.exceptions import FieldError, SynchronousOnlyOperation
from django.db import models
from django.db.models import Count
from django.db.models.constants import OnConflict
from django.db.models.expressions import Col
from django.db.models.lookups import Lookup
from django.db.models.query import ModelIterable
from django.db.models.query_utils import DeferredAttribute
from django.db.models.signals import class_prepared, post_init, pre_save
from django.db.models.sql import Query
from django.db.models.sql.where import WhereNode

from keymgr import errors
from keymgr.fields._django_store import DjangoKeyStore
from keymgr.fields._format import FIELD_INTEGRITY, Place
from keymgr.fields.cipher import FieldCipher
from keymgr.fields.index import BlindIndex, Term, index_context

__all__ = ["BlindIndexField", "DjangoKeyStore", "EncryptedBinaryField", "EncryptedField", "EncryptedManager",
           "EncryptedQuerySet", "EncryptedTextField", "Stored", "aopen", "register"]

_lock = threading.Lock()
_ciphers: dict[str, FieldCipher] = {}
_indexes: dict[str, BlindIndex] = {}


def register(*, ciphers: Mapping[str, FieldCipher] | None = None, indexes: Mapping[str, BlindIndex] | None = None
             ) -> None:
    """Name the :class:`FieldCipher` and :class:`BlindIndex` objects the fields use (``cipher="..."``,
    ``index="..."``); a name registered again is replaced (a new KeyManager after a restart)."""
    for name, cipher in (ciphers or {}).items():
        if not isinstance(cipher, FieldCipher):
            raise errors.ConfigurationError(f"cipher {name!r} is a FieldCipher (km.fields(...)), "
                                            f"not {type(cipher).__name__}")
    for name, index in (indexes or {}).items():
        if not isinstance(index, BlindIndex):
            raise errors.ConfigurationError(f"index {name!r} is a BlindIndex (km.blind_index(...)), "
                                            f"not {type(index).__name__}")
    with _lock:
        _ciphers.update(ciphers or {})
        _indexes.update(indexes or {})


def _registered(kind: str, table: Mapping[str, Any], name: str) -> Any:
    with _lock:
        found = table.get(name)
    if found is None:
        raise errors.ConfigurationError(f"no {kind} registered as {name!r}: call "
                                        f"keymgr.fields.django.register({kind}s={{{name!r}: ...}}) first")
    return found


class Stored:
    """A value as read from an encrypted column: sealed, with the row it was read for (bound when
    the instance is made), and its plaintext once opened. ``values()`` and ``values_list()``
    return these, never plaintext."""

    __slots__ = ("sealed", "row", "db", "plain")

    def __init__(self, sealed: bytes, row: str | None = None, db: str | None = None) -> None:
        self.sealed = sealed
        self.row = row
        self.db = db  # the database alias it was read from: unchanged only when written back there
        self.plain: str | bytes | None = None

    def __repr__(self) -> str:
        return f"Stored({len(self.sealed)} bytes)"

    def __getstate__(self) -> tuple[bytes, str | None, str | None]:  # a pickled instance carries no plaintext
        return self.sealed, self.row, self.db

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.sealed, self.row = state[0], state[1]
        self.db = state[2] if len(state) > 2 else None  # pickled before the alias was kept: re-sealed at a save
        self.plain = None


class _Sealed(bytes):
    """What :meth:`EncryptedField.pre_save` returns: the only kind of value the column takes."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Sealed({len(self)} bytes)"


class _SavedTerm(Term):
    """What :meth:`BlindIndexField.pre_save` returns (the instance keeps a plain :class:`Term`):
    the only term a write takes, so a term read from another row cannot be written to this one."""

    __slots__ = ()


class _SavedNull:
    """What ``pre_save`` returns for NULL: a write of NULL that ``save()`` computed, told apart
    from ``update(email=None)``, which would leave a source and its blind index out of step."""

    def __repr__(self) -> str:
        return "SavedNull"


_NULL = _SavedNull()


def _refused(field: models.Field, what: str) -> errors.ConfigurationError:
    return errors.ConfigurationError(
        f"{field.model.__name__}.{field.name} is {what}: it takes only what save() / bulk_create() compute "
        "(filter(), update() and bulk_update() bypass that, and so does an expression such as Value()); "
        "refusing to write or compare it in the clear (find by value through a BlindIndexField and .find())")


def _own_column(field: models.Field, value: Any) -> bool:
    """``value`` (a resolved expression) is the column itself, ``F(field)``: what :meth:`pre_save`
    returns to keep what the database holds. Any other expression (``Value``, ``Lower(...)``, another
    column) could carry plaintext into the column or a query parameter."""
    return isinstance(value, Col) and value.target is field


#: The lookups a sealed or term column answers: IS NULL, and equality with values keymgr computed
#: (``find()``'s terms); ``contains``, ``startswith``, ``gt``... would send plaintext as a query
#: parameter (to be compared with ciphertext, and written to the database's logs).
_LOOKUPS = frozenset({"exact", "in", "isnull"})


class _ExpressionGuard:
    """Mixed into the lookups of :data:`_LOOKUPS`: an expression on the right-hand side
    (``filter(email=Value(...))``, ``email__in=[Value(...)]``, ``Lower(Value(...))``) is compiled
    by Django with its own output field, never through the column's checks, so any but the column
    itself is refused before a parameter is built."""

    lhs: Any
    rhs: Any

    def get_prep_lookup(self) -> Any:
        field = self.lhs.output_field
        items = self.rhs if isinstance(self.rhs, list | tuple | set | frozenset) else (self.rhs,)
        if any(hasattr(item, "resolve_expression") and not _own_column(field, item) for item in items):
            raise _refused(field, field.what)
        return super().get_prep_lookup()  # type: ignore[misc]


@functools.cache
def _guarded(lookup: type) -> type:
    return type(f"Sealed{lookup.__name__}", (_ExpressionGuard, lookup), {})


class _SealedCol(Col):  # type: ignore[misc]
    """A sealed or term column in a query. Django picks a comparison's lookup by its left-hand
    side, so ``Exact(Value(plain), F("email"))`` or ``annotate(v=Value(plain)).filter(v=F("email"))``
    never reaches the column's lookups (:class:`_ExpressionGuard`): the first time the column
    is compiled into a query, that query's comparisons are checked (:func:`_check_comparisons`)."""

    def as_sql(self, compiler: Any, connection: Any) -> Any:
        _check_comparisons(compiler)
        return super().as_sql(compiler, connection)


def _selected(query: Query) -> list[Any]:
    """What ``query``, used as a subquery, yields: its selected columns and annotations (none for
    a query of the model's default columns, which cannot stand for one value)."""
    if query.default_cols:
        return []
    return [*query.select, *query.annotation_select.values()]


def _sources(node: Any) -> list[Any]:
    if isinstance(node, Query):
        return _selected(node)
    return list(node.get_source_expressions()) if hasattr(node, "get_source_expressions") else []


def _marked_in(expression: Any) -> models.Field | None:
    """The sealed or term column ``expression`` compares (the column, inside a function, or the
    value a subquery selects)."""
    stack = [expression]
    while stack:
        node = stack.pop()
        if isinstance(node, Col) and isinstance(node.target, _MarkedColumn):
            return node.target
        stack.extend(_sources(node))
    return None


def _marked_value(node: Any) -> models.Field | None:
    """The sealed or term column whose value ``node`` yields, itself or passed through (a
    ``Case``, a ``Ref`` to an annotation, a function's argument, a subquery's one column); a
    condition (a lookup, a WHERE) yields a boolean, checked as a comparison of its own."""
    if isinstance(node, Col):
        return node.target if isinstance(node.target, _MarkedColumn) else None
    if isinstance(node, Lookup | WhereNode):
        return None
    sources = _sources(node)
    if isinstance(node, Query) and len(sources) != 1:
        return None
    for source in sources:
        field = _marked_value(source)
        if field is not None:
            return field
    return None


def _output_field(node: Any) -> Any:
    try:
        return node._output_field_or_none
    except (AttributeError, FieldError):  # sources of mixed types: not a sealed column's value
        return None


def _check_function(node: Any) -> None:
    """Refuse a function (``Cast``, ``Substr``, ``ExpressionWrapper``, arithmetic, ``Max``...) of
    a sealed or term column, whatever it is used for: its output field is another field's (a
    text field), whose lookups send their value, a plaintext, as a query parameter. No function
    of these opaque bytes means anything; ``Count`` (no value) and an expression that stays the
    column's value (``Case``/``When``, ``Coalesce`` of the column: the column's own lookups) pass."""
    if isinstance(node, Col | Lookup | WhereNode | Query | Count):
        return
    if isinstance(_output_field(node), _MarkedColumn):
        return
    for source in _sources(node):
        field = _marked_value(source)
        if field is not None:
            raise errors.ConfigurationError(
                f"{field.model.__name__}.{field.name} is {field.what}: refusing {type(node).__name__}() of it "
                "(its result would be compared or written in the clear; no function of sealed bytes means anything)")


def _check_comparisons(compiler: Any) -> None:
    """Refuse, in the query's WHERE / HAVING and annotations: a comparison of two expressions
    (``Exact(Value(p), F(email))``, ``Case(When(...))``) that holds a sealed or term column on
    either side, unless it is one of the column's own lookups (:class:`_ExpressionGuard` checked
    it) or compares the column with itself; any function of such a column
    (:func:`_check_function`); and, for a query compiled as a subquery, selecting such a column as
    its one value (whatever compares it is another query's, never checked by the column). The
    other side may be plaintext (``Value(...)``), sent as a query parameter. A comparison with a
    direct value goes through the column's ``get_db_prep_value`` (refused unless keymgr computed
    it). Once per compiler."""
    if getattr(compiler, "_keymgr_compared", False):
        return
    compiler._keymgr_compared = True
    query = compiler.query
    selected = _selected(query) if getattr(query, "subquery", False) else []
    if len(selected) == 1:
        field = _marked_value(selected[0])
        if field is not None:
            raise _refused(field, f"{field.what}, selected by a subquery")
    stack = [getattr(query, "where", None), *getattr(query, "annotations", {}).values()]
    while stack:
        node = stack.pop()
        if node is None or not hasattr(node, "get_source_expressions"):
            continue
        if isinstance(node, Lookup) and not isinstance(node, _ExpressionGuard) and not node.rhs_is_direct_value():
            field = _marked_in(node.rhs) or _marked_in(node.lhs)
            if field is not None and not (_own_column(field, node.lhs) and _own_column(field, node.rhs)):
                raise _refused(field, field.what)
        _check_function(node)
        stack.extend(node.get_source_expressions())


class _MarkedColumn(models.Field):  # type: ignore[misc]
    """A binary column that takes only values of one marker type (what keymgr computed: a
    plaintext is refused, never written or sent as a query parameter) or ``F()`` of itself,
    reads back as ``read``, and answers only the lookups of :data:`_LOOKUPS` (refused by name,
    before any parameter is built)."""

    marker: type[bytes] = bytes
    saved: type[bytes] = bytes
    read: Callable[[bytes], Any] = bytes
    what = ""

    def get_internal_type(self) -> str:
        return "BinaryField"  # bytea, BLOB

    def get_col(self, alias: str, output_field: models.Field | None = None) -> Col:
        """The column in a query, as a :class:`_SealedCol` (which checks the query's comparisons)."""
        if output_field is None or output_field is self:
            if alias == self.model._meta.db_table:
                return self.cached_col
            output_field = self
        return _SealedCol(alias, self, output_field)

    @functools.cached_property
    def cached_col(self) -> Col:
        return _SealedCol(self.model._meta.db_table, self)

    def get_prep_value(self, value: Any) -> Any:
        return value

    def get_db_prep_value(self, value: Any, connection: Any, prepared: bool = False) -> bytes | None:
        if value is None:
            return None
        if not isinstance(value, self.marker):
            raise _refused(self, self.what)
        return bytes(value)

    def get_db_prep_save(self, value: Any, connection: Any) -> Any:
        """A write takes only what ``pre_save`` returned: a value it sealed (or a term it
        computed), its NULL, or ``F()`` of the column itself. Anything else comes from
        ``QuerySet.update()`` (or ``bulk_update``'s ``Case``), which bypasses ``pre_save``: a NULL,
        a term read from another row or an expression (``Value(...)``) would leave a source and
        its blind index out of step, or write plaintext. Values change through ``save()``."""
        if hasattr(value, "as_sql"):
            if _own_column(self, value):
                return value
            raise _refused(self, self.what)
        if value is _NULL:
            return None
        if not isinstance(value, self.saved):
            raise _refused(self, self.what)
        return bytes(value)

    def get_placeholder(self, value: Any, compiler: Any, connection: Any) -> str:
        """Every INSERT and UPDATE of the column passes here, whichever manager or queryset made
        it (a model's default ``Manager``, ``_base_manager``): an upsert is checked here too."""
        query = compiler.query
        if getattr(query, "on_conflict", None) == OnConflict.UPDATE:
            _check_upsert(query.model, query.update_fields, query.unique_fields)
        return "%s"

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, bytes | bytearray | memoryview):  # SQLite: text or a number in a BLOB column
            raise errors.IntegrityError(f"{self.model.__name__}.{self.name}: the database holds a "
                                        f"{type(value).__name__} there, not bytes: {FIELD_INTEGRITY}")
        return self.read(bytes(value))

    def get_lookup(self, lookup_name: str) -> Any:
        if lookup_name not in _LOOKUPS:
            raise errors.ConfigurationError(f"{self.model.__name__}.{self.name} is sealed: no {lookup_name!r} lookup "
                                            "(only isnull; find() for equality through a BlindIndexField)")
        return _guarded(super().get_lookup(lookup_name))

    def get_transform(self, lookup_name: str) -> Any:
        raise errors.ConfigurationError(f"{self.model.__name__}.{self.name} is sealed: no {lookup_name!r} transform")


def _row_or_none(instance: models.Model, model: type[models.Model]) -> str | None:
    """The row identity in ``model``'s table (the model that declares the field: a multi-table
    child's parent, whose key exists before the child's link does), or None while it has none."""
    pk_field = model._meta.pk
    pk = getattr(instance, pk_field.attname, None)
    return None if pk is None else str(pk_field.to_python(pk))


def _row(instance: models.Model, model: type[models.Model]) -> str:
    """The row identity a value is bound to: the primary key of the field's own table, normalised
    by its field (a UUID given as a string is bound in canonical form, as it will read back)."""
    row = _row_or_none(instance, model)
    if row is None:
        raise errors.ConfigurationError(
            f"{type(instance).__name__} has no primary key yet: its encrypted fields are bound to it, so it must "
            "exist before the insert (a client-generated key: UUIDField(primary_key=True, default=uuid.uuid4))")
    return row


class _PlaintextAttribute(DeferredAttribute):  # type: ignore[misc]
    """The model attribute of an encrypted field: a value read from the database is opened on first
    access (``from_db_value`` has no instance to bind it to); assignments are kept as given. A
    deferred value is loaded sealed, as the instance's other values were (Django's own deferred
    load would copy the plaintext in, as if assigned: re-sealed at the next save)."""

    def __get__(self, instance: models.Model | None, cls: type | None = None) -> Any:
        if instance is None:
            return self
        if self.field.attname not in instance.__dict__:
            self._load(instance)
        value = instance.__dict__[self.field.attname]
        if not isinstance(value, Stored) or getattr(instance._state, _SEALED_COPY, False):
            return value
        return self.field.plaintext(instance, value)

    def __set__(self, instance: models.Model, value: Any) -> None:
        instance.__dict__[self.field.attname] = value

    def _load(self, instance: models.Model) -> None:
        manager = type(instance)._base_manager.db_manager(instance._state.db, hints={"instance": instance})
        try:
            value = manager.filter(pk=instance.pk).values_list(self.field.attname, flat=True).get()
        except SynchronousOnlyOperation:
            raise errors.ConfigurationError(
                f"{type(instance).__name__}.{self.field.name} is deferred: in async code load it with "
                "await keymgr.fields.django.aopen(instance) (or do not defer it)") from None
        if isinstance(value, Stored):
            value.row, value.db = _row(instance, self.field.model), instance._state.db
        instance.__dict__[self.field.attname] = value


class EncryptedField(_MarkedColumn):
    """A column of field-form values (``bytea`` / ``BLOB``) sealed by the registered cipher ``cipher``."""

    descriptor_class = _PlaintextAttribute
    marker = saved = _Sealed
    read = Stored
    what = "encrypted"
    text = True

    def __init__(self, *args: Any, cipher: str, **kwargs: Any) -> None:
        if not isinstance(cipher, str) or not cipher:
            raise errors.ConfigurationError("an encrypted field names its registered cipher: cipher='...'")
        self.cipher_name = cipher
        super().__init__(*args, **kwargs)

    def deconstruct(self) -> tuple[Any, ...]:
        name, path, args, kwargs = super().deconstruct()
        return name, path, args, {**kwargs, "cipher": self.cipher_name}

    def contribute_to_class(self, cls: type[models.Model], name: str, *args: Any, **kwargs: Any) -> None:
        super().contribute_to_class(cls, name, *args, **kwargs)
        _watch(cls)

    @property
    def cipher(self) -> FieldCipher:
        return _registered("cipher", _ciphers, self.cipher_name)  # type: ignore[no-any-return]

    def place(self, row: str) -> Place:
        return Place(self.model._meta.db_table, self.column, row)

    def kept(self, instance: models.Model) -> bool:
        """The instance holds the value read for this very row from the very database the save
        writes to, unchanged (or none, deferred, and saved to the database it was loaded from): an
        UPDATE leaves the column to what the database holds. A value read from another alias (a
        copy between databases, a read replica) is sealed again: ``F(column)`` would keep the
        target's own value."""
        using = _saving(instance)[0]
        value = instance.__dict__.get(self.attname, _NOT_LOADED)
        if value is _NOT_LOADED:
            return bool(using == instance._state.db)
        return (isinstance(value, Stored) and value.row is not None and value.db == using
                and value.row == _row_or_none(instance, self.model))

    def plaintext(self, instance: models.Model, value: Any) -> Any:
        """``value`` (an attribute's state) in the clear: a :class:`Stored` value is opened once."""
        if not isinstance(value, Stored):
            return value
        if value.row is None:
            raise errors.ConfigurationError(
                f"{type(instance).__name__}.{self.name} holds a value from values() / values_list(), read for no "
                "instance: it opens only as the row it was read from (get() that row), never as this one")
        if value.plain is None:
            place = self.place(value.row)
            value.plain = (self.cipher.decrypt_text(value.sealed, place) if self.text
                           else self.cipher.decrypt(value.sealed, place))
        return value.plain

    def to_seal(self, instance: models.Model) -> str | bytes | None:
        """The plaintext a save seals (a deferred value loaded first), of the field's kind."""
        plain = self.plaintext(instance, getattr(instance, self.attname))
        if plain is None:
            return None
        if self.text and not isinstance(plain, str):
            raise errors.ConfigurationError(f"{type(instance).__name__}.{self.name} is an EncryptedTextField: "
                                            f"give it str, not {type(plain).__name__}")
        if not self.text and not isinstance(plain, bytes | bytearray | memoryview):
            raise errors.ConfigurationError(f"{type(instance).__name__}.{self.name} is an "
                                            f"EncryptedBinaryField: give it bytes, not {type(plain).__name__}")
        return plain if isinstance(plain, str) else bytes(plain)

    def pre_save(self, model_instance: models.Model, add: bool) -> _Sealed | models.F | _SavedNull:
        """An UPDATE of the row a value was read for leaves the column as it is, ``F(column)``:
        the instance's copy may name a data key a re-encryption pass has since deleted (the
        database holds the re-sealed value). An INSERT, a copy to another primary key or an
        assigned value is sealed now, to this row."""
        if not add and self.kept(model_instance):
            return models.F(self.attname)
        if not add:
            _check_written_with_index(self, model_instance)
        plain = self.to_seal(model_instance)
        if plain is None:
            return _NULL
        return _Sealed(self.cipher.encrypt(plain, self.place(_row(model_instance, self.model))))

    def value_to_string(self, obj: models.Model) -> str:
        """Refused: serialising (``dumpdata``) would write the plaintext out."""
        raise errors.ConfigurationError(f"{type(obj).__name__}.{self.name} is encrypted: refusing to serialise it "
                                        "(dumpdata would write the plaintext); exclude the model")


_NOT_LOADED = object()


class EncryptedTextField(EncryptedField):
    """:class:`EncryptedField` whose plaintext is ``str`` (UTF-8 inside)."""


class EncryptedBinaryField(EncryptedField):
    """:class:`EncryptedField` whose plaintext is ``bytes``. Not editable unless asked
    (``editable=True``), as Django's ``BinaryField``: a form has no widget for bytes (a
    ``ModelForm`` of ``fields="__all__"``, the admin's default, would render it as text and send
    back ``"b'...'"``, refused at every save)."""

    text = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("editable", False)
        super().__init__(*args, **kwargs)

    def deconstruct(self) -> tuple[Any, ...]:
        name, path, args, kwargs = super().deconstruct()
        if self.editable:
            kwargs["editable"] = True
        else:
            kwargs.pop("editable", None)
        return name, path, args, kwargs

    def get_default(self) -> Any:
        default = super().get_default()
        return b"" if default == "" else default


class BlindIndexField(_MarkedColumn):
    """The blind-index term of another field's plaintext (``source``), computed in ``pre_save`` by
    the registered index ``index`` and bound to (``db_table``, this column), as
    :class:`keymgr.fields.sql.EncryptedTable` binds its terms. Nullable (a NULL source has no term),
    indexed by the database, not editable."""

    marker = Term
    saved = _SavedTerm
    read = Term
    what = "a blind-index term"

    def __init__(self, *args: Any, source: str, index: str, **kwargs: Any) -> None:
        if not isinstance(source, str) or not isinstance(index, str) or not source or not index:
            raise errors.ConfigurationError("a blind-index field names its source field and its registered index")
        self.source, self.index_name = source, index
        kwargs.setdefault("db_index", True)
        kwargs.update(null=True, editable=False)
        super().__init__(*args, **kwargs)

    def deconstruct(self) -> tuple[Any, ...]:
        name, path, args, kwargs = super().deconstruct()
        kwargs.pop("null", None)
        kwargs.pop("editable", None)
        return name, path, args, {**kwargs, "source": self.source, "index": self.index_name}

    def contribute_to_class(self, cls: type[models.Model], name: str, *args: Any, **kwargs: Any) -> None:
        super().contribute_to_class(cls, name, *args, **kwargs)
        _watch(cls)

    @property
    def index(self) -> BlindIndex:
        return _registered("index", _indexes, self.index_name)  # type: ignore[no-any-return]

    @property
    def context(self) -> bytes:
        return index_context(self.model._meta.db_table, self.column)

    def source_field(self) -> EncryptedField:
        field = self.model._meta.get_field(self.source)
        if not isinstance(field, EncryptedField):
            raise errors.ConfigurationError(f"{self.model.__name__}.{self.name} indexes {self.source!r}, "
                                            "which is not an encrypted field")
        return field

    def pre_save(self, model_instance: models.Model, add: bool) -> _SavedTerm | models.F | _SavedNull:
        """The term of the source's plaintext. While the source is the value read for this row
        (or deferred, never loaded) an UPDATE leaves the term column as the database holds it
        (no decryption, no HMAC; a deferred source never NULLs it); otherwise the term is
        computed again, with the newest index version."""
        source = self.source_field()
        if not add and source.kept(model_instance):
            return models.F(self.attname)
        update_fields = _saving(model_instance)[1]
        if not add and update_fields is not None and not {source.name, source.attname} & update_fields:
            raise _stale_term(type(model_instance), source, self)
        plain = source.to_seal(model_instance)
        if plain is None:
            model_instance.__dict__[self.attname] = None
            return _NULL
        term = self.index.term(plain, context=self.context)
        model_instance.__dict__[self.attname] = Term(term)
        return _SavedTerm(term)


_MarkedFields = tuple[tuple[EncryptedField, ...], tuple[BlindIndexField, ...]]
_marked: dict[type[models.Model], _MarkedFields] = {}


def _marked_fields(model: type[models.Model]) -> _MarkedFields:
    """A model's encrypted and blind-index fields (its parents' too), found once per model: the
    receivers below run for every instance made and every save."""
    found = _marked.get(model)
    if found is None:
        fields = model._meta.concrete_fields
        found = _marked.setdefault(model, (tuple(f for f in fields if isinstance(f, EncryptedField)),
                                           tuple(f for f in fields if isinstance(f, BlindIndexField))))
    return found


#: The database alias ``Model.from_db`` reads from, set while it makes an instance of a row just
#: read: only then does ``post_init`` bind the instance's :class:`Stored` values to its primary key
#: and alias (a value from ``values()`` given to ``Model(...)`` was read for some other row, or none).
_from_database: contextvars.ContextVar[str | None] = contextvars.ContextVar("keymgr_django_from_database",
                                                                         default=None)

#: The ``_state`` attribute that holds the save in progress, (alias written, ``update_fields``),
#: set by :func:`_note_save` (a ``pre_save`` receiver) for the fields' own ``pre_save``.
_SAVING = "keymgr_saving"

#: The ``_state`` attribute of an instance made only to be copied by ``refresh_from_db()``: its
#: encrypted attributes hand over their :class:`Stored` values, not plaintext.
_SEALED_COPY = "keymgr_sealed_copy"


def _bind_loaded(sender: type[models.Model], instance: models.Model, **kwargs: Any) -> None:
    """A value just read from the database is bound to the row it was read for, before the
    application (or another ``post_init`` receiver) can change the primary key. Only the
    instance ``from_db`` makes is bound: a :class:`Stored` given to ``Model(...)`` keeps its row
    (``None`` from ``values()``), so it is never taken for this row's unchanged value."""
    db = _from_database.get()
    if db is None:
        return
    _from_database.set(None)  # this instance only, not one a later receiver makes
    for field in _marked_fields(sender)[0]:
        value = instance.__dict__.get(field.attname)
        if isinstance(value, Stored) and value.row is None:
            value.row, value.db = _row_or_none(instance, field.model), db


def _note_save(sender: type[models.Model], instance: models.Model, using: str | None = None,
               update_fields: frozenset[str] | None = None, **kwargs: Any) -> None:
    """Note the save in progress for the fields' ``pre_save`` (which Django gives no alias and no
    ``update_fields``): the alias written (a value is unchanged only if read from it) and the
    fields written (``update_fields``, also the loaded fields Django saves after ``only()``).
    Nothing is checked here: a ``pre_save`` receiver connected later may still change a value."""
    setattr(instance._state, _SAVING, (using, update_fields))


def _saving(instance: models.Model) -> tuple[str | None, frozenset[str] | None]:
    """(alias, update_fields) of the save in progress; outside one, the instance's own alias."""
    saving: tuple[str | None, frozenset[str] | None] | None = getattr(instance._state, _SAVING, None)
    return saving if saving is not None else (instance._state.db, None)


def _stale_term(model: type[models.Model], source: EncryptedField, index: BlindIndexField) -> errors.ConfigurationError:
    return errors.ConfigurationError(
        f"{model.__name__}.{source.name} changed: it is saved only with its blind index {index.name} "
        f"(update_fields=[..., {source.name!r}, {index.name!r}]; after only()/defer(), load both)")


def _check_written_with_index(source: EncryptedField, instance: models.Model) -> None:
    """A changed source written without its blind index would leave a stale term (the row found
    neither by its new value nor by its old one). Checked in the source's own ``pre_save``, when
    the value is final (after every ``pre_save`` receiver), before anything is written; Django
    gives a field no way to add a column to ``update_fields``, so the save is refused."""
    update_fields = _saving(instance)[1]
    if update_fields is None:
        return
    for index in _marked_fields(type(instance))[1]:
        if index.source_field() is source and not {index.name, index.attname} & update_fields:
            raise _stale_term(type(instance), source, index)


class _SealedCopies(ModelIterable):  # type: ignore[misc]
    """The instances ``refresh_from_db()`` reads, marked as copies whose encrypted attributes
    hand over their :class:`Stored` values (after ``post_init``: receivers see them as usual)."""

    def __iter__(self) -> Any:
        for instance in super().__iter__():
            setattr(instance._state, _SEALED_COPY, True)
            yield instance


def _refreshed_sealed(refresh: Callable[..., None]) -> Callable[..., None]:
    """``Model.refresh_from_db`` that keeps encrypted values as read: Django copies each field with
    ``getattr`` from a fresh instance, which would copy the plaintext in, as if assigned (opened
    once per field, and sealed again at the next save instead of ``F(column)``: with a data key a
    re-encryption pass may have deleted). The fresh instance hands over its :class:`Stored`
    values, bound to this very row, unopened."""

    @functools.wraps(refresh)
    def refresh_from_db(self: models.Model, using: str | None = None, fields: Iterable[str] | None = None,
                        from_queryset: models.QuerySet | None = None) -> None:
        if from_queryset is None:
            from_queryset = type(self)._base_manager.db_manager(using, hints={"instance": self}).all()
        else:
            from_queryset = from_queryset.all()
        if issubclass(from_queryset._iterable_class, ModelIterable):
            from_queryset._iterable_class = _sealed_copies(from_queryset._iterable_class)
        refresh(self, using=using, fields=fields, from_queryset=from_queryset)

    refresh_from_db._keymgr_sealed = True  # type: ignore[attr-defined]
    return refresh_from_db


@functools.cache
def _sealed_copies(iterable: type[ModelIterable]) -> type[ModelIterable]:
    return iterable if issubclass(iterable, _SealedCopies) else type(f"SealedCopies{iterable.__name__}",
                                                                       (_SealedCopies, iterable), {})


def _bound_from_db(from_db: Callable[..., models.Model]) -> Callable[..., models.Model]:
    """``Model.from_db`` (every instance made of a row read: querysets, ``get``, ``raw``,
    ``select_related``, prefetches) with :func:`_bind_loaded` told that this instance is one."""

    @functools.wraps(from_db)
    def bound(cls: type[models.Model], db: str, field_names: Any, values: Any) -> models.Model:
        token = _from_database.set(db)
        try:
            return from_db(cls, db, field_names, values)
        finally:
            _from_database.reset(token)

    bound._keymgr_sealed = True  # type: ignore[attr-defined]
    return bound


def _wrap_model_methods(model: type[models.Model]) -> None:
    """Install :func:`_bound_from_db` and :func:`_refreshed_sealed` on the model that declares a
    sealed column (its subclasses inherit them; an override that calls ``super()`` keeps them)."""
    from_db = model.from_db.__func__
    if not getattr(from_db, "_keymgr_sealed", False):
        model.from_db = classmethod(_bound_from_db(from_db))
    if not getattr(model.refresh_from_db, "_keymgr_sealed", False):
        model.refresh_from_db = _refreshed_sealed(model.refresh_from_db)


def _watch(model: type[models.Model]) -> None:
    """Connect the receivers of a model with sealed or term columns (and, through
    :func:`_watch_subclass`, of its proxies and multi-table children: Django sends their
    signals with the subclass as sender)."""
    _wrap_model_methods(model)
    post_init.connect(_bind_loaded, sender=model, weak=False)
    pre_save.connect(_note_save, sender=model, weak=False)


def _watch_subclass(sender: type[models.Model], **kwargs: Any) -> None:
    for base in sender.__mro__[1:]:
        meta = getattr(base, "_meta", None)
        if meta is not None and any(isinstance(f, _MarkedColumn) for f in meta.local_fields):
            _watch(sender)
            return


class_prepared.connect(_watch_subclass, weak=False)


def _check_upsert(model: type[models.Model], update_fields: Sequence[models.Field],
                  unique_fields: Sequence[models.Field]) -> None:
    """An upsert that overwrites sealed or term columns must conflict on the primary key: the
    values were sealed to the primary key of the object given, so a conflict on another unique
    column (a login) would write them into a row with another key, where they never open. (MySQL
    takes no conflict target: any unique key may conflict, so it is refused there.) And, as for a
    save, a source is overwritten with its blind index or not at all: the existing row's term
    would otherwise stay that of its old value (or a new term point at the old value)."""
    sealed = [f.name for f in update_fields if isinstance(f, _MarkedColumn)]
    if sealed and [f.column for f in unique_fields] != [model._meta.pk.column]:
        raise errors.ConfigurationError(
            f"{model.__name__}: bulk_create(update_conflicts=True) updates {', '.join(sealed)}, sealed to the primary "
            f"key of each object: it upserts only on the primary key (unique_fields=[{model._meta.pk.name!r}]), "
            "not on another unique column, whose existing row has another key")
    columns = {f.column for f in update_fields}
    for index in _marked_fields(model)[1]:
        source = index.source_field()
        if (source.column in columns) != (index.column in columns):
            raise errors.ConfigurationError(
                f"{model.__name__}: bulk_create(update_conflicts=True) would update {source.name} or its blind index "
                f"{index.name} without the other, leaving a stale term: name both in update_fields, or neither")


def _fields(model: type[models.Model], names: Sequence[str] | None) -> list[models.Field]:
    meta = model._meta
    return [meta.pk if name == "pk" else meta.get_field(name) for name in names or ()]


class EncryptedQuerySet(models.QuerySet):  # type: ignore[misc]
    """A QuerySet with :meth:`find` (lookups by blind index) and a :meth:`bulk_create` whose
    upsert conflicts only on the primary key."""

    def bulk_create(self, objs: Iterable[models.Model], batch_size: int | None = None, ignore_conflicts: bool = False,
                    update_conflicts: bool = False, update_fields: Sequence[str] | None = None,
                    unique_fields: Sequence[str] | None = None) -> list[models.Model]:
        if update_conflicts:  # before anything is sealed (the column checks every INSERT again)
            _check_upsert(self.model, _fields(self.model, update_fields), _fields(self.model, unique_fields))
        return super().bulk_create(objs, batch_size=batch_size, ignore_conflicts=ignore_conflicts,  # type: ignore[no-any-return]
                                   update_conflicts=update_conflicts, update_fields=update_fields,
                                   unique_fields=unique_fields)

    def update_or_create(self, defaults: Mapping[str, Any] | None = None,
                         create_defaults: Mapping[str, Any] | None = None, **kwargs: Any) -> tuple[models.Model, bool]:
        """Django saves an update with ``update_fields`` = the defaults plus the model's *local*
        fields that have a ``pre_save``: a multi-table child's parent's blind index is not among
        them, so a changed source on the parent's table would be refused. The blind index of every
        source in ``defaults`` is named too (its value is computed by ``pre_save`` from the source,
        whatever the attribute held); the values a new row is created with are the defaults given."""
        if defaults:
            indexes = {index.name: None for index in _marked_fields(self.model)[1]
                       if {index.source, index.source_field().attname} & set(defaults)}
            if create_defaults is None:
                create_defaults = defaults
            defaults = {**indexes, **defaults}
        return super().update_or_create(defaults, create_defaults, **kwargs)  # type: ignore[no-any-return]

    def bulk_update(self, objs: Iterable[models.Model], fields: Sequence[str], batch_size: int | None = None) -> int:
        """Refused for sealed and term columns before any value is opened: Django writes each
        object's attribute (the plaintext) through an expression, bypassing ``pre_save``. (The
        column refuses it anyway; this says so before the work.)"""
        for name in fields:
            field = self.model._meta.get_field(name)
            if isinstance(field, _MarkedColumn):
                raise _refused(field, field.what)
        return super().bulk_update(objs, fields, batch_size=batch_size)  # type: ignore[no-any-return]

    def find(self, **match: Any) -> list[models.Model]:
        """The rows whose ``field`` equals ``value`` (``find(email="...")``, the source field or the
        index field's name): the database is asked for the terms of every live index version
        (``IN``, so rows written before an index rotation are found), each candidate's source is
        decrypted and the false positives of truncation dropped. A candidate that fails
        authentication raises :class:`~keymgr.errors.IntegrityError` (a row tampered with)."""
        if len(match) != 1:
            raise errors.ConfigurationError("find() takes one field=value")
        if not issubclass(self._iterable_class, ModelIterable):
            raise errors.ConfigurationError("find() returns model instances: call it before values() / values_list()")
        ((name, value),) = match.items()
        field = self._index_field(name)
        index = field.index
        if value is None:
            raise errors.ConfigurationError("find() needs a value (to find NULLs, filter(field__isnull=True))")
        terms = index.terms(value, context=field.context)
        source = field.source_field()
        wanted = index.normalised(value)
        found = []
        for candidate in self.filter(**{f"{field.attname}__in": terms}):
            plain = getattr(candidate, source.attname)
            if plain is not None and index.normalised(plain if isinstance(plain, str) else bytes(plain)) == wanted:
                found.append(candidate)
        return found

    def _index_field(self, name: str) -> BlindIndexField:
        for field in self.model._meta.concrete_fields:
            if isinstance(field, BlindIndexField) and name in (field.name, field.source):
                return field
        raise errors.ConfigurationError(f"{self.model.__name__} has no blind index on {name!r}")


EncryptedManager = models.Manager.from_queryset(EncryptedQuerySet)


async def aopen(instance: models.Model) -> None:
    """Open every encrypted value of ``instance`` off the event loop (``sync_to_async``): its data
    keys are loaded from the key store and unwrapped, and a deferred value is loaded (one query
    each), in Django's thread for synchronous code; the attributes then read without I/O. Without
    it, an attribute read in async code works too, but a data key not cached yet is loaded and
    unwrapped while the event loop waits, and a deferred value is refused."""
    await sync_to_async(_open_all, thread_sensitive=True)(instance)


def _open_all(instance: models.Model) -> None:
    for field in _marked_fields(type(instance))[0]:
        getattr(instance, field.attname)
