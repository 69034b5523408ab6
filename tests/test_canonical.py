"""keymgr._canonical: the one canonical JSON writes the bytes each of the three encoders it replaced wrote.

Keyring facts, audit entries and custody documents were encoded by three functions
(``keyring.canonical``, ``audit._entry.canonical``, ``custody._json.canonical``); their
MACs, hash chains and signatures cover those bytes, so the one encoder must write the
same bytes for every document, or records and logs made before would stop verifying.
The three old encoders are kept here, verbatim, as the reference.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keymgr import errors
from keymgr._canonical import canonical_json
from keymgr.custody._json import load_document
from tests.fuzz.seeds import seeds


def _old_keyring(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _old_audit_entry(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _old_custody(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


OLD = (_old_keyring, _old_audit_entry, _old_custody)

#: Every JSON value: any text (non-ASCII, control characters, lone surrogates), integers far
#: beyond 64 bits, finite floats, and nesting.
_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text())
JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(), inner, max_size=6),
                    max_leaves=40)


@settings(max_examples=400, deadline=None)
@given(JSON)
def test_the_old_encoders_and_the_new_one_agree(value: Any) -> None:
    new = canonical_json(value)
    assert all(old(value) == new for old in OLD)
    assert json.loads(new) == value


@pytest.mark.parametrize("kind", ["backup", "request", "approval", "audit"])
def test_the_documents_keymgr_writes_encode_as_before(kind: str) -> None:
    """Real documents (the fuzz seeds: a backup file, requests, approvals, audit lines), parsed and
    encoded again: the same bytes from every encoder, and the bytes that were read."""
    documents = seeds()[kind]
    assert documents
    for raw in documents:
        value = json.loads(raw)
        new = canonical_json(value)
        assert all(old(value) == new for old in OLD)
        assert new == raw.rstrip(b"\n")


@pytest.mark.parametrize("constant", [math.nan, math.inf, -math.inf])
def test_nan_and_infinities_are_refused_both_ways(constant: float) -> None:
    """Not JSON (RFC 8259 section 6): the encoder refuses them, and a custody document holding one is a
    FormatError (nothing keymgr writes holds a float, so no existing document changes)."""
    with pytest.raises(ValueError):
        canonical_json({"value": constant})
    text = json.dumps({"format": "keymgr-request/1", "value": constant}).encode()
    with pytest.raises(errors.FormatError, match="not JSON"):
        load_document(text, "request", format="keymgr-request/1", limit=1024)
