"""keymgr.fields.django: what a save writes (review 16's fixes, beyond the reviewer's own tests).

An UPDATE leaves an unchanged sealed or term column to what the database holds (``F()``), an
INSERT seals again; a changed source is saved with its blind index or not at all; expressions
other than the column itself never reach a sealed column or a query parameter; a multi-table
child binds to its parent's key; an upsert conflicts only on the primary key."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.db import connections
from django.db.models import F, Value
from django.db.models.functions import Lower
from django.test.utils import CaptureQueriesContext

from keymgr import errors
from keymgr.fields.django import Stored
from keymgr.fields.django._registry import _indexes
from tests.fields.test_django import EMAIL, Customer, _db_pk, _raw, alias, db  # noqa: F401 - fixtures
from tests.fields.test_django_attacks import Branch, Member, tables  # noqa: F401 - fixture

#: the Django integration's tests (a Django project set up per module, real SQLite and
#: PostgreSQL) run in CI; `pytest -m "not slow"` leaves them out (with them it took 143 s
#: instead of 105 s: they also slow the tests after them)
pytestmark = pytest.mark.slow


def _set_raw(db_alias: str, column: str, value: bytes, pk: uuid.UUID) -> None:
    with connections[db_alias].cursor() as cursor:
        cursor.execute(f"UPDATE dj_customers SET {column} = %s WHERE id = %s", [value, _db_pk(db_alias, pk)])


def test_an_unchanged_save_keeps_the_columns_the_database_holds(db: str) -> None:  # noqa: F811
    """What a re-encryption pass (or an index rotation's recomputation) wrote meanwhile stays."""
    a = Customer.objects.using(db).create(name="a", email=EMAIL)
    loaded = Customer.objects.using(db).get(pk=a.pk)
    b = Customer.objects.using(db).create(name="b", email="other@example.com")  # its value stands in for a new one
    index = _indexes["customers-email"]
    index.rotate()
    newer_term = index.term(EMAIL, context=Customer._meta.get_field("email_bidx").context)
    _set_raw(db, "email_bidx", bytes(newer_term), a.pk)
    sealed_before = bytes(_raw(db, "email", a.pk))
    loaded.name = "renamed"
    loaded.save()
    assert bytes(_raw(db, "email_bidx", a.pk)) == bytes(newer_term)  # not the term loaded (version 1)
    assert bytes(_raw(db, "email", a.pk)) == sealed_before
    assert isinstance(loaded.__dict__["email"], Stored) and loaded.__dict__["email_bidx"][0] == 1  # instance as read
    assert Customer.objects.using(db).get(pk=a.pk).name == "renamed"
    assert [c.pk for c in Customer.objects.using(db).find(email=EMAIL)] == [a.pk]
    assert Customer.objects.using(db).get(pk=b.pk).email == "other@example.com"


def test_an_insert_of_a_loaded_value_seals_it_again(db: str) -> None:  # noqa: F811
    """The row was deleted meanwhile: save() finds no row to update and inserts, sealing anew."""
    c = Customer.objects.using(db).create(email=EMAIL)
    loaded = Customer.objects.using(db).get(pk=c.pk)
    sealed_before = bytes(_raw(db, "email", c.pk))
    Customer.objects.using(db).filter(pk=c.pk).delete()
    loaded.save()
    assert bytes(_raw(db, "email", c.pk)) != sealed_before  # a new nonce at least: sealed again, not copied
    assert Customer.objects.using(db).get(pk=c.pk).email == EMAIL
    assert [x.pk for x in Customer.objects.using(db).find(email=EMAIL)] == [c.pk]


def test_a_changed_source_is_saved_with_its_blind_index_or_not_at_all(db: str) -> None:  # noqa: F811
    c = Customer.objects.using(db).create(name="a", email=EMAIL)
    before = bytes(_raw(db, "email", c.pk)), bytes(_raw(db, "email_bidx", c.pk))
    partial = Customer.objects.using(db).only("email").get(pk=c.pk)  # Django saves the loaded fields only
    partial.email = "new@example.com"
    with pytest.raises(errors.ConfigurationError, match="email_bidx") as caught:
        partial.save()
    assert "new@example.com" not in str(caught.value)
    loaded = Customer.objects.using(db).get(pk=c.pk)
    loaded.email = "new@example.com"
    with pytest.raises(errors.ConfigurationError):
        loaded.save(update_fields=["email_bidx"])  # a term for a value not saved
    assert (bytes(_raw(db, "email", c.pk)), bytes(_raw(db, "email_bidx", c.pk))) == before
    both = Customer.objects.using(db).only("email", "email_bidx").get(pk=c.pk)
    both.email = "new@example.com"
    both.save()
    assert [x.pk for x in Customer.objects.using(db).find(email="new@example.com")] == [c.pk]


def test_reading_a_deferred_value_does_not_count_as_a_change(db: str) -> None:  # noqa: F811
    c = Customer.objects.using(db).create(name="a", email=EMAIL)
    sealed = bytes(_raw(db, "email", c.pk))
    only_name = Customer.objects.using(db).only("name").get(pk=c.pk)
    assert only_name.email == EMAIL  # loaded sealed, then opened
    assert isinstance(only_name.__dict__["email"], Stored)
    only_name.name = "b"
    only_name.save()  # saves name and email (loaded now), not email_bidx: allowed, email unchanged
    assert bytes(_raw(db, "email", c.pk)) == sealed
    deferred = Customer.objects.using(db).defer("email").get(pk=c.pk)
    deferred.save(update_fields=["email", "email_bidx"])  # never loaded: both kept
    assert bytes(_raw(db, "email", c.pk)) == sealed
    assert [x.pk for x in Customer.objects.using(db).find(email=EMAIL)] == [c.pk]


def test_no_expression_but_the_column_itself_reaches_a_sealed_column(db: str) -> None:  # noqa: F811
    c = Customer.objects.using(db).create(name=EMAIL, email=EMAIL)
    before = bytes(_raw(db, "email", c.pk)), bytes(_raw(db, "email_bidx", c.pk))
    rows = Customer.objects.using(db)
    attempts = [lambda: list(rows.filter(email__in=[Value(EMAIL)])),
                lambda: list(rows.filter(email=Lower(Value(EMAIL)))),
                lambda: list(rows.filter(email=F("name"))),
                lambda: list(rows.filter(email_bidx__in=[b"\x01\x02", Value(EMAIL.encode())])),
                lambda: list(rows.exclude(email=Value(EMAIL))),
                lambda: rows.filter(pk=c.pk).update(email=F("name")),  # another column's plaintext
                lambda: rows.filter(pk=c.pk).update(email_bidx=Value(EMAIL.encode())),
                lambda: rows.filter(pk=c.pk).update(email=Lower(Value(EMAIL)))]
    refused_before_any_query(db, attempts)
    assert (bytes(_raw(db, "email", c.pk)), bytes(_raw(db, "email_bidx", c.pk))) == before
    assert rows.filter(pk=c.pk).update(email=F("email"), email_bidx=F("email_bidx")) == 1  # the column itself
    assert (bytes(_raw(db, "email", c.pk)), bytes(_raw(db, "email_bidx", c.pk))) == before


def test_bulk_update_of_a_sealed_column_is_refused_before_any_value_is_opened(db: str) -> None:  # noqa: F811
    c = Customer.objects.using(db).create(name="a", email=EMAIL)
    loaded = Customer.objects.using(db).get(pk=c.pk)
    loaded.name = "b"
    with pytest.raises(errors.ConfigurationError):
        Customer.objects.using(db).bulk_update([loaded], ["name", "email"])
    assert loaded.__dict__["email"].plain is None  # never opened
    assert Customer.objects.using(db).bulk_update([loaded], ["name"]) == 1  # the other columns as usual
    assert Customer.objects.using(db).get(pk=c.pk).name == "b"


def test_an_upsert_on_the_primary_key_keeps_every_row_readable(tables: str) -> None:  # noqa: F811
    first = Member.objects.using(tables).create(login="alice", email=EMAIL)
    again = Member(id=first.pk, login="alice", email="new." + EMAIL)
    Member.objects.using(tables).bulk_create([again], update_conflicts=True, unique_fields=["id"],
                                             update_fields=["email", "email_bidx"])
    assert Member.objects.using(tables).get(pk=first.pk).email == "new." + EMAIL
    assert [m.pk for m in Member.objects.using(tables).find(email="new." + EMAIL)] == [first.pk]
    Member.objects.using(tables).bulk_create([Member(login="alice", email="x@example.com")], update_conflicts=True,
                                             unique_fields=["login"], update_fields=["login"])
    assert Member.objects.using(tables).get(pk=first.pk).email == "new." + EMAIL  # sealed columns untouched
    with pytest.raises(errors.ConfigurationError, match="primary key"):
        Member.objects.using(tables).bulk_create([Member(login="alice", email="y@example.com")],
                                                 update_conflicts=True, update_fields=["email"])
    with pytest.raises(errors.ConfigurationError, match="primary key"):  # a plain Manager: the column checks it
        Member._base_manager.using(tables).bulk_create([Member(login="alice", email="z@example.com")],
                                                       update_conflicts=True, unique_fields=["login"],
                                                       update_fields=["email_bidx"])
    assert Member.objects.using(tables).get(pk=first.pk).email == "new." + EMAIL
    assert [m.pk for m in Member.objects.using(tables).find(email="new." + EMAIL)] == [first.pk]


def test_a_multi_table_child_binds_to_its_parents_key(tables: str) -> None:  # noqa: F811
    branch: Any = Branch.objects.using(tables).create(name="b", email=EMAIL, level=1)
    assert Customer.objects.using(tables).get(pk=branch.pk).email == EMAIL  # read through the parent's table
    loaded: Any = Branch.objects.using(tables).defer("email").get(pk=branch.pk)
    assert loaded.email == EMAIL
    loaded.email = "new@example.com"
    loaded.level = 2
    loaded.save()
    assert [c.pk for c in Customer.objects.using(tables).find(email="new@example.com")] == [branch.pk]
    assert Branch.objects.using(tables).get(pk=branch.pk).email == "new@example.com"


@pytest.mark.parametrize("alias", ["sqlite"], indirect=True)  # a PostgreSQL bytea holds only bytes
def test_a_value_of_another_type_is_an_integrity_error_in_either_column(db: str) -> None:  # noqa: F811
    assert connections[db].vendor == "sqlite"
    c = Customer.objects.using(db).create(name="a", email=EMAIL)
    with connections[db].cursor() as cursor:  # an integer as large as a gigabyte of bytes() would allocate
        cursor.execute("UPDATE dj_customers SET email_bidx = 1000000000 WHERE id = %s", [_db_pk(db, c.pk)])
    with pytest.raises(errors.IntegrityError, match="email_bidx"):
        Customer.objects.using(db).get(pk=c.pk)
    assert Customer.objects.using(db).defer("email_bidx").get(pk=c.pk).email == EMAIL  # the rest still loads


def test_find_after_values_is_a_configuration_error(db: str) -> None:  # noqa: F811
    Customer.objects.using(db).create(email=EMAIL)
    for rows in (Customer.objects.using(db).values("email"), Customer.objects.using(db).values_list("pk")):
        with pytest.raises(errors.ConfigurationError, match="values"):
            rows.find(email=EMAIL)


def test_update_or_create_saves_the_blind_index_with_its_source(db: str) -> None:  # noqa: F811
    """Django adds every field with a pre_save of its own to update_or_create()'s update_fields:
    the term column is saved with the e-mail, the unchanged photo is left to the database."""
    c = Customer.objects.using(db).create(name="a", email=EMAIL, photo=b"\x01")
    photo = bytes(_raw(db, "photo", c.pk))
    _, created = Customer.objects.using(db).update_or_create(name="a", defaults={"email": "new@example.com"})
    assert not created
    assert [x.pk for x in Customer.objects.using(db).find(email="new@example.com")] == [c.pk]
    assert bytes(_raw(db, "photo", c.pk)) == photo


def refused_before_any_query(alias_name: str, attempts: list[Any]) -> None:
    """Each attempt is keymgr's ConfigurationError, carrying no plaintext, and none of them sent
    a single statement to the database."""
    with CaptureQueriesContext(connections[alias_name]) as queries:
        for attempt in attempts:
            with pytest.raises(errors.ConfigurationError) as caught:
                attempt()
            assert EMAIL not in str(caught.value)
    assert len(queries) == 0, [q["sql"] for q in queries]
