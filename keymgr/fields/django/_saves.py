"""The save in progress, and the rule that a changed source is saved with its blind index.

Django gives a field's ``pre_save`` neither the database alias written nor ``update_fields``: a
``pre_save`` receiver (:func:`note_save`) keeps both on the instance's ``_state`` for it.
"""

from __future__ import annotations

from typing import Any

from django.db import models

from keymgr import errors
from keymgr.fields.django._columns import SealedColumn, TermColumn, marked_fields

#: The ``_state`` attribute that holds the save in progress, (alias written, ``update_fields``),
#: set by :func:`note_save` (a ``pre_save`` receiver) for the fields' own ``pre_save``.
_SAVING = "keymgr_saving"


def note_save(sender: type[models.Model], instance: models.Model, using: str | None = None,
              update_fields: frozenset[str] | None = None, **kwargs: Any) -> None:
    """Note the save in progress for the fields' ``pre_save`` (which Django gives no alias and no
    ``update_fields``): the alias written (a value is unchanged only if read from it) and the
    fields written (``update_fields``, also the loaded fields Django saves after ``only()``).
    Nothing is checked here: a ``pre_save`` receiver connected later may still change a value."""
    setattr(instance._state, _SAVING, (using, update_fields))


def saving(instance: models.Model) -> tuple[str | None, frozenset[str] | None]:
    """(alias, update_fields) of the save in progress; outside one, the instance's own alias."""
    noted: tuple[str | None, frozenset[str] | None] | None = getattr(instance._state, _SAVING, None)
    return noted if noted is not None else (instance._state.db, None)


def stale_term(model: type[models.Model], source: SealedColumn, index: TermColumn) -> errors.ConfigurationError:
    """The error for a changed source saved without its blind index ``index``."""
    return errors.ConfigurationError(
        f"{model.__name__}.{source.name} changed: it is saved only with its blind index {index.name} "
        f"(update_fields=[..., {source.name!r}, {index.name!r}]; after only()/defer(), load both)")


def check_written_with_index(source: SealedColumn, instance: models.Model) -> None:
    """A changed source written without its blind index would leave a stale term (the row found
    neither by its new value nor by its old one). Checked in the source's own ``pre_save``, when
    the value is final (after every ``pre_save`` receiver), before anything is written; Django
    gives a field no way to add a column to ``update_fields``, so the save is refused."""
    update_fields = saving(instance)[1]
    if update_fields is None:
        return
    for index in marked_fields(type(instance))[1]:
        if index.source_field() is source and not {index.name, index.attname} & update_fields:
            raise stale_term(type(instance), source, index)
