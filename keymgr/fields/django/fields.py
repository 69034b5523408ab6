"""The Django model fields: :class:`EncryptedTextField`, :class:`EncryptedBinaryField` (values
sealed to their row by a registered cipher) and :class:`BlindIndexField` (the term of another
field's plaintext, by a registered blind index).

A value is sealed in :meth:`EncryptedField.pre_save`, which gets the instance (Django hands
``get_db_prep_value`` no row), bound to (``db_table``, column, primary key as text): the place
:class:`keymgr.fields.sql.EncryptedTable` binds, so either side reads the other's rows. A value
read stays sealed in the instance and opens on first attribute access
(:class:`_PlaintextAttribute`). An UPDATE of the row a value was read for, to the alias it was
read from, leaves an unchanged value's column, and its blind index's, as the database holds it
(``F(column)``: a re-encryption pass may have replaced the value read, and deleted its data key).
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import SynchronousOnlyOperation
from django.db import models
from django.db.models.query_utils import DeferredAttribute

from keymgr import errors
from keymgr.fields._format import Place
from keymgr.fields.cipher import FieldCipher
from keymgr.fields.django._binding import SEALED_COPY, row, row_or_none, watch
from keymgr.fields.django._columns import SealedColumn, TermColumn
from keymgr.fields.django._registry import registered_cipher, registered_index
from keymgr.fields.django._saves import check_written_with_index, saving, stale_term
from keymgr.fields.django._values import NULL, SavedNull, SavedTerm, Sealed, Stored
from keymgr.fields.index import BlindIndex, Term, index_context


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
        if not isinstance(value, Stored) or getattr(instance._state, SEALED_COPY, False):
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
            value.row, value.db = row(instance, self.field.model), instance._state.db
        instance.__dict__[self.field.attname] = value


class EncryptedField(SealedColumn):
    """A column of field-form values (``bytea`` / ``BLOB``) sealed by the registered cipher ``cipher``."""

    descriptor_class = _PlaintextAttribute
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
        watch(cls)

    @property
    def cipher(self) -> FieldCipher:
        return registered_cipher(self.cipher_name)

    def place(self, row: str) -> Place:
        return Place(self.model._meta.db_table, self.column, row)

    def kept(self, instance: models.Model) -> bool:
        """The instance holds the value read for this very row from the very database the save
        writes to, unchanged (or none, deferred, and saved to the database it was loaded from): an
        UPDATE leaves the column to what the database holds. A value read from another alias (a
        copy between databases, a read replica) is sealed again: ``F(column)`` would keep the
        target's own value."""
        using = saving(instance)[0]
        value = instance.__dict__.get(self.attname, _NOT_LOADED)
        if value is _NOT_LOADED:
            return bool(using == instance._state.db)
        return (isinstance(value, Stored) and value.row is not None and value.db == using
                and value.row == row_or_none(instance, self.model))

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

    def pre_save(self, model_instance: models.Model, add: bool) -> Sealed | models.F | SavedNull:
        """An UPDATE of the row a value was read for leaves the column as it is, ``F(column)``:
        the instance's copy may name a data key a re-encryption pass has since deleted (the
        database holds the re-sealed value). An INSERT, a copy to another primary key or an
        assigned value is sealed now, to this row."""
        if not add and self.kept(model_instance):
            return models.F(self.attname)
        if not add:
            check_written_with_index(self, model_instance)
        plain = self.to_seal(model_instance)
        if plain is None:
            return NULL
        return Sealed(self.cipher.encrypt(plain, self.place(row(model_instance, self.model))))

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


class BlindIndexField(TermColumn):
    """The blind-index term of another field's plaintext (``source``), computed in ``pre_save`` by
    the registered index ``index`` and bound to (``db_table``, this column), as
    :class:`keymgr.fields.sql.EncryptedTable` binds its terms. Nullable (a NULL source has no term),
    indexed by the database, not editable."""

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
        watch(cls)

    @property
    def index(self) -> BlindIndex:
        return registered_index(self.index_name)

    @property
    def context(self) -> bytes:
        return index_context(self.model._meta.db_table, self.column)

    def pre_save(self, model_instance: models.Model, add: bool) -> SavedTerm | models.F | SavedNull:
        """The term of the source's plaintext. While the source is the value read for this row
        (or deferred, never loaded) an UPDATE leaves the term column as the database holds it
        (no decryption, no HMAC; a deferred source never NULLs it); otherwise the term is
        computed again, with the newest index version."""
        source = self.source_field()
        if not add and source.kept(model_instance):
            return models.F(self.attname)
        update_fields = saving(model_instance)[1]
        if not add and update_fields is not None and not {source.name, source.attname} & update_fields:
            raise stale_term(type(model_instance), source, self)
        plain = source.to_seal(model_instance)
        if plain is None:
            model_instance.__dict__[self.attname] = None
            return NULL
        term = self.index.term(plain, context=self.context)
        model_instance.__dict__[self.attname] = Term(term)
        return SavedTerm(term)
