"""Blind-index subkeys on a real SoftHSM token: terms computed on the host under a subkey the token
derives per (version, context) agree with an independent computation from the token's HMAC; the
token-only mode agrees with its own; the subkey cache's limits, zeroing, rotation and close."""

from __future__ import annotations

import hmac
import struct
from pathlib import Path

import pytest

from keymgr import errors
from keymgr.fields import lowercase
from keymgr.fields.index import index_context
from keymgr.fields.subkeys import SubkeyCache, SubkeyPolicy
from keymgr.hsm import objects
from tests._internals import audited, token_of


def _lp(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


def _trunc(version: int, mac: bytes, bits: int) -> bytes:
    whole, rest = divmod(bits, 8)
    out = mac[:whole] + (bytes((mac[whole] & (0xFF << (8 - rest)) & 0xFF,)) if rest else b"")
    return bytes((version,)) + out


def _expected_host_term(km, key_id: bytes, name: str, bits: int, context: bytes, part: str, version: int = 1) -> bytes:
    """docs/format.md's formula, written out again: the subkey from the token's C_Sign, the term on the host."""
    subkey = objects.hmac_sha256(token_of(km), key_id, b"keymgr-blind-index\x03" + _lp(name.encode()) + _lp(context))
    message = b"keymgr-blind-index\x04" + _lp(name.encode()) + struct.pack(">H", bits) + _lp(part.encode())
    return _trunc(version, hmac.digest(subkey, message, "sha256"), bits)


def _expected_token_term(km, key_id: bytes, name: str, bits: int, context: bytes, part: str) -> bytes:
    message = (b"keymgr-blind-index\x05" + _lp(name.encode()) + struct.pack(">H", bits) + _lp(context)
               + _lp(part.encode()))
    return _trunc(1, objects.hmac_sha256(token_of(km), key_id, message), bits)


class _Derivations:
    """Counts the subkey derivations a block makes in the token (the real C_Sign: this wraps, never
    replaces, the call; the audit log's own MACs are not counted)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = objects.hmac_sha256

        def counted(ts, key_id, data):  # type: ignore[no-untyped-def]
            self.count += data.startswith(b"keymgr-blind-index\x03")
            return real(ts, key_id, data)

        monkeypatch.setattr(objects, "hmac_sha256", counted)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("context", [b"", index_context("customers", "email_bidx", "tenant", "acme")],
                         ids=["unbound", "bound"])
@pytest.mark.parametrize("bits", [13, 256])
def test_a_host_term_is_the_hmac_under_the_subkey_the_token_derives(km_a, key_name, context, bits) -> None:
    index = km_a.blind_index(key_name, bits=bits, normalise=lowercase)
    (key_id,) = index.key_ids()
    term = index.term("Alice@Example.com", context=context)
    assert term == _expected_host_term(km_a, key_id, key_name, bits, context, "alice@example.com")
    assert index.terms("alice@example.com", context=context) == [term]
    assert index.term_many(["ALICE@example.com", None], context=context) == [term, None]


def test_token_only_mode_computes_each_term_in_the_token_and_differs_from_host_terms(km_a, key_name) -> None:
    context = index_context("customers", "email_bidx")
    token_only = km_a.blind_index(key_name, bits=64, host_subkeys=False, cache=0)
    host = km_a.blind_index(key_name, bits=64)
    (key_id,) = token_only.key_ids()
    term = token_only.term("x", context=context)
    assert term == _expected_token_term(km_a, key_id, key_name, 64, context, "x")
    assert term != host.term("x", context=context)  # the documented choice: switching modes is a re-encryption
    assert token_only.held_subkeys == 0 and host.held_subkeys == 1
    assert token_only.matches(term, "x", context=context) and not host.matches(term, "x", context=context)


def test_two_contexts_get_unrelated_subkeys_and_terms(km_a, key_name) -> None:
    index = km_a.blind_index(key_name, bits=256)
    (key_id,) = index.key_ids()
    acme, globex = (index_context("t", "c", "tenant", who) for who in ("acme", "globex"))
    values = [f"user{i}@example.com" for i in range(20)]
    a, g = index.term_many(values, context=acme), index.term_many(values, context=globex)
    assert not set(a) & set(g) and len(set(a)) == 20
    assert index.held_subkeys == 2
    assert a[3] == _expected_host_term(km_a, key_id, key_name, 256, acme, values[3])


def test_one_derivation_per_context_then_host_hmacs_only(km_a, key_name, monkeypatch) -> None:
    index = km_a.blind_index(key_name, bits=32)
    calls = _Derivations(monkeypatch)
    context = index_context("t", "c")
    index.term_many([f"v{i}" for i in range(500)], context=context)
    index.terms("v1", context=context)
    index.term("v2", context=context)
    assert calls.count == 1
    index.term("v2")  # another context: another subkey
    assert calls.count == 2


def test_each_derivation_is_one_audit_entry_and_no_subkey_is_logged(km_a, key_name) -> None:
    index = km_a.blind_index(key_name, bits=32)
    (key_id,) = index.key_ids()
    for context in (b"", index_context("t", "c")):
        index.term_many(["a", "b", "c"], context=context)
        index.terms("a", context=context)
    log = km_a._audit.log
    assert log is not None
    log.flush()
    text = Path(log.path).read_text().replace(" ", "")  # type: ignore[attr-defined]
    mine = [line for line in text.splitlines() if f'"key":"{key_name}"' in line]  # the log is the token's
    assert sum('"op":"index-subkey"' in line for line in mine) == 2
    subkey = objects.hmac_sha256(token_of(km_a), key_id, b"keymgr-blind-index\x03" + _lp(key_name.encode()) + _lp(b""))
    assert subkey.hex() not in text and subkey.hex() not in repr(index) + repr(index._subkeys)


def test_subkey_cache_evicts_beyond_max_entries_and_zeroes_what_it_evicts() -> None:
    cache = SubkeyCache(SubkeyPolicy(max_age=300, max_entries=2))
    made: dict[str, bytearray] = {}

    def derive(slot: str):  # type: ignore[no-untyped-def]
        made[slot] = bytearray(slot.encode() * 32)[:32]
        return made[slot]

    first = cache.macs("a", lambda: derive("a"), [b"m"])
    assert first == [hmac.digest(b"a" * 32, b"m", "sha256")]
    cache.macs("b", lambda: derive("b"), [b"m"])
    cache.macs("a", lambda: pytest.fail("a is still cached"), [b"m"])  # a hit; "a" is now the newest
    cache.macs("c", lambda: derive("c"), [b"m"])  # evicts "b", the least recently used
    assert len(cache) == 2 and made["b"] == bytearray(32) and made["a"] == bytearray(b"a" * 32)
    cache.clear()
    assert len(cache) == 0 and made["a"] == made["c"] == bytearray(32)


def test_subkey_cache_derives_again_after_max_age_and_zeroes_the_old_subkey() -> None:
    clock = _Clock()
    cache = SubkeyCache(SubkeyPolicy(max_age=10, max_entries=5), clock=clock)
    old, new = bytearray(b"\x11" * 32), bytearray(b"\x22" * 32)
    cache.macs("s", lambda: old, [b"m"])
    clock.now += 9.9
    assert cache.macs("s", lambda: new, [b"m"]) == [hmac.digest(b"\x11" * 32, b"m", "sha256")]
    clock.now += 0.1
    assert cache.macs("s", lambda: new, [b"m"]) == [hmac.digest(b"\x22" * 32, b"m", "sha256")]
    assert old == bytearray(32) and new == bytearray(b"\x22" * 32)


def test_a_subkey_used_once_goes_after_max_age_at_the_next_use_of_any_slot() -> None:
    """max_age bounds how long *every* subkey stays, also one whose context is never used again."""
    clock = _Clock()
    cache = SubkeyCache(SubkeyPolicy(max_age=10, max_entries=5), clock=clock)
    once, other, third = bytearray(b"\x11" * 32), bytearray(b"\x22" * 32), bytearray(b"\x33" * 32)
    cache.macs("used once", lambda: once, [b"m"])
    clock.now += 10
    cache.macs("another", lambda: other, [b"m"])
    assert once == bytearray(32) and len(cache) == 1
    clock.now += 10
    cache.expire()
    assert other == bytearray(32) and len(cache) == 0
    cache.macs("third", lambda: third, [b"m"])
    assert len(cache) == 1 and third != bytearray(32)


def test_a_subkey_derived_across_a_rotation_serves_its_call_and_is_not_kept() -> None:
    cache = SubkeyCache(SubkeyPolicy(max_age=10, max_entries=5), clock=_Clock())
    subkey = bytearray(b"\x44" * 32)

    def derive_while_rotating() -> bytearray:
        cache.clear()  # another thread rotates the index while the token derives
        return subkey

    assert cache.macs("s", derive_while_rotating, [b"m"]) == [hmac.digest(b"\x44" * 32, b"m", "sha256")]
    assert len(cache) == 0 and subkey == bytearray(32)


@pytest.mark.parametrize("policy", [(0, 10), (-1, 10), (10, 0)])
def test_subkey_limits_must_be_positive(policy) -> None:
    with pytest.raises(errors.ConfigurationError):
        SubkeyPolicy(*policy)


def test_an_index_derives_its_subkey_again_after_max_age(km_a, key_name, monkeypatch) -> None:
    from keymgr.fields.index import BlindIndex

    clock = _Clock()
    index = BlindIndex(token_of(km_a), name=key_name, bits=32, audited=lambda *a, **k: audited(km_a, *a, **k),
                       subkeys=SubkeyPolicy(max_age=60, max_entries=1), clock=clock)
    calls = _Derivations(monkeypatch)
    term = index.term("x")
    index.term("y", context=b"other")  # max_entries=1: the first subkey goes
    assert index.term("x") == term and calls.count == 3
    clock.now += 60
    assert index.term("x") == term and calls.count == 4


def test_rotation_drops_subkeys_and_lookups_query_both_versions(km_a, key_name, monkeypatch) -> None:
    index = km_a.blind_index(key_name, bits=64)
    context = index_context("t", "c")
    old = index.term("x", context=context)
    assert index.held_subkeys == 1
    index.rotate()
    assert index.held_subkeys == 0
    (v2,) = index.key_ids(2)
    new = index.term("x", context=context)
    assert new == _expected_host_term(km_a, v2, key_name, 64, context, "x", version=2)
    assert index.terms("x", context=context) == [old, new] and index.held_subkeys == 2


def test_close_zeroes_the_subkeys(softhsm, key_name) -> None:
    import keymgr

    with keymgr.KeyManager(softhsm.uri()) as km:
        index = km.blind_index(key_name, bits=32)
        index.term("x")
        assert index.held_subkeys == 1
    assert index.held_subkeys == 0


@pytest.mark.parametrize("key_size", [0, 1, 31, 32, 63, 64])
def test_host_hmac_is_hmac_sha256_for_every_key_and_message_length(key_size: int) -> None:
    """The host HMAC (two keyed SHA-256 states copied per message) against the standard library's
    HMAC, for keys up to one block and messages across the block boundaries."""
    import os

    from keymgr.fields.subkeys import HostHmac

    key = bytearray(os.urandom(key_size))
    messages = [os.urandom(size) for size in (0, 1, 55, 56, 63, 64, 65, 119, 128, 1000)]
    assert HostHmac(key).macs(messages) == [hmac.digest(bytes(key), m, "sha256") for m in messages]
    assert repr(HostHmac(key)) == "HostHmac(sha256)"


def test_host_hmac_matches_rfc_4231_and_refuses_a_key_longer_than_a_block() -> None:
    from keymgr.fields.subkeys import HostHmac

    # RFC 4231, test case 2
    assert HostHmac(b"Jefe").macs([b"what do ya want for nothing?"]) == [bytes.fromhex(
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")]
    with pytest.raises(errors.ConfigurationError):
        HostHmac(bytes(65))


@pytest.mark.parametrize("host_subkeys", [True, False], ids=["host", "token"])
@pytest.mark.parametrize("bits", [1, 7, 8, 12, 15, 16, 255, 256])
def test_unmarked_terms_are_the_same_bytes_as_terms(km_a, key_name, bits: int, host_subkeys: bool) -> None:
    """``term_many(marked=False)`` (what insert_many writes) gives the bytes of ``term_many``'s
    Terms, as plain bytes, None for None, for every truncation."""
    from keymgr.fields.index import Term

    index = km_a.blind_index(key_name, bits=bits, normalise=lowercase, host_subkeys=host_subkeys)
    values = ["Alice@Example.com", None, "bob@example.com", "ALICE@example.com"]
    context = index_context("t", "c")
    marked = index.term_many(values, context=context)
    plain = index.term_many(values, context=context, marked=False)
    assert plain == marked and marked[0] == marked[3] and marked[1] is None
    assert all(type(t) is Term for t in marked if t is not None)
    assert all(type(t) is bytes for t in plain if t is not None)
    (key_id,) = index.key_ids()
    expected = (_expected_host_term if host_subkeys else _expected_token_term)(
        km_a, key_id, key_name, bits, context, "alice@example.com")
    assert plain[0] == expected and len(expected) == 1 + (bits + 7) // 8
