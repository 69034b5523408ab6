"""A third outside review of the Django fields (keymgr/fields/django/): one test per finding,
each failing on main at 35c7180 (reproductions: SQLite files here; PostgreSQL by hand, same
results). Django is configured by tests/fields/_django_project.py; the tests use database aliases
of their own (two SQLite files), added to whatever configuration is in place."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fields import _django_project  # noqa: F401 - skips without Django; configures it

# isort: split
from django import forms
from django.db import connections, models
from django.db.models import OuterRef, Subquery, TextField, Value
from django.db.models.functions import Cast, Substr
from django.db.models.lookups import Exact
from django.db.models.signals import pre_save
from django.test.utils import CaptureQueriesContext

from keymgr import errors
from keymgr.fields import unicode_fold
from keymgr.fields.django import (
    BlindIndexField,
    DjangoKeyStore,
    EncryptedBinaryField,
    EncryptedManager,
    EncryptedTextField,
    register,
)

#: the Django integration's tests (a Django project set up per module, real SQLite and
#: PostgreSQL) run in CI; `pytest -m "not slow"` leaves them out (with them it took 143 s
#: instead of 105 s: they also slow the tests after them)
pytestmark = pytest.mark.slow

MAIN, OTHER = "review3", "review3_other"
CIPHER, INDEX = "review3-cipher", "review3-email"


class R3Customer(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    name = models.CharField(max_length=50, default="")
    email = EncryptedTextField(cipher=CIPHER, null=True)
    card = EncryptedTextField(cipher=CIPHER, null=True)
    blob = EncryptedBinaryField(cipher=CIPHER, null=True, blank=True)
    email_bidx = BlindIndexField(source="email", index=INDEX)
    objects = EncryptedManager()

    class Meta:
        app_label = "review3"


@pytest.fixture(scope="module")
def databases() -> Iterator[None]:
    """Two SQLite files under aliases of this module's own, with the model's table in both."""
    directory = Path(tempfile.mkdtemp(prefix="keymgr-review3-"))
    for alias in (MAIN, OTHER):
        conf = {"ENGINE": "django.db.backends.sqlite3", "NAME": str(directory / f"{alias}.sqlite3")}
        connections.settings[alias] = connections.configure_settings({"default": conf, alias: conf})[alias]
        with connections[alias].schema_editor() as editor:
            editor.create_model(R3Customer)
    yield
    for alias in (MAIN, OTHER):
        connections[alias].close()


@pytest.fixture
def customers(databases: None, km_a: Any, key_name: str) -> Iterator[Any]:
    """The model's manager on the main alias, with a cipher and an index of this test's own."""
    km_a.create_key(key_name)
    store = DjangoKeyStore(MAIN)
    store.create()
    register(ciphers={CIPHER: km_a.fields(key_name, store=store)},
             indexes={INDEX: km_a.blind_index(f"{key_name}-email", bits=15, normalise=unicode_fold)})
    yield R3Customer.objects.db_manager(MAIN)
    register(ciphers={CIPHER: km_a.fields(key_name, store=store)})  # drop the cached keys with the test


def test_save_using_another_database_writes_the_values_read(customers: Any) -> None:
    """(high) An instance read from one database and saved to another (Django's documented way to
    copy a row between databases, a sync script) leaves its unchanged values out of the UPDATE
    (``F(column)``): the target row keeps its old email and card, silently, while the name is
    copied. The value is kept only if it was read from the very database being written."""
    pk = uuid.uuid4()
    R3Customer(id=pk, name="v1", email="old@example.com", card="1111").save(using=MAIN)
    R3Customer(id=pk, name="v2", email="new@example.com", card="2222").save(using=OTHER)
    for obj in R3Customer.objects.using(OTHER).all():
        obj.save(using=MAIN)
    copied = customers.get(pk=pk)
    assert (copied.name, copied.email, copied.card) == ("v2", "new@example.com", "2222")
    assert [c.pk for c in customers.find(email="new@example.com")] == [pk]


def test_pre_save_receiver_changing_the_source_leaves_no_stale_term(customers: Any) -> None:
    """(medium) keymgr's check that a changed source is saved with its blind index runs as a
    ``pre_save`` receiver connected when the model is made; a receiver the application connects
    later (``AppConfig.ready``) that changes the source runs after it: with
    ``update_fields=["email"]`` the new value is written, its term is not, and nothing says so
    (the row is found neither by its new value nor by its old one)."""

    def migrate_domain(sender: Any, instance: Any, **kwargs: Any) -> None:
        if instance.email and instance.email.endswith("@old.example"):
            instance.email = instance.email.replace("@old.example", "@new.example")

    pk = customers.create(email="bob@old.example", card="1").pk
    pre_save.connect(migrate_domain, sender=R3Customer)
    try:
        obj = customers.get(pk=pk)
        try:
            obj.save(using=MAIN, update_fields=["email"])
        except errors.ConfigurationError:
            return  # refused: no stale term written
    finally:
        pre_save.disconnect(migrate_domain, sender=R3Customer)
    assert customers.get(pk=pk).email == "bob@new.example"
    assert [c.pk for c in customers.find(email="bob@new.example")] == [pk]


def _cast(secret: str) -> Any:
    return R3Customer.objects.using(MAIN).annotate(e=Cast("email", TextField())).filter(e=secret)


def _substr(secret: str) -> Any:
    return R3Customer.objects.using(MAIN).annotate(e=Substr("email", 1, 40)).filter(e__icontains=secret)


def _subquery(secret: str) -> Any:
    column = Subquery(R3Customer.objects.filter(pk=OuterRef("pk")).values("email")[:1])
    return R3Customer.objects.using(MAIN).filter(Exact(Value(secret), column))


@pytest.mark.parametrize("query", [_cast, _substr, _subquery], ids=["cast", "substr", "subquery"])
def test_plaintext_compared_with_a_function_of_the_column_is_refused(customers: Any, query: Any) -> None:
    """(medium) The comparison check passes a direct value on the right (``rhs_is_direct_value``),
    trusting the column's ``get_db_prep_value``; but after ``Cast`` / ``Substr`` the lookup is the
    function's output field's (a text field), which sends the plaintext as a query parameter. And
    a ``Subquery`` of the column hides it from the check (``_marked_in`` does not enter it)."""
    secret = "alice@example.com"
    customers.create(email=secret, card="1")
    with CaptureQueriesContext(connections[MAIN]) as captured, pytest.raises(errors.ConfigurationError):
        list(query(secret))
    assert not any(secret in q["sql"] for q in captured.captured_queries)


def test_attribute_read_in_async_code_with_a_cold_key_cache(customers: Any, km_a: Any, key_name: str) -> None:
    """(medium) In an async view, reading an encrypted attribute of an instance from ``aget()``
    raises Django's SynchronousOnlyOperation whenever the value's data key is not cached yet (the
    first read after a start, or after the cache expired): DjangoKeyStore opens a connection in the
    event loop's thread. With a warm cache the same code works: it fails only sometimes."""
    pk = customers.create(email="alice@example.com", card="1").pk
    register(ciphers={CIPHER: km_a.fields(key_name, store=DjangoKeyStore(MAIN))})  # a restart: cold cache

    async def view() -> str:
        obj = await R3Customer.objects.using(MAIN).aget(pk=pk)
        return str(obj.email)

    assert asyncio.run(view()) == "alice@example.com"


def test_modelform_of_all_fields_saves_an_unchanged_binary_value(customers: Any) -> None:
    """(low) ``EncryptedBinaryField`` is editable (Django's ``BinaryField`` is not), so a
    ``ModelForm`` with ``fields="__all__"`` (the admin's default) shows it as a CharField: the
    bytes come back as ``"b'...'"`` and every save of the form is refused, unchanged or not."""

    class CustomerForm(forms.ModelForm):  # type: ignore[type-arg]
        class Meta:
            model = R3Customer
            fields = "__all__"

    pk = customers.create(email="alice@example.com", card="1", blob=b"\x00\x01raw").pk
    obj = customers.get(pk=pk)
    form = CustomerForm(data={**forms.models.model_to_dict(obj), "name": "renamed"}, instance=obj)
    assert form.is_valid(), form.errors
    form.instance._state.db = MAIN
    form.save()
    saved = customers.get(pk=pk)
    assert (saved.name, saved.blob, saved.email) == ("renamed", b"\x00\x01raw", "alice@example.com")
