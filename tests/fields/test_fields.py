"""keymgr.fields on a real SoftHSM token: the field form, context binding, data-key sharing and rewrap,
blind indexes (normalisation, partial, compound, rotation, key attributes), masking."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from keymgr import errors
from keymgr.fields import (
    OVERHEAD,
    FieldCipher,
    MemoryKeyStore,
    Place,
    chain,
    collapse_spaces,
    digits_only,
    last_digits,
    lowercase,
    mask,
    mask_card,
    mask_email,
    mask_phone,
)
from keymgr.fields._format import field_aad, unpack
from keymgr.hsm import objects
from tests._internals import token_of

CARD = "6222 0212 3456 1234"  # 19 bytes


def test_round_trip_and_size(km_a, key_name) -> None:
    km_a.create_key(key_name)
    cipher = km_a.fields(key_name, store=MemoryKeyStore())
    place = Place("customers", "card", "row-1")
    value = cipher.encrypt(CARD, place)
    assert len(CARD.encode()) == 19
    assert len(value) == 19 + OVERHEAD == 56
    assert cipher.decrypt_text(value, place) == CARD
    assert cipher.decrypt(cipher.encrypt(b"", place), place) == b""
    assert CARD.encode() not in value


def test_each_value_has_its_own_nonce_and_values_share_a_data_key(km_a, key_name) -> None:
    km_a.create_key(key_name)
    store = MemoryKeyStore()
    cipher = km_a.fields(key_name, store=store)
    place = Place("t", "c", "r")
    values = [cipher.encrypt(CARD, place) for _ in range(50)]
    assert len({unpack(v)[1] for v in values}) == 50
    assert len({unpack(v)[0] for v in values}) == 1
    assert len(store) == 1


@pytest.mark.parametrize("moved", [Place("customers", "card", "row-2"), Place("customers", "email", "row-1"),
                                   Place("orders", "card", "row-1"), Place("customers", "card", "row-1",
                                                                           {"tenant": "b"})])
def test_a_value_moved_to_another_place_does_not_decrypt(km_a, key_name, moved: Place) -> None:
    km_a.create_key(key_name)
    cipher = km_a.fields(key_name, store=MemoryKeyStore())
    value = cipher.encrypt(CARD, Place("customers", "card", "row-1"))
    with pytest.raises(errors.IntegrityError) as caught:
        cipher.decrypt(value, moved)
    assert CARD not in str(caught.value)


def test_aad_is_unambiguous() -> None:
    ref = bytes(8)
    assert field_aad(ref, "k", Place("ab", "c", "r")) != field_aad(ref, "k", Place("a", "bc", "r"))
    assert field_aad(ref, "k", Place("t", "c", "r")) != field_aad(ref, "k2", Place("t", "c", "r"))


@pytest.mark.slow
@pytest.mark.parametrize("edit", ["flip-tag", "flip-version", "truncate", "flip-ref", "empty"])
def test_tampered_values_are_one_integrity_error(km_a, key_name, edit: str) -> None:
    km_a.create_key(key_name)
    cipher = km_a.fields(key_name, store=MemoryKeyStore())
    place = Place("t", "c", "r")
    value = bytearray(cipher.encrypt(CARD, place))
    if edit == "flip-tag":
        value[-1] ^= 1
    elif edit == "flip-version":
        value[0] ^= 1
    elif edit == "truncate":
        del value[-1]
    elif edit == "flip-ref":
        value[1] ^= 1
    else:
        value = bytearray()
    with pytest.raises(errors.IntegrityError):
        cipher.decrypt(bytes(value), place)


def test_a_data_key_row_from_another_key_is_refused(km_a, key_name) -> None:
    km_a.create_key(key_name)
    km_a.create_key(key_name + "-other")
    store = MemoryKeyStore()
    ours = km_a.fields(key_name, store=store)
    other = km_a.fields(key_name + "-other", store=store)
    place = Place("t", "c", "r")
    value = other.encrypt(CARD, place)
    with pytest.raises(errors.IntegrityError):
        ours.decrypt(value, place)


def test_a_spliced_data_key_row_fails_its_commitment(km_a, key_name) -> None:
    km_a.create_key(key_name)
    store = MemoryKeyStore()
    cipher = km_a.fields(key_name, store=store, cache=None)
    place = Place("t", "c", "r")
    value = cipher.encrypt(CARD, place)
    cipher.close()
    (row,) = list(store)
    # another data key of the same KEK, carried by the row: its commitment no longer matches
    fresh = km_a.fields(key_name, store=MemoryKeyStore())
    fresh.encrypt("x", place)
    (other,) = list(fresh.store)  # type: ignore[call-overload]
    store.replace(type(row)(row.key_ref, row.key, other.recipient, row.commitment))
    reader = km_a.fields(key_name, store=store)
    with pytest.raises(errors.IntegrityError):
        reader.decrypt(value, place)


def _sealed_then_rotated(km, key: str) -> tuple[MemoryKeyStore, FieldCipher, Place, bytes]:
    """Key ``key`` made, a card sealed under version 1, then the key rotated: (store, cipher, place, value)."""
    km.create_key(key)
    store = MemoryKeyStore()
    cipher = km.fields(key, store=store)
    place = Place("t", "c", "r")
    value = cipher.encrypt(CARD, place)
    km.rotate(key)
    return store, cipher, place, value


def test_rotation_and_rewrap_leave_values_untouched(km_a, key_name) -> None:
    store, cipher, place, old = _sealed_then_rotated(km_a, key_name)
    new = cipher.encrypt(CARD, place)
    assert unpack(new)[0] != unpack(old)[0]  # a new data key under the new primary at once
    assert len(store) == 2
    moved = [cipher.rewrap(row) for row in store.scan(key_name)]
    assert sum(m is not None for m in moved) == 1
    for m in moved:
        if m is not None:
            store.replace(m)
    assert all(cipher.rewrap(row) is None for row in store.scan(key_name))  # idempotent
    km_a.retire(key_name, below=2, immediately=True)
    reader = km_a.fields(key_name, store=store)
    assert reader.decrypt_text(old, place) == CARD  # the same bytes, now under version 2
    assert reader.decrypt_text(new, place) == CARD


def test_retired_version_stops_decrypting_without_rewrap(km_a, key_name) -> None:
    store, cipher, place, old = _sealed_then_rotated(km_a, key_name)
    km_a.retire(key_name, below=2, immediately=True)
    with pytest.raises(errors.PolicyError):
        cipher.decrypt(old, place)  # also through the cached data key


def test_suspended_key_stops_a_cached_data_key(km_a, key_name) -> None:
    km_a.create_key(key_name)
    cipher = km_a.fields(key_name, store=MemoryKeyStore())
    place = Place("t", "c", "r")
    cipher.encrypt(CARD, place)
    km_a.suspend(key_name, 1)
    with pytest.raises(errors.PolicyError):
        cipher.encrypt(CARD, place)


def test_data_key_is_renewed_after_max_messages(km_a, key_name) -> None:
    from keymgr.envelope.cache import CachePolicy

    km_a.create_key(key_name)
    store = MemoryKeyStore()
    cipher = km_a.fields(key_name, store=store, cache=CachePolicy(max_messages=10))
    place = Place("t", "c", "r")
    values = [cipher.encrypt(str(i), place) for i in range(25)]
    assert len(store) == 3
    assert [cipher.decrypt_text(v, place) for v in values] == [str(i) for i in range(25)]


def test_field_operations_are_audited(km_a, key_name) -> None:
    km_a.create_key(key_name)
    cipher = km_a.fields(key_name, store=MemoryKeyStore())
    place = Place("t", "c", "r")
    with pytest.raises(errors.IntegrityError):
        cipher.decrypt(b"\x01" + bytes(40), place)
    log = km_a._audit.log
    assert log is not None
    log.flush()
    text = Path(log.path).read_text()  # type: ignore[attr-defined]
    assert '"op":"decrypt"' in text.replace(" ", "") and "failed" in text
    assert CARD not in text


# -- blind indexes -------------------------------------------------------------------------------


def test_blind_index_normalises_and_truncates(km_a, key_name) -> None:
    index = km_a.blind_index(key_name, bits=32, normalise=chain(collapse_spaces, lowercase))
    term = index.term("  Alice@Example.COM ")
    assert term == index.term("alice@example.com")
    assert term != index.term("bob@example.com")
    assert len(term) == 1 + 4 and term[0] == 1
    odd = km_a.blind_index(key_name + "-odd", bits=13)
    t = odd.term("x")
    assert len(t) == 1 + 2 and t[-1] & 0b111 == 0


def test_blind_index_partial_and_compound(km_a, key_name) -> None:
    last4 = km_a.blind_index(key_name, bits=16, transform=last_digits(4))
    assert last4.term("6222 0212 3456 1234") == last4.term("4111-1111-1111-1234")
    assert last4.term("6222 0212 3456 1234") != last4.term("6222 0212 3456 1235")
    both = km_a.blind_index(key_name + "-c", bits=64, normalise=lowercase)
    assert both.term(("Smith", "1234")) == both.term(["SMITH", "1234"])
    assert both.term(("ab", "c")) != both.term(("a", "bc"))
    assert digits_only("+33 (0)6 12") == "330612"


def test_blind_index_is_keyed_per_name(km_a, key_name) -> None:
    a = km_a.blind_index(key_name + "-a", bits=64)
    b = km_a.blind_index(key_name + "-b", bits=64)
    assert a.term("x") != b.term("x")
    again = km_a.blind_index(key_name + "-a", bits=64)
    assert again.term("x") == a.term("x") and again.key_ids() == a.key_ids()


def test_blind_index_rotation_queries_both_versions(km_a, key_name) -> None:
    index = km_a.blind_index(key_name, bits=64, normalise=lowercase)
    old = index.term("alice@example.com")
    assert index.rotate() == 2
    new = index.term("Alice@example.com")
    assert new[0] == 2 and old[0] == 1 and new != old
    terms = index.terms("alice@example.com")
    assert old in terms and new in terms
    assert index.matches(old, "ALICE@example.com")
    later = km_a.blind_index(key_name, bits=64, normalise=lowercase, min_version=2)
    assert later.terms("alice@example.com") == [new]


def test_index_key_is_sensitive_and_never_extractable(km_a, key_name) -> None:
    index = km_a.blind_index(key_name, bits=32)
    (key_id,) = index.key_ids()
    info = objects.key_attributes(token_of(km_a), key_id)
    attrs = info.attributes
    assert attrs["SENSITIVE"] is True and attrs["EXTRACTABLE"] is False
    assert attrs["NEVER_EXTRACTABLE"] is True and attrs["ALWAYS_SENSITIVE"] is True
    assert attrs["SIGN"] is True and attrs["ENCRYPT"] is False and attrs["DERIVE"] is False


def test_pkcs11_tool_shows_the_index_key_sensitive_never_extractable(km_a, softhsm, key_name) -> None:
    tool = shutil.which("pkcs11-tool")
    if tool is None:
        if os.environ.get("KEYMGR_REQUIRE_INTEROP") == "1":
            pytest.fail("pkcs11-tool (opensc) is missing and KEYMGR_REQUIRE_INTEROP=1")
        pytest.skip("pkcs11-tool (opensc) not installed")
    index = km_a.blind_index(key_name, bits=32)
    (key_id,) = index.key_ids()
    out = subprocess.run([tool, "--module", softhsm.module_path, "--token-label", softhsm.label, "--login", "--pin",
                          softhsm.user_pin, "--list-objects", "--type", "secrkey", "--id", key_id.hex()],
                         capture_output=True, text=True, env={**os.environ, **softhsm.env}, timeout=60)
    assert out.returncode == 0, out.stderr
    objects_shown = out.stdout.split("Secret Key Object")
    (block,) = [b for b in objects_shown if f"label:      keymgr-index/{key_name}/v1\n" in b]
    access = next(line for line in block.splitlines() if line.strip().startswith("Access:"))
    flags = {flag.strip() for flag in access.split(":", 1)[1].split(",")}
    assert {"sensitive", "always sensitive", "never extractable", "local"} <= flags, access
    assert "extractable" not in flags, access


# -- masking ---------------------------------------------------------------------------------------


def test_masking() -> None:
    assert mask_card("6222021234561234") == "6222 **** **** 1234"
    assert mask_card("6222 0212 3456 1234", keep_start=9) == "6222 02** **** 1234"  # never more than six
    assert mask_email("alice@example.com") == "a***@example.com"
    assert mask_phone("+33 6 12 34 56 78") == "+** * ** ** ** 78"
    assert mask("abc") == "***"
    assert mask("secret-id-99", keep_end=2) == "**********99"


def test_bits_range_follows_ciphersweets_planner() -> None:
    from keymgr.fields.index import bits_range

    assert bits_range(50_000) == (8, 15)  # CipherSweet's blind-index planner example
    assert bits_range(100_000) == (9, 16)
    assert bits_range(10_000) == (7, 13)  # a last-four-digits index: 10,000 possible inputs
    with pytest.raises(errors.ConfigurationError):
        bits_range(3)


def test_term_cache_gives_the_tokens_terms_and_forgets_them_on_rotation(km_a, key_name) -> None:
    cached = km_a.blind_index(key_name, bits=64, transform=last_digits(4))
    uncached = km_a.blind_index(key_name, bits=64, transform=last_digits(4), cache=0)
    first = cached.term_many(["6222 0000 0000 1234", "4111 1111 1111 1234", None, "x 9999"])
    assert first[0] == first[1] == uncached.term("1234") and first[2] is None
    assert cached.term("…1234") == first[0]  # a hit: same bytes
    cached.rotate()
    assert cached.term("1234")[0] == 2 and cached.term("1234") != first[0]


@pytest.mark.slow
@pytest.mark.parametrize("value", [5, 1.5, ["x"], object()])
def test_values_other_than_text_or_bytes_are_refused(km_a, key_name, value) -> None:
    km_a.create_key(key_name)
    cipher = km_a.fields(key_name, store=MemoryKeyStore())
    with pytest.raises(errors.ConfigurationError):
        cipher.encrypt(value, Place("t", "c", "r"))


@pytest.mark.parametrize("host_subkeys", [True, False])
def test_a_lone_surrogate_is_a_configuration_error_for_a_blind_index(km_a, key_name, host_subkeys: bool) -> None:
    """Not a UnicodeEncodeError, whose text would carry the whole value."""
    index = km_a.blind_index(f"{key_name}-i", bits=8, host_subkeys=host_subkeys)
    for call in (lambda: index.term("secret\ud800"), lambda: index.terms("secret\ud800"),
                 lambda: index.term_many(["ok", ("a", "secret\ud800")])):
        with pytest.raises(errors.ConfigurationError) as caught:
            call()
        assert "secret" not in str(caught.value)


def test_another_instances_rotation_is_seen_after_the_refresh_interval(km_a, key_name, monkeypatch) -> None:
    from keymgr.fields import index as index_module

    writer = km_a.blind_index(key_name, bits=64)
    reader = km_a.blind_index(key_name, bits=64)
    writer.rotate()
    new = writer.term("x")
    assert new not in reader.terms("x")  # within the interval: the versions this instance knows
    monkeypatch.setattr(index_module, "REFRESH_INTERVAL", 0.0)
    assert new in reader.terms("x") and reader.term("x") == new


def test_a_planted_index_key_with_a_known_value_is_never_used(km_a, key_name) -> None:
    """A PIN holder imports an HMAC key they know under the next version's label: keymgr ignores
    it (keys under keymgr's singleton labels must prove the token made them), and a rotation
    generates a genuine key for that version beside it instead of computing attacker-known terms."""
    from keymgr.hsm.templates import INDEX_KEY
    from tests._known_keys import import_secret_key

    index = km_a.blind_index(key_name, bits=64)
    before = index.term("alice@example.com")
    planted = os.urandom(12)
    import_secret_key(token_of(km_a), INDEX_KEY, label=f"keymgr-index/{key_name}/v2", key_id=planted,
                      value=bytes(32))
    again = km_a.blind_index(key_name, bits=64)
    assert again.version == 1 and again.term("alice@example.com") == before
    assert again.rotate() == 2
    assert planted not in again.key_ids(2) and again.key_ids(2)
    assert objects.key_attributes(token_of(km_a), again.key_ids(2)[0]).attributes["LOCAL"] is True
    assert again.term("alice@example.com") != before


def test_rate_limits_count_field_decryptions_through_the_data_key_cache(softhsm, key_name) -> None:
    import keymgr
    from keymgr.audit import RateLimit

    with keymgr.KeyManager(softhsm.uri()) as setup:
        setup.create_key(key_name)
    with keymgr.KeyManager(softhsm.uri(), rate_limits={key_name: RateLimit(max_ops=5, per=3600)}) as km:
        cipher = km.fields(key_name, store=MemoryKeyStore())
        place = Place("t", "c", "r")
        value = cipher.encrypt(CARD, place)
        for _ in range(5):
            assert cipher.decrypt_text(value, place) == CARD  # one unwrap, then cache hits
        with pytest.raises(errors.PolicyError, match="refused"):
            cipher.decrypt(value, place)


@pytest.mark.parametrize("limit", [1, 2, 4])
def test_max_messages_counts_values_not_rows(km_a, key_name, limit: int) -> None:
    from keymgr.envelope.cache import CachePolicy

    km_a.create_key(key_name)
    store = MemoryKeyStore()
    cipher = km_a.fields(key_name, store=store, cache=CachePolicy(max_messages=limit))
    sealed = [cipher.encrypt_row({"a": "1", "b": "2", "c": "3"}, table="t", row=str(i)) for i in range(4)]
    refs = [unpack(v)[0] for row in sealed for v in row.values() if v is not None]
    uses = {ref: refs.count(ref) for ref in refs}
    assert max(uses.values()) <= limit
    assert cipher.decrypt_row(sealed[3], table="t", row="3", text={"a", "b", "c"}) == {"a": "1", "b": "2", "c": "3"}


# -- review of issue 16: normalisers, input errors, contexts, masking, planner -----------------------


def test_unicode_fold_and_decimal_digits() -> None:
    from keymgr.fields import unicode_fold

    assert unicode_fold("ＡＬＩＣＥ@Example.COM") == unicode_fold("alice@example.com") == "alice@example.com"
    assert unicode_fold("ali\u200bce@exa\ufeffmple.com") == "alice@example.com"
    assert unicode_fold("STRASSE") == unicode_fold("straße")
    assert digits_only("１２３４") == "1234"  # full-width
    assert digits_only("\u0661\u0662\u0663\u0664") == "1234"  # Arabic-Indic
    assert digits_only("12²³") == "12"  # superscripts are no digits of a number
    assert last_digits(4)("card ６２２２ ０２１２ ３４５６ １２３４") == "1234"


def test_docs_email_normaliser_finds_unicode_variants(km_a, key_name) -> None:
    from keymgr.fields import unicode_fold

    index = km_a.blind_index(key_name, bits=64, normalise=chain(collapse_spaces, unicode_fold))
    assert index.term(" ＡＬＩＣＥ@example.com\u200b") == index.term("alice@example.com")


@pytest.mark.parametrize("bad", [None, 5, [], [5], ("a", None)])
def test_blind_index_bad_input_is_a_configuration_error(km_a, key_name, bad) -> None:
    index = km_a.blind_index(key_name, bits=32)
    with pytest.raises(errors.ConfigurationError):
        index.term(bad)
    with pytest.raises(errors.ConfigurationError):
        index.terms(bad)


def test_a_normaliser_returning_none_is_a_configuration_error(km_a, key_name) -> None:
    index = km_a.blind_index(key_name, bits=32, normalise=lambda value: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(errors.ConfigurationError, match="normaliser"):
        index.term("x")


def test_min_version_above_the_newest_is_refused(km_a, key_name) -> None:
    km_a.blind_index(key_name, bits=32)
    with pytest.raises(errors.ConfigurationError, match="no version 2"):
        km_a.blind_index(key_name, bits=32, min_version=2)


def test_terms_are_bound_to_their_context(km_a, key_name) -> None:
    from keymgr.fields.index import index_context

    index = km_a.blind_index(key_name, bits=64)
    acme = index_context("accounts", "email_bidx", "tenant", "acme")
    globex = index_context("accounts", "email_bidx", "tenant", "globex")
    other_table = index_context("orders", "email_bidx", "tenant", "acme")
    terms = {index.term("x", context=c) for c in (acme, globex, other_table, b"")}
    assert len(terms) == 4
    assert index.term("x", context=acme) in index.terms("x", context=acme)
    assert index.term("x", context=acme) not in index.terms("x", context=globex)


def test_bytes_are_indexed_as_bytes(km_a, key_name) -> None:
    index = km_a.blind_index(key_name, bits=64)
    assert index.term(b"\x00\x01") != index.term(str(b"\x00\x01"))
    assert index.normalised(b"AB") == (b"AB",)


@pytest.mark.parametrize("value", [None, "not bytes", 5])
def test_decrypting_something_not_bytes_is_a_configuration_error(km_a, key_name, value) -> None:
    km_a.create_key(key_name)
    cipher = km_a.fields(key_name, store=MemoryKeyStore())
    with pytest.raises(errors.ConfigurationError):
        cipher.decrypt(value, Place("t", "c", "r"))


def test_rewrap_refuses_a_row_relabelled_from_another_key(km_a, key_name) -> None:
    from keymgr.fields.keys import StoredKey

    km_a.create_key(key_name)
    km_a.create_key(key_name + "-other")
    store = MemoryKeyStore()
    other = km_a.fields(key_name + "-other", store=store)
    other.encrypt(CARD, Place("t", "c", "r"))
    (row,) = list(store)
    ours = km_a.fields(key_name, store=store)
    with pytest.raises(errors.IntegrityError, match=row.key_ref.hex()):
        ours.rewrap(StoredKey(row.key_ref, key_name, row.recipient, row.commitment))


def test_masking_shows_only_the_card_number_and_never_most_of_a_short_value() -> None:
    assert mask_card("6222 0212 3456 1234 cvv 987 exp 12/27") == "6222 **** **** 1234"
    assert "987" not in mask_card("card 6222021234561234, CVV 987")
    assert mask_card("1234") == "****"  # no card number: nothing shown
    assert mask_card("6222021234567891234") == "6222 **** **** *** 1234"  # 19 digits: last four a group
    assert mask_card("622202123456") == "62** **** 3456"  # 12 digits: six hidden at least
    assert mask("abcde") == "*****" and mask("abcdefgh") == "****efgh"
    assert mask_email("al@example.com") == "***@example.com"
    assert mask_phone("12 34") == "** **"
    with pytest.raises(errors.ConfigurationError):
        mask("secret", char="")
    from keymgr.fields import masking

    assert not hasattr(masking, "last_digits") and masking.trailing_digits("a1b2c3d4e5") == "2345"


def test_bits_range_keeps_two_values_a_term_at_a_power_of_two() -> None:
    from keymgr.fields.index import bits_range

    assert bits_range(2 ** 16)[1] == 15
    assert bits_range(2 ** 16 + 1)[1] == 16
    assert bits_range(4) == (1, 1)


def test_closing_the_manager_wipes_field_keys_and_subkeys_and_stops_their_use(softhsm, key_name) -> None:
    """km.close() wipes what the field ciphers and indexes it handed out hold, and they refuse
    to work on (a closed manager's cipher once went on encrypting, re-deriving subkeys)."""
    import keymgr

    km = keymgr.KeyManager(softhsm.uri())
    km.create_key(key_name)
    cipher = km.fields(key_name, store=MemoryKeyStore())
    index = km.blind_index(f"{key_name}-ix", bits=16)
    place = Place("t", "c", "r")
    value = cipher.encrypt(CARD, place)
    index.term("x", context=b"t")
    current = cipher._current  # noqa: SLF001 - what close must wipe
    assert current is not None and index.held_subkeys == 1
    km.close()
    assert repr(current.dek) == "DataKey(AES-256, wiped)" and index.held_subkeys == 0
    for use in (lambda: cipher.encrypt(CARD, place), lambda: cipher.decrypt(value, place),
                lambda: index.term("x", context=b"t")):
        with pytest.raises(errors.ConfigurationError, match="closed"):
            use()
    assert index.held_subkeys == 0
