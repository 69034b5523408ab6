"""The two columns keymgr writes, and what a write of them takes.

A sealed column (:class:`SealedColumn`: an encrypted field's) and a term column
(:class:`TermColumn`: a blind index's) take only what the fields' ``pre_save`` returned, or
``F()`` of the column itself (:meth:`MarkedColumn.get_db_prep_save`), and read back as
:class:`Stored` or :class:`Term`. An upsert that overwrites them must conflict on the primary key
and write a source with its blind index (:func:`check_upsert`). What a query may do with them is
:class:`keymgr.fields.django._queries.QueriedColumn`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from django.db import models
from django.db.models.constants import OnConflict

from keymgr import errors
from keymgr.fields._format import FIELD_INTEGRITY
from keymgr.fields.django._queries import QueriedColumn, own_column, refused
from keymgr.fields.django._values import NULL, SavedTerm, Sealed, Stored
from keymgr.fields.index import Term


class MarkedColumn(QueriedColumn):
    """A binary column that takes only values of one marker type (what keymgr computed: a
    plaintext is refused, never written or sent as a query parameter) or ``F()`` of itself,
    reads back as ``read``, and answers only the lookups :class:`QueriedColumn` allows."""

    saved: type[bytes] = bytes
    read: Callable[[bytes], Any] = bytes

    def get_internal_type(self) -> str:
        return "BinaryField"  # bytea, BLOB

    def get_db_prep_save(self, value: Any, connection: Any) -> Any:
        """A write takes only what ``pre_save`` returned: a value it sealed (or a term it
        computed), its NULL, or ``F()`` of the column itself. Anything else comes from
        ``QuerySet.update()`` (or ``bulk_update``'s ``Case``), which bypasses ``pre_save``: a NULL,
        a term read from another row or an expression (``Value(...)``) would leave a source and
        its blind index out of step, or write plaintext. Values change through ``save()``."""
        if hasattr(value, "as_sql"):
            if own_column(self, value):
                return value
            raise refused(self, self.what)
        if value is NULL:
            return None
        if not isinstance(value, self.saved):
            raise refused(self, self.what)
        return bytes(value)

    def get_placeholder(self, value: Any, compiler: Any, connection: Any) -> str:
        """Every INSERT and UPDATE of the column passes here, whichever manager or queryset made
        it (a model's default ``Manager``, ``_base_manager``): an upsert is checked here too."""
        query = compiler.query
        if getattr(query, "on_conflict", None) == OnConflict.UPDATE:
            check_upsert(query.model, query.update_fields, query.unique_fields)
        return "%s"

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, bytes | bytearray | memoryview):  # SQLite: text or a number in a BLOB column
            raise errors.IntegrityError(f"{self.model.__name__}.{self.name}: the database holds a "
                                        f"{type(value).__name__} there, not bytes: {FIELD_INTEGRITY}")
        return self.read(bytes(value))


class SealedColumn(MarkedColumn):
    """The column of an encrypted field (:class:`keymgr.fields.django.EncryptedField`): values
    sealed by its ``pre_save``, read back sealed (:class:`Stored`)."""

    marker = saved = Sealed
    read = Stored
    what = "encrypted"


class TermColumn(MarkedColumn):
    """The column of a blind index (:class:`keymgr.fields.django.BlindIndexField`): the term of
    the plaintext of the sealed column named ``source``, only as its ``pre_save`` computed it."""

    marker = Term
    saved = SavedTerm
    read = Term
    what = "a blind-index term"
    source: str

    def source_field(self) -> SealedColumn:
        field = self.model._meta.get_field(self.source)
        if not isinstance(field, SealedColumn):
            raise errors.ConfigurationError(f"{self.model.__name__}.{self.name} indexes {self.source!r}, "
                                            "which is not an encrypted field")
        return field


_MarkedFields = tuple[tuple[SealedColumn, ...], tuple[TermColumn, ...]]
_marked: dict[type[models.Model], _MarkedFields] = {}


def marked_fields(model: type[models.Model]) -> _MarkedFields:
    """A model's encrypted and blind-index fields (its parents' too), found once per model: the
    receivers of :mod:`keymgr.fields.django._binding` run for every instance made and every save."""
    found = _marked.get(model)
    if found is None:
        fields = model._meta.concrete_fields
        found = _marked.setdefault(model, (tuple(f for f in fields if isinstance(f, SealedColumn)),
                                           tuple(f for f in fields if isinstance(f, TermColumn))))
    return found


def check_upsert(model: type[models.Model], update_fields: Sequence[models.Field],
                 unique_fields: Sequence[models.Field]) -> None:
    """An upsert that overwrites sealed or term columns must conflict on the primary key: the
    values were sealed to the primary key of the object given, so a conflict on another unique
    column (a login) would write them into a row with another key, where they never open. (MySQL
    takes no conflict target: any unique key may conflict, so it is refused there.) And, as for a
    save, a source is overwritten with its blind index or not at all: the existing row's term
    would otherwise stay that of its old value (or a new term point at the old value)."""
    sealed = [f.name for f in update_fields if isinstance(f, MarkedColumn)]
    if sealed and [f.column for f in unique_fields] != [model._meta.pk.column]:
        raise errors.ConfigurationError(
            f"{model.__name__}: bulk_create(update_conflicts=True) updates {', '.join(sealed)}, sealed to the primary "
            f"key of each object: it upserts only on the primary key (unique_fields=[{model._meta.pk.name!r}]), "
            "not on another unique column, whose existing row has another key")
    columns = {f.column for f in update_fields}
    for index in marked_fields(model)[1]:
        source = index.source_field()
        if (source.column in columns) != (index.column in columns):
            raise errors.ConfigurationError(
                f"{model.__name__}: bulk_create(update_conflicts=True) would update {source.name} or its blind index "
                f"{index.name} without the other, leaving a stale term: name both in update_fields, or neither")
