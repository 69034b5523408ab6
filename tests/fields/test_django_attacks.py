"""keymgr.fields.django under the findings of an outside review: one test per finding (each
failed before its fix).

Each test states what a Django developer does in ordinary code and what must hold: the row stays
findable by its blind index, a value written stays readable, no plaintext reaches an encrypted
column or a query parameter, and a bad value read from the database is keymgr's own error.
Runs on the module fixtures of tests/fields/test_django.py (SQLite, and PostgreSQL with -m slow)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections, models  # noqa: E402
from django.db.models import Value  # noqa: E402

from keymgr import errors  # noqa: E402
from keymgr.fields.django import BlindIndexField, EncryptedManager, EncryptedTextField  # noqa: E402
from tests.fields.test_django import EMAIL, Customer, _db_pk, _raw, alias, db  # noqa: F401 - fixtures

#: the Django integration's tests (a Django project set up per module, real SQLite and
#: PostgreSQL) run in CI; `pytest -m "not slow"` leaves them out (with them it took 143 s
#: instead of 105 s: they also slow the tests after them)
pytestmark = pytest.mark.slow


class Member(models.Model):
    """A model with a unique column besides its primary key (a login): the upsert's conflict target."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    login = models.CharField(max_length=50, unique=True)
    email = EncryptedTextField(cipher="customers", null=True)
    email_bidx = BlindIndexField(source="email", index="customers-email")
    objects = EncryptedManager()

    class Meta:
        app_label = "keymgr_django_tests"
        db_table = "dj_r16_members"


class VipCustomer(Customer):
    class Meta:
        proxy = True
        app_label = "keymgr_django_tests"


class Branch(Customer):
    """Multi-table inheritance: the encrypted fields live in the parent's table."""

    level = models.IntegerField(default=0)

    class Meta:
        app_label = "keymgr_django_tests"
        db_table = "dj_r16_branches"


@pytest.fixture
def tables(db: str) -> Iterator[str]:  # noqa: F811 - the imported fixture
    with connections[db].schema_editor() as editor:
        editor.create_model(Member)
        editor.create_model(Branch)
    yield db
    with connections[db].schema_editor() as editor:
        editor.delete_model(Branch)
        editor.delete_model(Member)


def test_saving_an_instance_loaded_with_its_source_deferred_keeps_its_blind_index(db: str) -> None:  # noqa: F811
    pk = Customer.objects.using(db).create(name="a", email=EMAIL).pk
    term = bytes(_raw(db, "email_bidx", pk))
    loaded = Customer.objects.using(db).defer("email").get(pk=pk)
    loaded.name = "renamed"  # an ordinary update of another column, the e-mail never read
    loaded.save()
    assert _raw(db, "email_bidx", pk) is not None and bytes(_raw(db, "email_bidx", pk)) == term
    assert [c.pk for c in Customer.objects.using(db).find(email=EMAIL)] == [pk]


def test_save_with_update_fields_of_the_source_updates_its_blind_index(db: str) -> None:  # noqa: F811
    pk = Customer.objects.using(db).create(name="a", email=EMAIL).pk
    loaded = Customer.objects.using(db).get(pk=pk)
    loaded.email = "new." + EMAIL
    # Corrected by the fix (H3b): Django gives a field no way to add its index column to a save's
    # update_fields, so saving the changed source without its term is refused before anything is
    # written (the row stays findable by the value it holds); saved with it, the term follows.
    with pytest.raises(errors.ConfigurationError):
        loaded.save(update_fields=["email"])
    assert [c.pk for c in Customer.objects.using(db).find(email=EMAIL)] == [pk]
    loaded.save(update_fields=["email", "email_bidx"])
    assert [c.pk for c in Customer.objects.using(db).find(email="new." + EMAIL)] == [pk]


def test_an_upsert_on_another_unique_column_never_leaves_an_unreadable_row(tables: str) -> None:
    db_alias = tables
    Member.objects.using(db_alias).create(login="alice", email=EMAIL)
    with contextlib.suppress(errors.KeymgrError):  # refusing the upsert is fine: the row keeps its old value
        Member.objects.using(db_alias).bulk_create([Member(login="alice", email="new." + EMAIL)],
                                                   update_conflicts=True, unique_fields=["login"],
                                                   update_fields=["email", "email_bidx"])
    assert Member.objects.using(db_alias).get(login="alice").email in (EMAIL, "new." + EMAIL)


def test_plaintext_in_a_value_expression_never_reaches_the_column(db: str) -> None:  # noqa: F811
    pk = Customer.objects.using(db).create(name="a", email="x@example.com").pk
    with pytest.raises(errors.KeymgrError):
        Customer.objects.using(db).filter(pk=pk).update(email=Value(EMAIL))
    assert EMAIL.encode() not in bytes(_raw(db, "email", pk))
    loaded = Customer.objects.using(db).get(pk=pk)
    loaded.email = Value(EMAIL)
    with pytest.raises(errors.KeymgrError):
        Customer.objects.using(db).bulk_update([loaded], ["email"])
    assert EMAIL.encode() not in bytes(_raw(db, "email", pk))


def test_plaintext_in_a_value_expression_is_never_a_query_parameter(db: str) -> None:  # noqa: F811
    with pytest.raises(errors.KeymgrError):
        list(Customer.objects.using(db).filter(email=Value(EMAIL)))


@pytest.mark.parametrize("alias", ["sqlite"], indirect=True)  # a PostgreSQL bytea holds only bytes
def test_a_value_of_another_type_in_the_column_is_a_keymgr_error(db: str) -> None:  # noqa: F811
    assert connections[db].vendor == "sqlite"
    pk = Customer.objects.using(db).create(name="a", email=EMAIL).pk
    with connections[db].cursor() as cursor:  # what another program (or an attacker) may write there
        cursor.execute("UPDATE dj_customers SET email = 'some text' WHERE id = %s", [_db_pk(db, pk)])
    with pytest.raises(errors.KeymgrError):
        Customer.objects.using(db).get(pk=pk).email  # noqa: B018


def test_a_proxy_model_copy_under_a_new_primary_key_is_sealed_again(db: str) -> None:  # noqa: F811
    pk = Customer.objects.using(db).create(name="a", email=EMAIL).pk
    copy = VipCustomer.objects.using(db).get(pk=pk)
    copy.pk = uuid.uuid4()
    copy.save(force_insert=True)
    assert Customer.objects.using(db).get(pk=copy.pk).email == EMAIL


def test_a_multi_table_child_of_a_model_with_encrypted_fields_saves_and_reads(tables: str) -> None:
    branch: Any = Branch.objects.using(tables).create(name="b", email=EMAIL, level=1)
    assert Branch.objects.using(tables).get(pk=branch.pk).email == EMAIL


def test_an_instance_loaded_before_a_reencrypt_pass_and_saved_after_it_stays_readable(
        db: str, km_a: Any, key_name: str) -> None:  # noqa: F811
    """A request loads a customer, the operator runs ``keymgr fields rewrap --reencrypt`` (which
    deletes the old data keys), the request then saves the customer: the row must still open."""
    import sqlalchemy as sa

    from keymgr.fields import chain, collapse_spaces, unicode_fold
    from keymgr.fields.bulk import reencrypt_table, rewrap_keys
    from keymgr.fields.django import DjangoKeyStore, register
    from keymgr.fields.sql import BlindIndexTerm, EncryptedBytes, EncryptedTable, EncryptedText, SqlKeyStore
    from tests.fields.test_django import _sqlalchemy_url

    pk = Customer.objects.using(db).create(name="a", email=EMAIL).pk
    request = Customer.objects.using(db).get(pk=pk)
    km_a.rotate(key_name)
    engine = sa.create_engine(_sqlalchemy_url(db))
    try:
        table = sa.Table("dj_customers", sa.MetaData(), sa.Column("id", sa.Uuid, primary_key=True),
                         sa.Column("name", sa.String(50)), sa.Column("email", EncryptedText),
                         sa.Column("photo", EncryptedBytes), sa.Column("email_bidx", BlindIndexTerm))
        index = km_a.blind_index(f"{key_name}-email", bits=6, normalise=chain(collapse_spaces, unicode_fold))
        codec = EncryptedTable(table, km_a.fields(key_name, store=SqlKeyStore(engine)),
                               indexes={"email_bidx": (index, "email")})
        rewrap_keys(codec.cipher, codec.cipher.store)
        assert reencrypt_table(engine, codec, batch=10).keys_deleted >= 1
    finally:
        engine.dispose()
    request.name = "renamed"
    request.save()
    # a restart: a new cipher, with none of the old process's cached data keys
    register(ciphers={"customers": km_a.fields(key_name, store=DjangoKeyStore(db))})
    assert Customer.objects.using(db).get(pk=pk).email == EMAIL
