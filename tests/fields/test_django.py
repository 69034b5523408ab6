"""keymgr.fields.django on real databases (SQLite and a throwaway PostgreSQL, tests/_postgres.py)
and a real SoftHSM token: values sealed to their row in pre_save, opened on access, blind-index
lookups, bulk_create, plaintext refused on the paths that bypass pre_save."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fields import _django_project  # noqa: F401 - skips without Django; configures it

# isort: split
from django.conf import settings
from django.db import connections, models, transaction

from keymgr import errors
from keymgr.fields import OVERHEAD, chain, collapse_spaces, unicode_fold
from keymgr.fields.django import (
    BlindIndexField,
    DjangoKeyStore,
    EncryptedBinaryField,
    EncryptedManager,
    EncryptedTextField,
    Stored,
    register,
)

#: the Django integration's tests (a Django project set up per module, real SQLite and
#: PostgreSQL) run in CI; `pytest -m "not slow"` leaves them out (with them it took 143 s
#: instead of 105 s: they also slow the tests after them)
pytestmark = pytest.mark.slow

EMAIL = "alice.secret@example.com"


class Customer(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    name = models.CharField(max_length=50, default="")
    email = EncryptedTextField(cipher="customers", null=True)
    photo = EncryptedBinaryField(cipher="customers", null=True)
    email_bidx = BlindIndexField(source="email", index="customers-email")
    objects = EncryptedManager()

    class Meta:
        app_label = "keymgr_django_tests"
        db_table = "dj_customers"


class Counter(models.Model):
    """A model whose primary key the database makes: its values cannot be bound before the insert."""

    secret = EncryptedTextField(cipher="customers")

    class Meta:
        app_label = "keymgr_django_tests"
        db_table = "dj_counters"


MODELS = (Customer, Counter)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def alias(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database alias with the models' tables and the data-key table; dropped at the end."""
    if request.param == "sqlite":
        name = "default"
        settings.DATABASES[name]["NAME"] = str(tmp_path_factory.mktemp("django") / "fields.db")
    else:
        name = "pg"
        settings.DATABASES[name]["HOST"] = str(request.getfixturevalue("postgres").socket_dir)
    with connections[name].schema_editor() as editor:
        for model in MODELS:
            editor.create_model(model)
    DjangoKeyStore(name).create()
    yield name
    with connections[name].schema_editor() as editor:
        for model in MODELS:
            editor.delete_model(model)
    connections[name].close()


@pytest.fixture
def db(alias: str, km_a: Any, key_name: str) -> Iterator[str]:
    """Empty tables, and the cipher and index registered under a fresh key of the test's token."""
    km_a.create_key(key_name)
    register(ciphers={"customers": km_a.fields(key_name, store=DjangoKeyStore(alias))},
             indexes={"customers-email": km_a.blind_index(f"{key_name}-email", bits=6,
                                                          normalise=chain(collapse_spaces, unicode_fold))})
    yield alias
    for model in MODELS:
        model.objects.using(alias).all().delete()


def _raw(alias: str, column: str, pk: uuid.UUID) -> Any:
    """What the database holds in ``column`` of a row (not through the field)."""
    with connections[alias].cursor() as cursor:
        cursor.execute(f"SELECT {column} FROM dj_customers WHERE id = %s", [_db_pk(alias, pk)])
        return cursor.fetchone()[0]


def _db_pk(alias: str, pk: uuid.UUID) -> Any:
    return pk if connections[alias].vendor == "postgresql" else pk.hex  # SQLite: char(32)


def test_round_trip_stores_only_sealed_values(db: str) -> None:
    c = Customer(name="a", email=EMAIL, photo=b"\x00jpeg")
    c.save(using=db)
    stored = bytes(_raw(db, "email", c.pk))
    assert len(stored) == len(EMAIL) + OVERHEAD and EMAIL.encode() not in stored
    assert b"jpeg" not in bytes(_raw(db, "photo", c.pk))
    again = Customer.objects.using(db).get(pk=c.pk)
    assert isinstance(again.__dict__["email"], Stored)  # sealed until read
    assert again.email == EMAIL and again.photo == b"\x00jpeg"
    again.email = "bob@example.com"
    again.save(using=db)
    assert Customer.objects.using(db).get(pk=c.pk).email == "bob@example.com"


def test_saving_an_unread_value_writes_it_back_unchanged(db: str) -> None:
    c = Customer.objects.using(db).create(email=EMAIL)
    before = bytes(_raw(db, "email", c.pk)), bytes(_raw(db, "email_bidx", c.pk))
    loaded = Customer.objects.using(db).get(pk=c.pk)
    loaded.name = "renamed"
    loaded.save(using=db)
    assert (bytes(_raw(db, "email", c.pk)), bytes(_raw(db, "email_bidx", c.pk))) == before
    assert isinstance(loaded.__dict__["email"], Stored) and loaded.__dict__["email"].plain is None  # never opened


def test_bulk_create_and_find_by_blind_index(db: str) -> None:
    people = [Customer(name=str(i), email=f"user{i}@example.com") for i in range(80)]
    Customer.objects.using(db).bulk_create(people)
    found = Customer.objects.using(db).find(email="  USER17@Example.COM")
    assert [c.pk for c in found] == [people[17].pk] and found[0].email == "user17@example.com"
    term = Customer.objects.using(db).get(pk=people[17].pk).email_bidx
    bucket = Customer.objects.using(db).filter(email_bidx=term).count()
    assert bucket >= 1  # 6 bits over 80 e-mails: false positives dropped by find()
    assert Customer.objects.using(db).filter(name__in=["1", "2"]).find(email="user17@example.com") == []
    assert Customer.objects.using(db).find(email_bidx="nobody@example.com") == []


def test_find_queries_every_index_version_after_a_rotation(db: str) -> None:
    old = Customer.objects.using(db).create(email="old@example.com")
    from keymgr.fields.django._registry import _indexes

    index = _indexes["customers-email"]
    index.rotate()
    new = Customer.objects.using(db).create(email="new@example.com")
    assert Customer.objects.using(db).get(pk=old.pk).email_bidx[0] == 1
    assert Customer.objects.using(db).get(pk=new.pk).email_bidx[0] == 2
    assert [c.pk for c in Customer.objects.using(db).find(email="old@example.com")] == [old.pk]
    assert [c.pk for c in Customer.objects.using(db).find(email="new@example.com")] == [new.pk]


def test_a_value_moved_to_another_row_does_not_decrypt(db: str) -> None:
    a = Customer.objects.using(db).create(email=EMAIL)
    b = Customer.objects.using(db).create(email="b@example.com")
    with connections[db].cursor() as cursor:
        cursor.execute("UPDATE dj_customers SET email = (SELECT email FROM dj_customers WHERE id = %s) "
                       "WHERE id = %s", [_db_pk(db, a.pk), _db_pk(db, b.pk)])
    moved = Customer.objects.using(db).get(pk=b.pk)
    with pytest.raises(errors.IntegrityError) as caught:
        _ = moved.email
    assert EMAIL not in str(caught.value)
    assert Customer.objects.using(db).get(pk=a.pk).email == EMAIL


def test_a_copy_under_a_new_primary_key_is_sealed_again(db: str) -> None:
    original = Customer.objects.using(db).create(email=EMAIL)
    copy = Customer.objects.using(db).get(pk=original.pk)
    copy.pk = uuid.uuid4()  # before the value was ever read: it is still bound to the original row
    copy.save(using=db, force_insert=True)
    assert bytes(_raw(db, "email", copy.pk)) != bytes(_raw(db, "email", original.pk))
    assert Customer.objects.using(db).get(pk=copy.pk).email == EMAIL
    assert [c.pk for c in Customer.objects.using(db).find(email=EMAIL)] in ([original.pk, copy.pk],
                                                                           [copy.pk, original.pk])


def test_null_values_stay_null_and_have_no_term(db: str) -> None:
    c = Customer.objects.using(db).create(email=None)
    assert _raw(db, "email", c.pk) is None and _raw(db, "email_bidx", c.pk) is None
    loaded = Customer.objects.using(db).get(pk=c.pk)
    assert loaded.email is None and loaded.photo is None and loaded.email_bidx is None
    assert Customer.objects.using(db).filter(email__isnull=True).count() == 1
    with pytest.raises(errors.ConfigurationError):
        Customer.objects.using(db).find(email=None)
    loaded.email = EMAIL  # a term appears with the value
    loaded.save(using=db)
    assert _raw(db, "email_bidx", c.pk) is not None
    assert [x.pk for x in Customer.objects.using(db).find(email=EMAIL)] == [c.pk]


def test_a_model_without_a_client_generated_key_is_refused(db: str) -> None:
    with pytest.raises(errors.ConfigurationError, match="no primary key yet") as caught:
        Counter(secret=EMAIL).save(using=db)
    assert EMAIL not in str(caught.value)
    assert Counter.objects.using(db).count() == 0


def test_plaintext_is_refused_where_pre_save_is_bypassed(db: str) -> None:
    c = Customer.objects.using(db).create(email=EMAIL)
    sealed = bytes(_raw(db, "email", c.pk))
    c.email = "changed@example.com"
    attempts = [lambda: Customer.objects.using(db).filter(email=EMAIL).count(),
                lambda: Customer.objects.using(db).filter(pk=c.pk).update(email="x@example.com"),
                lambda: Customer.objects.using(db).bulk_update([c], ["email"]),
                lambda: Customer.objects.using(db).filter(email_bidx=b"\x01\x02").count(),
                lambda: Customer.objects.using(db).filter(email__icontains="alice").count(),
                lambda: Customer.objects.using(db).filter(email__startswith="alice").count(),
                lambda: Customer.objects.using(db).filter(email__gt="alice").count(),
                lambda: Customer.objects.using(db).filter(email__lower="alice").count(),
                lambda: Customer.objects.using(db).filter(email_bidx__contains=b"\x01").count()]
    for attempt in attempts:
        with pytest.raises(errors.ConfigurationError) as caught:
            attempt()
        assert EMAIL not in str(caught.value) and "x@example.com" not in str(caught.value)
    assert bytes(_raw(db, "email", c.pk)) == sealed
    with pytest.raises(errors.ConfigurationError):
        Customer(email=b"bytes into a text field").save(using=db)
    with pytest.raises(errors.ConfigurationError):
        Customer(photo="text into a bytes field").save(using=db)


def test_nothing_shows_the_plaintext(db: str) -> None:
    c = Customer.objects.using(db).create(email=EMAIL)
    field = Customer._meta.get_field("email")
    values = list(Customer.objects.using(db).values_list("email", flat=True))
    assert isinstance(values[0], Stored)
    loaded = Customer.objects.using(db).get(pk=c.pk)
    assert loaded.email == EMAIL  # opened: the plaintext is cached in the instance's Stored value
    shown = [repr(field), str(field), repr(values), repr(loaded), str(loaded), repr(loaded.__dict__["email"]),
             repr(Customer._meta.get_field("email_bidx")), repr(loaded.email_bidx)]
    assert not any(EMAIL in text or "alice" in text for text in shown), shown
    import pickle

    assert EMAIL.encode() not in pickle.dumps(loaded.__dict__["email"])
    with pytest.raises(errors.ConfigurationError):
        field.value_to_string(loaded)  # dumpdata would write the plaintext


def test_the_data_key_row_survives_a_rolled_back_transaction(db: str) -> None:
    class Rollback(Exception):
        pass

    with pytest.raises(Rollback), transaction.atomic(using=db):
        Customer.objects.using(db).create(email="rolled-back@example.com")  # makes the data key
        raise Rollback
    kept = Customer.objects.using(db).create(email=EMAIL)  # the same data key, cached
    assert Customer.objects.using(db).get(pk=kept.pk).email == EMAIL
    assert DjangoKeyStore(db).count(Customer._meta.get_field("email").cipher.key) == 1


def test_unregistered_names_and_bad_registrations_are_configuration_errors(db: str) -> None:
    with pytest.raises(errors.ConfigurationError, match="no cipher registered"):
        EncryptedTextField(cipher="nobody").cipher  # noqa: B018
    with pytest.raises(errors.ConfigurationError):
        register(ciphers={"x": "not a cipher"})  # type: ignore[dict-item]
    with pytest.raises(errors.ConfigurationError):
        Customer.objects.using(db).find(name="a")
    with pytest.raises(errors.ConfigurationError):
        Customer.objects.using(db).find(email="a", email_bidx="b")


def test_deconstruct_keeps_the_registered_names() -> None:
    _, path, _, kwargs = Customer._meta.get_field("email_bidx").deconstruct()
    assert path == "keymgr.fields.django.BlindIndexField"
    assert kwargs == {"source": "email", "index": "customers-email", "db_index": True}
    assert Customer._meta.get_field("email").deconstruct()[3]["cipher"] == "customers"
    assert Customer.check() == [] and Counter.check() == []  # Django's system checks


def test_public_names_keep_the_path_migrations_and_pickles_record() -> None:
    """keymgr.fields.django is a package (one module per concept); a migration written when it was
    one module names ``keymgr.fields.django.EncryptedTextField``, a pickled instance's values
    ``keymgr.fields.django.Stored``: both paths must still be the ones recorded and resolve."""
    import pickle
    import pickletools

    import keymgr.fields.django as package

    ours = [name for name in package.__all__ if name != "EncryptedManager"]  # made by Django's from_queryset
    assert {name: getattr(package, name).__module__ for name in ours} == dict.fromkeys(ours, "keymgr.fields.django")
    for field in (EncryptedTextField(cipher="c"), EncryptedBinaryField(cipher="c"),
                  BlindIndexField(source="email", index="i")):
        assert field.deconstruct()[1] == f"keymgr.fields.django.{type(field).__name__}"
    dumped = pickle.dumps(Stored(b"sealed", "row", "default"))
    names = [arg for op, arg, _ in pickletools.genops(dumped) if op.name in ("SHORT_BINUNICODE", "GLOBAL")]
    assert names[:2] == ["keymgr.fields.django", "Stored"]
    copy = pickle.loads(dumped)
    assert type(copy) is Stored and (copy.sealed, copy.row, copy.db) == (b"sealed", "row", "default")



def test_deferred_and_partial_saves(db: str) -> None:
    c = Customer.objects.using(db).create(name="a", email=EMAIL)
    deferred = Customer.objects.using(db).defer("email").get(pk=c.pk)
    assert "email" not in deferred.__dict__ and deferred.email == EMAIL  # loaded and opened on access
    only_name = Customer.objects.using(db).only("name").get(pk=c.pk)
    only_name.name = "b"
    only_name.save(using=db)  # saves the loaded fields only: the encrypted ones untouched
    again = Customer.objects.using(db).get(pk=c.pk)
    assert (again.name, again.email) == ("b", EMAIL)
    again.email = "new@example.com"
    again.save(using=db, update_fields=["email", "email_bidx"])
    assert [x.pk for x in Customer.objects.using(db).find(email="new@example.com")] == [c.pk]


def _sqlalchemy_url(alias: str) -> str:
    db = settings.DATABASES[alias]
    if alias == "pg":
        return f"postgresql+psycopg://{db['USER']}@/{db['NAME']}?host={db['HOST']}"
    return f"sqlite:///{db['NAME']}"


def test_the_sqlalchemy_codec_and_the_django_fields_read_each_others_rows(db: str) -> None:
    """Both bind a value to (table, column, primary key as text) and a term to (table, column)."""
    sa = pytest.importorskip("sqlalchemy")
    from keymgr.fields.django._registry import _ciphers, _indexes
    from keymgr.fields.sql import BlindIndexTerm, EncryptedBytes, EncryptedTable, EncryptedText

    table = sa.Table("dj_customers", sa.MetaData(), sa.Column("id", sa.Uuid, primary_key=True),
                     sa.Column("name", sa.String(50)), sa.Column("email", EncryptedText),
                     sa.Column("photo", EncryptedBytes), sa.Column("email_bidx", BlindIndexTerm))
    codec = EncryptedTable(table, _ciphers["customers"], indexes={"email_bidx": (_indexes["customers-email"], "email")})
    from_django = Customer.objects.using(db).create(name="dj", email=EMAIL, photo=b"\x01")
    engine = sa.create_engine(_sqlalchemy_url(db))
    try:
        with engine.connect() as conn:
            found = codec.find(conn, "email_bidx", EMAIL.upper())
        assert [(r["id"], r["email"], r["photo"]) for r in found] == [(from_django.pk, EMAIL, b"\x01")]
        from_sqlalchemy = uuid.uuid4()
        with engine.begin() as conn:
            conn.execute(table.insert(), codec.encode_rows([{"id": from_sqlalchemy, "name": "sa",
                                                             "email": "sa@example.com", "photo": None}]))
    finally:
        engine.dispose()
    [row] = Customer.objects.using(db).find(email="SA@example.com")
    assert (row.pk, row.name, row.email, row.photo) == (from_sqlalchemy, "sa", "sa@example.com", None)


def _functions_of_the_column(db: str, secret: str) -> list[Any]:
    from django.db.models import OuterRef, Subquery, TextField, Value
    from django.db.models.functions import Cast, Substr
    from django.db.models.lookups import Exact

    rows = Customer.objects.using(db)
    column = Subquery(Customer.objects.filter(pk=OuterRef("pk")).values("email")[:1])
    return [lambda: rows.annotate(e=Cast("email", TextField())).filter(e=secret),
            lambda: rows.annotate(e=Substr("email", 1, 40)).filter(e__icontains=secret),
            lambda: rows.values("name").filter(Exact(Value(secret), column))]


def test_functions_and_subqueries_of_the_column_are_refused(db: str) -> None:
    """The third review's Cast / Substr / Subquery, on each database: refused when compiled, the
    plaintext in no query."""
    from django.test.utils import CaptureQueriesContext

    Customer.objects.using(db).create(email=EMAIL)
    for query in _functions_of_the_column(db, EMAIL):
        with CaptureQueriesContext(connections[db]) as captured, pytest.raises(errors.ConfigurationError):
            list(query())
        assert not any(EMAIL in q["sql"] for q in captured.captured_queries)


def test_a_receiver_changing_the_source_is_checked_after_it(db: str) -> None:
    """A pre_save receiver connected after the model (the application's) that changes the source
    during save(update_fields=["email"]) is refused; with the index named, the term follows."""
    from django.db.models.signals import pre_save

    def rename(sender: Any, instance: Any, **kwargs: Any) -> None:
        instance.email = "renamed@example.com"

    pk = Customer.objects.using(db).create(email=EMAIL).pk
    pre_save.connect(rename, sender=Customer)
    try:
        with pytest.raises(errors.ConfigurationError, match="blind index"):
            Customer.objects.using(db).get(pk=pk).save(update_fields=["email"])
        assert Customer.objects.using(db).get(pk=pk).email == EMAIL
        Customer.objects.using(db).get(pk=pk).save(update_fields=["email", "email_bidx"])
    finally:
        pre_save.disconnect(rename, sender=Customer)
    assert [c.pk for c in Customer.objects.using(db).find(email="renamed@example.com")] == [pk]
