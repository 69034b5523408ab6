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

The modules, bottom to top (each imports only those above it in this list):

* :mod:`~keymgr.fields.django.store`: :class:`DjangoKeyStore`, the data-key table.
* :mod:`~keymgr.fields.django._registry`: :func:`register`, the ciphers and indexes fields name.
* :mod:`~keymgr.fields.django._values`: :class:`Stored` (a value read) and what a save writes.
* :mod:`~keymgr.fields.django._queries`: a sealed or term column in a query (lookups, plaintext
  and expressions refused, functions and subqueries of the column).
* :mod:`~keymgr.fields.django._columns`: the two columns keymgr writes, what a write of them
  takes, upserts.
* :mod:`~keymgr.fields.django._saves`: the save in progress; a source saved with its index.
* :mod:`~keymgr.fields.django._binding`: a value read bound to its row and alias; the model hooks.
* :mod:`~keymgr.fields.django.fields`: :class:`EncryptedTextField`, :class:`EncryptedBinaryField`,
  :class:`BlindIndexField`.
* :mod:`~keymgr.fields.django.queryset`: :class:`EncryptedManager`, ``find()``, :func:`aopen`.
"""

from keymgr.fields.django._registry import register
from keymgr.fields.django._values import Stored
from keymgr.fields.django.fields import BlindIndexField, EncryptedBinaryField, EncryptedField, EncryptedTextField
from keymgr.fields.django.queryset import EncryptedManager, EncryptedQuerySet, aopen
from keymgr.fields.django.store import DjangoKeyStore

__all__ = ["BlindIndexField", "DjangoKeyStore", "EncryptedBinaryField", "EncryptedField", "EncryptedManager",
           "EncryptedQuerySet", "EncryptedTextField", "Stored", "aopen", "register"]


def _public_paths() -> None:
    """Give each public name the path it had when this package was one module (keymgr 0.1's
    ``keymgr/fields/django.py``): migrations name a field by its class's module
    (``Field.deconstruct``: ``keymgr.fields.django.EncryptedTextField``), and pickles (a model
    instance's :class:`Stored` values, a queryset) name classes by it too."""
    for name in __all__:
        public = globals()[name]
        if getattr(public, "__module__", "").startswith(f"{__name__}."):
            public.__module__ = __name__


_public_paths()
