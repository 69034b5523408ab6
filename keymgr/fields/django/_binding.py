"""Where a value read belongs: its row and its database alias, and the model hooks that bind it.

``from_db_value`` gets no instance, so a value read stays sealed (:class:`Stored`) and is bound
to its row (the primary key, as text, of the table that holds the column: for a multi-table
child the parent's) and alias by a ``post_init`` receiver, for the instances ``Model.from_db``
makes only (keymgr wraps it). :func:`watch` installs these hooks on a model that declares a
sealed or term column, and on its proxies and multi-table children (Django sends their signals
with the subclass as sender).
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Iterable
from typing import Any

from django.db import models
from django.db.models.query import ModelIterable
from django.db.models.signals import class_prepared, post_init, pre_save

from keymgr import errors
from keymgr.fields.django._columns import MarkedColumn, marked_fields
from keymgr.fields.django._saves import note_save
from keymgr.fields.django._values import Stored


def row_or_none(instance: models.Model, model: type[models.Model]) -> str | None:
    """The row identity in ``model``'s table (the model that declares the field: a multi-table
    child's parent, whose key exists before the child's link does), or None while it has none."""
    pk_field = model._meta.pk
    pk = getattr(instance, pk_field.attname, None)
    return None if pk is None else str(pk_field.to_python(pk))


def row(instance: models.Model, model: type[models.Model]) -> str:
    """The row identity a value is bound to: the primary key of the field's own table, normalised
    by its field (a UUID given as a string is bound in canonical form, as it will read back)."""
    found = row_or_none(instance, model)
    if found is None:
        raise errors.ConfigurationError(
            f"{type(instance).__name__} has no primary key yet: its encrypted fields are bound to it, so it must "
            "exist before the insert (a client-generated key: UUIDField(primary_key=True, default=uuid.uuid4))")
    return found


#: The database alias ``Model.from_db`` reads from, set while it makes an instance of a row just
#: read: only then does ``post_init`` bind the instance's :class:`Stored` values to its primary key
#: and alias (a value from ``values()`` given to ``Model(...)`` was read for some other row, or none).
_from_database: contextvars.ContextVar[str | None] = contextvars.ContextVar("keymgr_django_from_database",
                                                                         default=None)


#: The ``_state`` attribute of an instance made only to be copied by ``refresh_from_db()``: its
#: encrypted attributes hand over their :class:`Stored` values, not plaintext.
SEALED_COPY = "keymgr_sealed_copy"


def _bind_loaded(sender: type[models.Model], instance: models.Model, **kwargs: Any) -> None:
    """A value just read from the database is bound to the row it was read for, before the
    application (or another ``post_init`` receiver) can change the primary key. Only the
    instance ``from_db`` makes is bound: a :class:`Stored` given to ``Model(...)`` keeps its row
    (``None`` from ``values()``), so it is never taken for this row's unchanged value."""
    db = _from_database.get()
    if db is None:
        return
    _from_database.set(None)  # this instance only, not one a later receiver makes
    for field in marked_fields(sender)[0]:
        value = instance.__dict__.get(field.attname)
        if isinstance(value, Stored) and value.row is None:
            value.row, value.db = row_or_none(instance, field.model), db


class _SealedCopies(ModelIterable):  # type: ignore[misc]
    """The instances ``refresh_from_db()`` reads, marked as copies whose encrypted attributes
    hand over their :class:`Stored` values (after ``post_init``: receivers see them as usual)."""

    def __iter__(self) -> Any:
        for instance in super().__iter__():
            setattr(instance._state, SEALED_COPY, True)
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


def watch(model: type[models.Model]) -> None:
    """Connect the receivers of a model with sealed or term columns (and, through
    :func:`_watch_subclass`, of its proxies and multi-table children: Django sends their
    signals with the subclass as sender)."""
    _wrap_model_methods(model)
    post_init.connect(_bind_loaded, sender=model, weak=False)
    pre_save.connect(note_save, sender=model, weak=False)


def _watch_subclass(sender: type[models.Model], **kwargs: Any) -> None:
    for base in sender.__mro__[1:]:
        meta = getattr(base, "_meta", None)
        if meta is not None and any(isinstance(f, MarkedColumn) for f in meta.local_fields):
            watch(sender)
            return


class_prepared.connect(_watch_subclass, weak=False)
