"""keymgr.fields.django: the second outside review's fixes, beyond the reviewer's own tests
(tests/fields/test_django_attacks2.py).

A write takes only what ``pre_save`` returned (so ``QuerySet.update()`` of a sealed or term
column is refused, NULL included); an upsert writes a source with its blind index or neither
(``abulk_create`` too); ``refresh_from_db()`` keeps values as read; a ``values()`` value given to
another instance is refused, not silently dropped; a comparison that holds a sealed column on
either side, outside the column's own lookups, is refused; ``update_or_create`` of a
multi-table child saves the parent's blind index with its source."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from django.db import connections
from django.db.models import Case, F, IntegerField, Q, Value, When
from django.db.models.lookups import Exact
from django.db.models.signals import post_init
from django.test.utils import CaptureQueriesContext

from keymgr import errors
from keymgr.fields.django import Stored
from tests.fields.test_django import EMAIL, Customer, _raw, alias, db  # noqa: F401 - fixtures
from tests.fields.test_django_attacks import Branch, Member, tables  # noqa: F401 - fixture
from tests.fields.test_django_saves import refused_before_any_query

#: the Django integration's tests (a Django project set up per module, real SQLite and
#: PostgreSQL) run in CI; `pytest -m "not slow"` leaves them out (with them it took 143 s
#: instead of 105 s: they also slow the tests after them)
pytestmark = pytest.mark.slow


def _columns(db_alias: str, pk: uuid.UUID) -> tuple[bytes | None, bytes | None]:
    email, term = _raw(db_alias, "email", pk), _raw(db_alias, "email_bidx", pk)
    return (None if email is None else bytes(email)), (None if term is None else bytes(term))


def test_queryset_update_of_a_sealed_or_term_column_is_refused_even_both_together(db: str) -> None:  # noqa: F811
    c = Customer.objects.using(db).create(name="a", email=EMAIL)
    before = _columns(db, c.pk)
    rows = Customer.objects.using(db).filter(pk=c.pk)
    term = Customer.objects.using(db).get(pk=c.pk).__dict__["email_bidx"]
    with CaptureQueriesContext(connections[db]) as queries:
        for values in ({"email": None, "email_bidx": None}, {"photo": None}, {"email_bidx": term},
                       {"email": F("email"), "email_bidx": term}):
            with pytest.raises(errors.ConfigurationError):
                rows.update(**values)
    assert not [q for q in queries if q["sql"].startswith("UPDATE")]
    assert _columns(db, c.pk) == before
    assert rows.update(name="b", email=F("email")) == 1  # other columns, and the column itself, as before
    loaded = Customer.objects.using(db).get(pk=c.pk)
    loaded.email = None
    loaded.save(update_fields=["email", "email_bidx"])  # NULL goes through save()
    assert _columns(db, c.pk) == (None, None)


def test_a_primary_key_upsert_writes_a_source_with_its_index_or_neither(tables: str) -> None:  # noqa: F811
    first = Member.objects.using(tables).create(login="alice", email=EMAIL)
    rows = Member.objects.using(tables)
    for update_fields in (["email"], ["email_bidx"], ["login", "email"]):
        with pytest.raises(errors.ConfigurationError, match="blind index"):
            rows.bulk_create([Member(id=first.pk, login="alice", email="eve@example.com")], update_conflicts=True,
                             unique_fields=["id"], update_fields=update_fields)
    with pytest.raises(errors.ConfigurationError, match="blind index"):
        asyncio.run(rows.abulk_create([Member(id=first.pk, login="alice", email="eve@example.com")],
                                      update_conflicts=True, unique_fields=["id"], update_fields=["email"]))
    with pytest.raises(errors.ConfigurationError, match="blind index"):  # a plain Manager: the column checks it
        Member._base_manager.using(tables).bulk_create([Member(id=first.pk, login="alice", email="eve@example.com")],
                                                       update_conflicts=True, unique_fields=["id"],
                                                       update_fields=["email_bidx"])
    assert rows.get(pk=first.pk).email == EMAIL
    assert [m.pk for m in rows.find(email=EMAIL)] == [first.pk]
    rows.bulk_create([Member(id=first.pk, login="alice", email="eve@example.com")], update_conflicts=True,
                     unique_fields=["id"], update_fields=["login", "email", "email_bidx"])
    assert [m.pk for m in rows.find(email="eve@example.com")] == [first.pk]


def test_refresh_from_db_keeps_values_sealed_and_unopened(db: str) -> None:  # noqa: F811
    c = Customer.objects.using(db).create(name="a", email=EMAIL, photo=b"\x01")
    loaded = Customer.objects.using(db).get(pk=c.pk)
    loaded.email = "assigned@example.com"  # discarded by the refresh, as Django does
    loaded.refresh_from_db()
    assert all(isinstance(loaded.__dict__[name], Stored) and loaded.__dict__[name].plain is None
               for name in ("email", "photo"))  # not opened by the refresh
    assert loaded.email == EMAIL and loaded.photo == b"\x01"
    sealed = _columns(db, c.pk)
    loaded.name = "b"
    loaded.save()
    assert _columns(db, c.pk) == sealed  # F(column), not sealed again
    loaded.refresh_from_db(fields=["email"])
    asyncio.run(loaded.arefresh_from_db(fields=["email", "photo"]))
    loaded.email = "new@example.com"  # a change after a refresh is saved with its term
    loaded.save()
    assert [x.pk for x in Customer.objects.using(db).find(email="new@example.com")] == [c.pk]
    again = Customer.objects.using(db).get(pk=c.pk)
    again.refresh_from_db(from_queryset=Customer.objects.using(db).only("name", "email"))
    assert again.email == "new@example.com"


def test_refresh_from_db_of_a_multi_table_child_keeps_the_parents_values(tables: str) -> None:  # noqa: F811
    branch: Any = Branch.objects.using(tables).create(name="b", email=EMAIL, level=1)
    branch.refresh_from_db()
    assert isinstance(branch.__dict__["email"], Stored)
    sealed = _columns(tables, branch.pk)
    branch.level = 2
    branch.save()
    assert _columns(tables, branch.pk) == sealed
    assert branch.email == EMAIL


def test_a_value_from_values_given_to_an_instance_is_refused_not_dropped(db: str) -> None:  # noqa: F811
    first = Customer.objects.using(db).create(name="first", email=EMAIL)
    second = Customer.objects.using(db).create(name="second", email="second@example.com")
    copied = Customer.objects.using(db).filter(pk=second.pk).values_list("email", flat=True).get()
    before = _columns(db, first.pk)
    for target in (first.pk, second.pk):  # another row, or even the row it was read from
        instance = Customer(id=target, name="x", email=copied)
        with pytest.raises(errors.ConfigurationError, match="values"):
            instance.email  # noqa: B018 - the attribute access is the test
        with pytest.raises(errors.ConfigurationError, match="values"):
            instance.save(using=db)
    assert _columns(db, first.pk) == before
    assert Customer.objects.using(db).get(pk=second.pk).email == "second@example.com"


def test_a_post_init_receiver_reads_a_loaded_instance_in_the_clear(db: str) -> None:  # noqa: F811
    """Values are bound to their row before any receiver connected after the model runs."""
    c = Customer.objects.using(db).create(name="a", email=EMAIL)
    seen: list[Any] = []

    def watch(sender: type, instance: Any, **kwargs: Any) -> None:
        if instance.pk == c.pk and "email" in instance.__dict__:
            seen.append(instance.email)

    post_init.connect(watch, sender=Customer)
    try:
        Customer.objects.using(db).get(pk=c.pk)
    finally:
        post_init.disconnect(watch, sender=Customer)
    assert seen == [EMAIL]


def test_no_comparison_holds_a_sealed_column_beside_plaintext(db: str) -> None:  # noqa: F811
    c = Customer.objects.using(db).create(name="a", email=EMAIL)
    rows = Customer.objects.using(db)
    attempts = [lambda: list(rows.filter(Exact(F("email"), Value(EMAIL)))),  # a bare Exact: not the column's lookup
                lambda: list(rows.filter(Exact(Value(EMAIL), F("email")))),
                lambda: list(rows.filter(Exact(Value(b"\x01"), F("email_bidx")))),
                lambda: list(rows.annotate(v=Value(EMAIL)).filter(v=F("email"))),
                lambda: list(rows.annotate(hit=Case(When(Exact(Value(EMAIL), F("email")), then=1), default=0,
                                                     output_field=IntegerField()))),
                lambda: list(rows.filter(Q(name="a") | Q(Exact(Value(EMAIL), F("email"))))),
                lambda: rows.filter(Exact(Value(EMAIL), F("email"))).update(name="b")]
    refused_before_any_query(db, attempts)
    assert [x.pk for x in rows.filter(email=F("email"), email__isnull=False)] == [c.pk]  # the column itself
    assert [x.pk for x in rows.filter(Exact(F("email"), F("email")))] == [c.pk]
    assert [x.pk for x in rows.find(email=EMAIL)] == [c.pk]
    assert rows.get(pk=c.pk).name == "a"


def test_update_or_create_of_a_child_saves_the_parents_blind_index(tables: str) -> None:  # noqa: F811
    branch: Any = Branch.objects.using(tables).create(name="b", email=EMAIL, level=1)
    _, created = Branch.objects.using(tables).update_or_create(name="b", defaults={"email": "new@example.com",
                                                                                    "level": 2})
    assert not created
    assert [c.pk for c in Customer.objects.using(tables).find(email="new@example.com")] == [branch.pk]
    made, created = Branch.objects.using(tables).update_or_create(name="c", defaults={"email": "c@example.com"})
    assert created
    assert [c.pk for c in Customer.objects.using(tables).find(email="c@example.com")] == [made.pk]
