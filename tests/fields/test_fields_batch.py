"""FieldCipher.encrypt_rows, the batch path of a bulk insert, on a real SoftHSM token: places,
exact data-key limits across a batch, the key's state checked per batch, one audit entry per
batch with its counts, and all or nothing. (The database side: tests/test_fields_db.py,
``test_a_suspension_between_two_insert_batches_stops_the_second``.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from keymgr import errors
from keymgr.envelope.cache import CachePolicy
from keymgr.fields import MemoryKeyStore, Place
from keymgr.fields._format import unpack
from keymgr.fields.cipher import BATCH_MIN_ROWS, BATCH_VALUES, FieldCipher
from tests._internals import audited

COLUMNS = ("email", "card", "national_id")


def _rows(n: int, *, skip_every: int = 0) -> list[tuple[dict[str, str | None], str]]:
    """``n`` rows of three text columns; with ``skip_every``, national_id is None in every such row."""
    return [({"email": f"user{i}@example.com", "card": f"6222 0000 0000 {i:04d}",
              "national_id": None if skip_every and i % skip_every == 0 else f"ID-{i:08d}"}, f"row-{i}")
            for i in range(n)]


def _encrypt_entries(km: Any, key: str) -> list[dict[str, Any]]:
    """The audit log's encrypt entries of ``key`` (counts flushed first)."""
    log = km._audit.log
    assert log is not None
    log.flush()
    entries = [json.loads(line) for line in Path(log.path).read_text().splitlines() if line.strip()]
    return [e for e in entries if e.get("op") == "encrypt" and e.get("key") == key]


def test_values_sealed_in_a_batch_open_only_in_their_own_place(km_a, key_name) -> None:
    km_a.create_key(key_name)
    cipher = km_a.fields(key_name, store=MemoryKeyStore())
    rows = _rows(BATCH_MIN_ROWS + 4)
    sealed = cipher.encrypt_rows(rows, table="customers", extra={"tenant": "a"})
    assert len(sealed) == len(rows) and all(list(s) == list(COLUMNS) for s in sealed)
    assert len({unpack(v)[1] for s in sealed for v in s.values() if v is not None}) == 3 * len(rows)  # nonces
    back = cipher.decrypt_rows(list(zip(sealed, [r for _, r in rows], strict=True)), table="customers",
                               extra={"tenant": "a"}, text=set(COLUMNS))
    assert back == [values for values, _ in rows]
    value = sealed[7]["card"]
    assert value is not None
    for moved in (Place("customers", "card", "row-8", {"tenant": "a"}), Place("customers", "email", "row-7",
                                                                              {"tenant": "a"}),
                  Place("orders", "card", "row-7", {"tenant": "a"}), Place("customers", "card", "row-7",
                                                                           {"tenant": "b"}),
                  Place("customers", "card", "row-7")):
        with pytest.raises(errors.IntegrityError) as caught:
            cipher.decrypt(value, moved)
        assert "6222" not in str(caught.value)
    assert cipher.decrypt_text(value, Place("customers", "card", "row-7", {"tenant": "a"})) == rows[7][0]["card"]


@pytest.mark.parametrize("before", [0, 100])
def test_a_batch_crossing_max_messages_takes_a_new_data_key_mid_batch(km_a, key_name, before: int) -> None:
    km_a.create_key(key_name)
    store = MemoryKeyStore()
    cipher = km_a.fields(key_name, store=store, cache=CachePolicy(max_messages=500))
    first = [cipher.encrypt(f"v{i}", Place("t", "c", f"p{i}")) for i in range(before)]
    rows = _rows(300)  # 900 values: the current key to exactly 500 uses, then a second one
    sealed = cipher.encrypt_rows(rows, table="t")
    refs = [unpack(v)[0] for v in first] + [unpack(v)[0] for s in sealed for v in s.values() if v is not None]
    uses = {ref: refs.count(ref) for ref in refs}
    assert len(store) == 2 == len(uses)
    assert sorted(uses.values()) == sorted([500, before + 900 - 500])  # exact: no use of the first key wasted
    assert refs[:500] == [refs[0]] * 500
    opened = cipher.decrypt_rows(list(zip(sealed, [r for _, r in rows], strict=True)), table="t", text=set(COLUMNS))
    assert opened == [values for values, _ in rows]
    assert [cipher.decrypt_text(v, Place("t", "c", f"p{i}")) for i, v in enumerate(first)] == [
        f"v{i}" for i in range(before)]


def test_a_suspension_between_two_batches_stops_the_second_and_returns_nothing(km_a, key_name) -> None:
    """One call, two batches (more than BATCH_VALUES values): the key is suspended as the second
    batch's audited operation opens, so its one check of the key's state refuses it; the call
    returns nothing, so nothing of either batch can be written."""
    km_a.create_key(key_name)
    store = MemoryKeyStore()
    seen: list[dict[str, Any] | None] = []

    def audited_then_suspend(op: str, **kwargs: Any) -> Any:
        if op == "encrypt" and kwargs.get("detail"):
            seen.append(kwargs["detail"])
            if len(seen) == 2:
                km_a.suspend(key_name, 1)  # between the first batch and the second's check
        return audited(km_a, op, **kwargs)

    cipher = FieldCipher(key=key_name, store=store, protector=km_a._protector, rewrapper=km_a.rewrapper(),
                         audited=audited_then_suspend, on_unwrap=km_a._audit.on_unwrap)
    rows = _rows(BATCH_VALUES // 3 + 10)
    with pytest.raises(errors.PolicyError):
        cipher.encrypt_rows(rows, table="t")
    assert [d["rows"] for d in seen if d] == [BATCH_VALUES // 3, 10]  # a row is never split across batches
    km_a.resume(key_name, 1)
    assert cipher.encrypt_rows(rows[:2], table="t")[0]["email"] is not None


def test_a_suspended_key_refuses_the_next_batch(km_a, key_name) -> None:
    km_a.create_key(key_name)
    cipher = km_a.fields(key_name, store=MemoryKeyStore())
    cipher.encrypt_rows(_rows(BATCH_MIN_ROWS), table="t")
    km_a.suspend(key_name, 1)
    for n in (1, BATCH_MIN_ROWS):  # the row-by-row path and the batch path
        with pytest.raises(errors.PolicyError):
            cipher.encrypt_rows(_rows(n), table="t")


def test_one_audit_entry_per_batch_with_its_counts(km_a, key_name) -> None:
    km_a.create_key(key_name)
    cipher = km_a.fields(key_name, store=MemoryKeyStore())
    before = len(_encrypt_entries(km_a, key_name))
    cipher.encrypt_rows(_rows(300, skip_every=3), table="t")  # 100 national ids are None: 800 values
    entries = _encrypt_entries(km_a, key_name)[before:]
    assert [(e["outcome"], e["detail"]) for e in entries] == [("ok", {"rows": 300, "values": 800})]
    rows = BATCH_VALUES // 3 + 1  # two batches: 16,383 values, then 3
    cipher.encrypt_rows(_rows(rows), table="t")
    entries = _encrypt_entries(km_a, key_name)[before + 1:]
    assert [e["detail"] for e in entries] == [{"rows": rows - 1, "values": 3 * (rows - 1)}, {"rows": 1, "values": 3}]
    cipher.encrypt_rows(_rows(10), table="t")  # under BATCH_MIN_ROWS: one aggregated operation a row
    (counted,) = _encrypt_entries(km_a, key_name)[before + 3:]
    assert counted["detail"]["aggregated"] is True and counted["detail"]["count"] == 10


def test_encrypt_entries_name_the_version_whose_primary_sealed(km_a, key_name) -> None:
    """Every encrypt entry (one value, a row, a batch) names the version that wrapped its data keys,
    a refusal the version refused, a decrypt the version that unwrapped (encrypts were null)."""
    km_a.create_key(key_name)
    cipher = km_a.fields(key_name, store=MemoryKeyStore())
    place = Place("t", "c", "r")
    first = cipher.encrypt("one", place)
    cipher.encrypt_rows(_rows(2), table="t")  # row by row: aggregated with the value above
    cipher.encrypt_rows(_rows(BATCH_MIN_ROWS), table="t")  # one batch entry
    km_a.rotate(key_name)
    cipher.encrypt("two", place)
    cipher.encrypt_rows(_rows(BATCH_MIN_ROWS), table="t")
    assert cipher.decrypt_text(first, place) == "one"
    km_a.suspend(key_name, 2)
    with pytest.raises(errors.PolicyError):
        cipher.encrypt("three", place)
    entries = _encrypt_entries(km_a, key_name)
    assert sorted((e["outcome"], e["version"], e["detail"].get("count", e["detail"].get("rows")))
                  for e in entries) == [("ok", 1, 3), ("ok", 1, BATCH_MIN_ROWS), ("ok", 2, 1),
                                        ("ok", 2, BATCH_MIN_ROWS), ("refused", 2, None)]
    log = km_a._audit.log
    decrypts = [e for e in map(json.loads, Path(log.path).read_text().splitlines())
                if e.get("op") == "decrypt" and e.get("key") == key_name]
    assert [(e["outcome"], e["version"]) for e in decrypts] == [("ok", 1)]


@pytest.mark.parametrize("bad", ["kind", "row", "column"])
@pytest.mark.parametrize("n", [3, BATCH_MIN_ROWS + 10])
def test_a_bad_row_in_a_batch_seals_nothing(km_a, key_name, bad: str, n: int) -> None:
    """Everything is checked before anything is sealed: no data key is made, nothing is returned,
    and the error (one failed audit entry) names no value."""
    km_a.create_key(key_name)
    store = MemoryKeyStore()
    cipher = km_a.fields(key_name, store=store, cache=CachePolicy(max_messages=3 * n))
    rows: list[tuple[dict[str, Any], str]] = list(_rows(n))
    k = n - 2
    if bad == "kind":
        rows[k] = ({**rows[k][0], "card": 6222000000001234}, rows[k][1])
    elif bad == "row":
        rows[k] = (rows[k][0], "")
    else:
        rows[k] = ({**rows[k][0], "": "x"}, rows[k][1])
    before = len(_encrypt_entries(km_a, key_name))
    with pytest.raises(errors.ConfigurationError) as caught:
        cipher.encrypt_rows(rows, table="t")
    assert "user" not in str(caught.value) and "6222" not in str(caught.value) and "ID-" not in str(caught.value)
    assert len(store) == 0
    assert [e["outcome"] for e in _encrypt_entries(km_a, key_name)[before:]] == ["failed"]
    good = _rows(n)
    sealed = cipher.encrypt_rows(good, table="t")  # the first data key still has all its 3n uses
    assert len(store) == 1
    assert cipher.decrypt_row(sealed[k], table="t", row=good[k][1], text=set(COLUMNS)) == good[k][0]


class _KeysOutOfOrder(dict):  # type: ignore[type-arg]
    """A mapping whose keys() runs in another order than its values() (dict subclasses may)."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(sorted(super().keys()))

    def keys(self):  # type: ignore[no-untyped-def]
        return sorted(super().keys())


def test_a_value_is_sealed_under_its_own_column_whatever_the_mapping(km_a, key_name) -> None:
    km_a.create_key(key_name)
    cipher = km_a.fields(key_name, store=MemoryKeyStore())
    row = _KeysOutOfOrder(email="alice@EMAIL", card="4111-CARD")
    for sealed in (cipher.encrypt_row(row, table="t", row="r1"), cipher.encrypt_rows([(row, "r1")], table="t")[0]):
        assert cipher.decrypt_text(sealed["email"], Place("t", "email", "r1")) == "alice@EMAIL"  # type: ignore[arg-type]
        assert cipher.decrypt_text(sealed["card"], Place("t", "card", "r1")) == "4111-CARD"  # type: ignore[arg-type]


@pytest.mark.parametrize("where", ["value", "row"])
def test_a_lone_surrogate_is_a_configuration_error_that_carries_no_text(km_a, key_name, where: str) -> None:
    km_a.create_key(key_name)
    cipher = km_a.fields(key_name, store=MemoryKeyStore())
    rows = _rows(BATCH_MIN_ROWS + 2)
    if where == "value":
        rows[77][0]["email"] = "SECRET\ud800PLAIN"
    else:
        rows[77] = (rows[77][0], "SECRETROW\udc80")
    with pytest.raises(errors.ConfigurationError) as caught:
        cipher.encrypt_rows(rows, table="t")
    assert "SECRET" not in repr(caught.value) and caught.value.__cause__ is None


def test_a_forked_child_seals_under_a_data_key_of_its_own(km_a, key_name) -> None:
    """The parent's current data key stays the parent's: a child that went on with it would spend
    the same use count (N forked workers: N x max_messages values under one key)."""
    import os

    km_a.create_key(key_name)
    store = MemoryKeyStore()
    cipher = km_a.fields(key_name, store=store)
    parent_ref = unpack(cipher.encrypt(b"before fork", Place("t", "c", "r0")))[0]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report which data key its first value names, and leave at once
        try:
            os.close(read)
            ref = unpack(cipher.encrypt(b"in the child", Place("t", "c", "r1")))[0]
            os.write(write, ref)
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child_ref = pipe.read()
    os.waitpid(pid, 0)
    assert child_ref and child_ref != parent_ref
    assert unpack(cipher.encrypt(b"after fork", Place("t", "c", "r2")))[0] == parent_ref


@pytest.mark.parametrize("bad", ["value", "row"])
def test_encode_rows_refuses_a_bad_row_before_any_term_is_computed(km_a, key_name, bad: str) -> None:
    """The codec checks every row (kinds, row identity, each value) before its blind indexes spend
    anything on the batch: no subkey derived, no ``index`` entry; then the good rows go through."""
    sa = pytest.importorskip("sqlalchemy")
    from keymgr.fields.sql import BlindIndexTerm, EncryptedTable, EncryptedText

    km_a.create_key(key_name)
    table = sa.Table("acct", sa.MetaData(), sa.Column("id", sa.String(40), primary_key=True),
                     sa.Column("email", EncryptedText), sa.Column("email_bidx", BlindIndexTerm))
    store = MemoryKeyStore()
    index = km_a.blind_index(f"{key_name}-email", bits=8)
    codec = EncryptedTable(table, km_a.fields(key_name, store=store), indexes={"email_bidx": (index, "email")})
    rows: list[dict[str, Any]] = [{"id": f"r{i}", "email": f"user{i}@example.com"} for i in range(5)]
    if bad == "value":
        rows[3]["email"] = "user3\ud800@example.com"  # str, so past the kind check; no valid UTF-8
    else:
        rows[3]["id"] = ""  # no row identity to bind to

    def index_entries() -> list[dict[str, Any]]:
        log = km_a._audit.log
        log.flush()
        return [e for e in map(json.loads, Path(log.path).read_text().splitlines())
                if e.get("key") == index.name and e.get("op") in ("index", "index-subkey")]

    before = len(index_entries())
    with pytest.raises(errors.ConfigurationError):
        codec.encode_rows(rows)
    assert index_entries()[before:] == [] and index.held_subkeys == 0 and len(store) == 0
    assert [e["outcome"] for e in _encrypt_entries(km_a, key_name)] == ["failed"]
    del rows[3]
    encoded = codec.encode_rows(rows)
    assert index.held_subkeys == 1 and [e["op"] for e in index_entries()[before:]] == ["index-subkey", "index"]
    assert codec.decode(encoded[2])["email"] == "user2@example.com"


@pytest.mark.parametrize("most", [1, 2, 5, 7, 1000])
@pytest.mark.parametrize("columns", [COLUMNS, None], ids=["columns", "own-keys"])
def test_batch_cuts_cover_every_row_once_within_the_limit(most: int, columns: tuple[str, ...] | None) -> None:
    """Spans of whole rows, in order, each with at most ``most`` values (a row with more alone),
    counts exact, None not counted: whether the batch fits in one span or not."""
    from keymgr.fields._batch import Batch

    rows = [{"a": "x" * i, "b": None if i % 3 else "y", "c": None if i % 4 == 1 else "z"} for i in range(23)]
    if columns is not None:
        rows = [{"email": r["a"], "card": r["b"], "national_id": r["c"]} for r in rows]
    batch = Batch("k", "t", rows, [f"row-{i}" for i in range(len(rows))], columns=columns)
    per_row = [sum(v is not None for v in r.values()) for r in rows]
    spans = list(batch.cuts(most))
    assert [r for start, stop, _ in spans for r in range(start, stop)] == list(range(len(rows)))
    for start, stop, count in spans:
        assert count == sum(per_row[start:stop])
        assert count <= most or stop - start == 1
    assert len(spans) == 1 if sum(per_row) <= most else len(spans) > 1
    assert list(Batch("k", "t", [], [], columns=columns).cuts(most)) == []


def test_a_close_while_a_batch_is_sealing_refuses_the_batch(km_a, key_name, monkeypatch) -> None:
    """The batch path seals with AES-GCM's own encrypt, taken once per span: a close() (another
    thread's KeyManager.close) after its second value must still refuse the batch, as a check
    per value did, so that nothing sealed under a wiped key is returned (and written)."""
    from keymgr.envelope._aead import DataKey

    km_a.create_key(key_name)
    cipher = km_a.fields(key_name, store=MemoryKeyStore())
    cipher.encrypt(b"warm", Place("t", "c", "r"))  # the data key exists before the batch
    real = DataKey.encryptor
    sealed = []

    def encryptor(self: DataKey) -> Any:
        encrypt = real(self)

        def counted(nonce: bytes, data: bytes, aad: bytes) -> bytes:
            sealed.append(1)
            if len(sealed) == 2:
                cipher.close()
            return encrypt(nonce, data, aad)
        return counted

    monkeypatch.setattr(DataKey, "encryptor", encryptor)
    with pytest.raises(errors.ConfigurationError, match="wiped"):
        cipher.encrypt_rows(_rows(BATCH_MIN_ROWS), table="t")
    assert len(sealed) == 3 * BATCH_MIN_ROWS  # the span ran to its end; its result was refused


def test_a_fork_while_a_thread_computes_terms_leaves_the_child_working(km_a, key_name) -> None:
    """Terms are computed under the subkey cache's lock: a child forked while another thread
    held it must not inherit it held (it would hang for good on its first term)."""
    import os
    import signal
    import threading

    index = km_a.blind_index(key_name, bits=16)
    expected = index.term("child@example.com")
    values = [f"user{i}@example.com" for i in range(50_000)]
    stop = threading.Event()
    worker = threading.Thread(target=lambda: [index.term_many(values) for _ in iter(stop.is_set, True)],
                              daemon=True)
    worker.start()
    try:
        statuses = []
        for _ in range(3):
            stop.wait(0.1)
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: its term, or SIGALRM's default action if it hangs
                try:
                    os.close(read)
                    signal.alarm(10)
                    os.write(write, index.term("child@example.com"))
                finally:
                    os._exit(0)
            os.close(write)
            with os.fdopen(read, "rb") as pipe:
                got = pipe.read()
            statuses.append((os.waitpid(pid, 0)[1], got))
    finally:
        stop.set()
        worker.join()
    assert statuses == [(0, expected)] * 3
