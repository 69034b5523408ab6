"""Shamir over GF(2^8): independent known answers, every subset, fewer-than-M, properties."""

from __future__ import annotations

import contextlib
import itertools
import json
import pickle
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keymgr
from keymgr.custody import shamir

KAT = json.loads((Path(__file__).parents[1] / "vectors" / "shamir" / "kat.json").read_text())["cases"]


def _naive_mul(a: int, b: int) -> int:
    """Schoolbook carry-less multiply then reduce: a second, independent reference."""
    product = 0
    for i in range(8):
        if (b >> i) & 1:
            product ^= a << i
    for bit in range(14, 7, -1):
        if (product >> bit) & 1:
            product ^= 0x11B << (bit - 8)
    return product


def test_field_multiplication_matches_reference_exhaustively() -> None:
    for a in range(256):
        for b in range(256):
            assert shamir.gf_mul(a, b) == _naive_mul(a, b)


def test_every_nonzero_element_has_its_inverse() -> None:
    for a in range(1, 256):
        assert shamir.gf_mul(a, shamir.gf_inv(a)) == 1


def _rng_from(data: bytes):
    position = 0

    def rng(count: int) -> bytes:
        nonlocal position
        out = data[position:position + count]
        position += count
        return out

    return rng


@pytest.mark.parametrize("case", KAT, ids=lambda c: f"{c['m']}of{c['n']}-{len(c['secret']) // 2}B")
def test_known_answers_from_independent_implementation(case: dict) -> None:
    secret = bytes.fromhex(case["secret"])
    shares = shamir._split_with_rng(secret, case["m"], case["n"], _rng_from(bytes.fromhex(case["coefficients"])))
    assert [(s.index, bytes(s.value).hex()) for s in shares] == [(s["index"], s["value"]) for s in case["shares"]]
    given_shares = [shamir.Share(s["index"], bytes.fromhex(s["value"])) for s in case["shares"]]
    subsets = list(itertools.combinations(given_shares, case["m"]))[:200]
    for subset in subsets:
        assert bytes(shamir.combine(subset, case["m"])) == secret


@pytest.mark.parametrize("m,n", [(2, 3), (3, 5), (5, 5), (2, 2)])
def test_every_m_subset_rebuilds_and_m_minus_one_does_not(m: int, n: int) -> None:
    secret = b"the transport key of the orders backup"
    shares = shamir.split(secret, m, n)
    for subset in itertools.combinations(shares, m):
        assert bytes(shamir.combine(list(subset), m)) == secret
    for subset in itertools.combinations(shares, m - 1):
        with pytest.raises(keymgr.PolicyError, match="needs"):
            shamir.combine(list(subset), m)
        # and interpolating M-1 shares as if they were a quorum gives a different secret
        if m - 1 >= 2:
            assert bytes(shamir.combine(list(subset), m - 1)) != secret


def test_m_minus_one_shares_are_consistent_with_every_secret_byte() -> None:
    """Information-theoretic: for one share of a 2-of-3 split, every secret byte is possible."""
    share = shamir.split(b"\x42", 2, 3)[0]
    possible = set()
    for candidate in range(256):
        # the line through (0, candidate) and (x, y) exists for every candidate
        slope = shamir.gf_mul(share.value[0] ^ candidate, shamir.gf_inv(share.index))
        assert shamir.gf_mul(slope, share.index) ^ candidate == share.value[0]
        possible.add(candidate)
    assert len(possible) == 256


def test_errors() -> None:
    with pytest.raises(keymgr.ConfigurationError):
        shamir.split(b"x", 1, 3)
    with pytest.raises(keymgr.ConfigurationError):
        shamir.split(b"x", 4, 3)
    with pytest.raises(keymgr.ConfigurationError):
        shamir.split(b"x", 2, 256)
    with pytest.raises(keymgr.ConfigurationError):
        shamir.split(b"", 2, 3)
    a, b, _ = shamir.split(b"secret", 2, 3)
    with pytest.raises(keymgr.PolicyError, match="twice"):
        shamir.combine([a, a], 2)
    short = shamir.Share(b.index, bytes(b.value)[:-1])
    with pytest.raises(keymgr.FormatError):
        shamir.combine([a, short], 2)
    with pytest.raises(keymgr.FormatError):
        shamir.Share(0, b"x")


def test_share_bytes_round_trip_and_malformed() -> None:
    share = shamir.split(b"abc", 2, 3)[1]
    assert shamir.Share.from_bytes(share.to_bytes()) == share
    data = share.to_bytes()
    for bad in (b"", data[:-1], data + b"x", b"\x02" + data[1:], data[:1] + b"\x00" + data[2:]):
        with pytest.raises(keymgr.FormatError):
            shamir.Share.from_bytes(bad)


def test_share_is_hidden_unpicklable_and_wipeable() -> None:
    share = shamir.split(b"\x13\x37" * 8, 2, 3)[0]
    assert bytes(share.value).hex() not in repr(share) and "value" not in repr(share)
    with pytest.raises(TypeError):
        pickle.dumps(share)
    share.wipe()
    assert bytes(share.value) == bytes(16)


def test_commitments_identify_a_wrong_share() -> None:
    a, b, c = shamir.split(b"key material", 2, 3)
    context = b"backup 1234"
    commitments = [shamir.share_commitment(s, context=context) for s in (a, b, c)]
    assert all(shamir.verify_share(s, cm, context) for s, cm in zip((a, b, c), commitments))
    tampered = shamir.Share(b.index, bytes([b.value[0] ^ 1]) + bytes(b.value[1:]))
    assert not shamir.verify_share(tampered, commitments[1], context)
    assert not shamir.verify_share(a, commitments[0], b"another backup")
    assert not shamir.verify_share(a, commitments[1], context)


@settings(max_examples=60, deadline=None)
@given(secret=st.binary(min_size=1, max_size=64), m=st.integers(2, 6), extra=st.integers(0, 4), data=st.data())
def test_property_any_m_shares_rebuild(secret: bytes, m: int, extra: int, data: st.DataObject) -> None:
    n = m + extra
    shares = shamir.split(secret, m, n)
    subset = data.draw(st.permutations(shares)).copy()[:m]
    assert bytes(shamir.combine(subset, m)) == secret


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_property_share_parser_raises_only_keymgr_errors(data: bytes) -> None:
    with contextlib.suppress(keymgr.KeymgrError):
        shamir.Share.from_bytes(data)
