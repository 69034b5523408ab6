"""Tests for the fixes of the third outside review beyond the reviewer's own
(tests/fields/test_django_attacks3.py, whose model, aliases and fixtures these reuse): values read
from one alias and saved to another (deferred, pickled, saved back), the source/index check after
every ``pre_save`` receiver, functions and subqueries of a sealed column (across a join, with the
outer query selecting no sealed column) and what stays allowed, :func:`aopen` in async code, and
``EncryptedBinaryField`` not editable by default."""

from __future__ import annotations

import asyncio
import pickle
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("django")

from asgiref.sync import sync_to_async
from django import forms
from django.db import connections, models
from django.db.models import Case, Count, ExpressionWrapper, F, OuterRef, Subquery, TextField, Value, When
from django.db.models.functions import Cast, Concat, Lower
from django.db.models.lookups import Exact
from django.db.models.signals import pre_save
from django.test.utils import CaptureQueriesContext

from keymgr import errors
from keymgr.fields.django import DjangoKeyStore, EncryptedBinaryField, aopen, register
from tests.fields.test_django_attacks3 import CIPHER, MAIN, OTHER, R3Customer
from tests.fields.test_django_attacks3 import customers as customers  # noqa: F401  (its fixture)

#: the Django integration's tests (a Django project set up per module, real SQLite and
#: PostgreSQL) run in CI; `pytest -m "not slow"` leaves them out (with them it took 143 s
#: instead of 105 s: they also slow the tests after them)
pytestmark = pytest.mark.slow


class R3Order(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    customer = models.ForeignKey(R3Customer, on_delete=models.CASCADE)

    class Meta:
        app_label = "review3"


@pytest.fixture(scope="module")
def databases() -> Iterator[None]:
    """The reviewer's two aliases on SQLite files of this module's own, with both tables. The
    cached connections are dropped before and after: Django keeps one per alias, which would
    still point at another module's files (the reviewer's module sets up the same aliases)."""
    directory = Path(tempfile.mkdtemp(prefix="keymgr-review3-fixes-"))
    for alias in (MAIN, OTHER):
        _forget(alias)
        conf = {"ENGINE": "django.db.backends.sqlite3", "NAME": str(directory / f"{alias}.sqlite3")}
        connections.settings[alias] = connections.configure_settings({"default": conf, alias: conf})[alias]
        with connections[alias].schema_editor() as editor:
            editor.create_model(R3Customer)
            editor.create_model(R3Order)
    yield
    for alias in (MAIN, OTHER):
        _forget(alias)


def _forget(alias: str) -> None:
    """Drop ``alias``'s cached connection in this thread and in the one Django's async queries
    (``aget``) run in, which keeps its own."""
    _forget_here(alias)
    asyncio.run(sync_to_async(_forget_here, thread_sensitive=True)(alias))


def _forget_here(alias: str) -> None:
    if hasattr(connections._connections, alias):
        connections[alias].close()
        del connections[alias]


@pytest.fixture
def orders(databases: None) -> None:
    """R3Order's table (made with the databases)."""


# --- values read from one alias, saved to another -------------------------------------------

def test_deferred_value_copied_to_another_database(customers: Any) -> None:  # noqa: F811
    """A value deferred at the read is loaded from the alias read and sealed for the one written
    (Django saves every field when the alias differs): not F(column), the target's own value."""
    pk = uuid.uuid4()
    R3Customer(id=pk, email="old@example.com", card="1").save(using=MAIN)
    R3Customer(id=pk, email="new@example.com", card="2").save(using=OTHER)
    obj = R3Customer.objects.using(OTHER).only("id", "name").get(pk=pk)
    obj.save(using=MAIN)
    copied = customers.get(pk=pk)
    assert (copied.email, copied.card) == ("new@example.com", "2")
    assert [c.pk for c in customers.find(email="new@example.com")] == [pk]


def test_save_back_to_the_alias_read_keeps_what_the_database_holds(customers: Any) -> None:  # noqa: F811
    """Saved to the alias it was read from (explicitly or by the router), an unchanged value is
    still F(column): a value the database holds since the read (a re-encryption) is kept."""
    pk = customers.create(email="first@example.com", card="1").pk
    obj = customers.get(pk=pk)
    newer = customers.get(pk=pk)
    newer.email = "second@example.com"
    newer.save()
    obj.name = "renamed"
    obj.save()
    obj.save(using=MAIN)
    saved = customers.get(pk=pk)
    assert (saved.name, saved.email) == ("renamed", "second@example.com")


def test_pickled_value_keeps_its_alias(customers: Any) -> None:  # noqa: F811
    pk = customers.create(email="first@example.com", card="1").pk
    obj = customers.get(pk=pk)
    assert obj.email == "first@example.com"  # opened: the plaintext is in the Stored value
    copy = pickle.loads(pickle.dumps(obj.__dict__["email"]))
    assert (copy.db, copy.row, copy.plain) == (MAIN, str(pk), None)  # no plaintext pickled


def test_receiver_changing_the_source_is_saved_with_its_term(customers: Any) -> None:  # noqa: F811
    """The term is computed from the value a later ``pre_save`` receiver left, when both are written."""

    def rename(sender: Any, instance: Any, **kwargs: Any) -> None:
        instance.email = "changed@example.com"

    pk = customers.create(email="bob@example.com", card="1").pk
    pre_save.connect(rename, sender=R3Customer)
    try:
        customers.get(pk=pk).save(update_fields=["email", "email_bidx"])
    finally:
        pre_save.disconnect(rename, sender=R3Customer)
    assert [c.pk for c in customers.find(email="changed@example.com")] == [pk]
    assert customers.find(email="bob@example.com") == []


def test_index_written_without_its_changed_source_is_refused(customers: Any) -> None:  # noqa: F811
    pk = customers.create(email="bob@example.com", card="1").pk
    obj = customers.get(pk=pk)
    obj.email = "eve@example.com"
    with pytest.raises(errors.ConfigurationError, match="blind index"):
        obj.save(update_fields=["email_bidx"])
    assert [c.pk for c in customers.find(email="bob@example.com")] == [pk]


# --- functions and subqueries of a sealed column ------------------------------------------------

SECRET = "alice@example.com"


def _wrapper() -> Any:
    return R3Customer.objects.using(MAIN).annotate(e=ExpressionWrapper(F("email"), output_field=TextField())
                                                   ).filter(e=SECRET)


def _concat() -> Any:
    return R3Customer.objects.using(MAIN).annotate(e=Concat("email", Value(""), output_field=TextField())
                                                   ).filter(e=SECRET)


def _lower_in_filter() -> Any:
    return R3Customer.objects.using(MAIN).values("name").filter(Exact(Lower("email"), Value(SECRET)))


def _join_cast() -> Any:
    return R3Order.objects.using(MAIN).annotate(e=Cast("customer__email", TextField())).filter(e=SECRET)


def _join_filter_only() -> Any:
    return R3Order.objects.using(MAIN).values("id").filter(Exact(Cast("customer__email", TextField()), Value(SECRET)))


def _subquery_no_sealed_select() -> Any:
    column = Subquery(R3Customer.objects.filter(pk=OuterRef("pk")).values("email")[:1])
    return R3Customer.objects.using(MAIN).values("name").filter(Exact(Value(SECRET), column))


def _subquery_of_another_model() -> Any:
    column = Subquery(R3Customer.objects.filter(pk=OuterRef("customer")).values("email")[:1])
    return R3Order.objects.using(MAIN).values("id").filter(Exact(Value(SECRET), column))


def _subquery_index() -> Any:
    column = Subquery(R3Customer.objects.filter(pk=OuterRef("pk")).values("email_bidx")[:1])
    return R3Customer.objects.using(MAIN).values("name").filter(Exact(Value(SECRET.encode()), column))


@pytest.mark.parametrize("query", [_wrapper, _concat, _lower_in_filter, _join_cast, _join_filter_only,
                                   _subquery_no_sealed_select, _subquery_of_another_model, _subquery_index])
def test_function_or_subquery_of_the_column_is_refused(customers: Any, orders: None, query: Any) -> None:  # noqa: F811
    R3Order.objects.using(MAIN).create(customer=customers.create(email=SECRET, card="1"))
    with CaptureQueriesContext(connections[MAIN]) as captured, pytest.raises(errors.ConfigurationError):
        list(query())
    assert not any(SECRET in q["sql"] for q in captured.captured_queries)


def test_what_stays_allowed(customers: Any, orders: None) -> None:  # noqa: F811
    """Counting, a condition on IS NULL, a Case that yields the column itself, find()."""
    pk = customers.create(email=SECRET, card="1").pk
    rows = customers.filter(pk__in=[pk, customers.create(email=None, card="2").pk])
    assert rows.aggregate(n=Count("email"))["n"] == 1
    assert (rows.distinct().count(), rows.order_by("pk")[:1].count()) == (2, 1)  # Django's count subqueries
    with pytest.raises(errors.ConfigurationError, match="subquery"):  # one sealed column: refused
        rows.values("email").distinct().count()
    flags = rows.annotate(has=Case(When(email__isnull=True, then=Value(0)), default=Value(1))).order_by("has")
    assert [c.has for c in flags] == [0, 1]
    same = customers.annotate(e=Case(When(email__isnull=False, then=F("email")))).get(pk=pk)
    assert same.email == SECRET
    assert [c.pk for c in customers.find(email=SECRET)] == [pk]
    R3Order.objects.using(MAIN).create(customer_id=pk)
    assert R3Order.objects.using(MAIN).filter(customer_id=pk, customer__email__isnull=False).count() == 1


# --- async ------------------------------------------------------------------------------------

def test_aopen_loads_the_keys_off_the_loop(customers: Any, km_a: Any, key_name: str) -> None:  # noqa: F811
    pk = customers.create(email=SECRET, card="1").pk
    register(ciphers={CIPHER: km_a.fields(key_name, store=DjangoKeyStore(MAIN))})  # cold cache

    async def view() -> tuple[Any, Any, str]:
        obj = await R3Customer.objects.using(MAIN).aget(pk=pk)
        await aopen(obj)
        return obj.__dict__["email"].plain, obj.__dict__["card"].plain, str(obj.email)

    assert asyncio.run(view()) == (SECRET, "1", SECRET)


def test_deferred_value_in_async_code(customers: Any) -> None:  # noqa: F811
    pk = customers.create(email=SECRET, card="1").pk

    async def view() -> str:
        obj = await R3Customer.objects.using(MAIN).only("id").aget(pk=pk)
        with pytest.raises(errors.ConfigurationError, match="aopen"):
            obj.email  # noqa: B018
        await aopen(obj)
        return str(obj.email)

    assert asyncio.run(view()) == SECRET


# --- forms ------------------------------------------------------------------------------------

def test_binary_field_not_editable_by_default() -> None:
    blob = R3Customer._meta.get_field("blob")
    assert not blob.editable and "editable" not in blob.deconstruct()[3]
    assert EncryptedBinaryField(cipher=CIPHER, editable=True).deconstruct()[3]["editable"] is True

    class CustomerForm(forms.ModelForm):  # type: ignore[type-arg]
        class Meta:
            model = R3Customer
            fields = "__all__"

    assert "blob" not in CustomerForm.base_fields
