"""The manager and queryset of a model with encrypted fields: :meth:`EncryptedQuerySet.find`
(rows by value, through a blind index), writes checked before any value is sealed or opened,
and :func:`aopen` for async code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from asgiref.sync import sync_to_async
from django.db import models
from django.db.models.query import ModelIterable

from keymgr import errors
from keymgr.fields.django._columns import MarkedColumn, check_upsert, marked_fields
from keymgr.fields.django._queries import refused
from keymgr.fields.django.fields import BlindIndexField


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
            check_upsert(self.model, _fields(self.model, update_fields), _fields(self.model, unique_fields))
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
            indexes = {index.name: None for index in marked_fields(self.model)[1]
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
            if isinstance(field, MarkedColumn):
                raise refused(field, field.what)
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
    for field in marked_fields(type(instance))[0]:
        getattr(instance, field.attname)
