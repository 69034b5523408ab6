"""Every parser of custody files raises only keymgr errors on garbage (property-based).

Backup files, requests, approvals, transcripts and threshold recipients come
from outside (USB sticks, e-mail, tickets): whatever their bytes, reading them
may fail only with a :class:`~keymgr.errors.KeymgrError`, never with a stray
``KeyError`` or ``ValueError`` that the CLI would show as an internal error.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Any

import pytest
from asn1crypto import cms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keymgr import errors
from keymgr.custody.approvals import Approval, Request
from keymgr.custody.backup_file import BackupFile
from keymgr.custody.custodians import Register
from keymgr.custody.threshold import _Value, read_threshold
from keymgr.custody.transcript import verify_transcript
from keymgr.envelope import OID_THRESHOLD_RECIPIENT, other_recipient_info
from tests._internals import keyring_of

_REQUEST = {"format": "keymgr-request/1", "id": "00" * 16, "operation": "destroy",
            "keyring": {"token": "keymgr-A", "serial": "1"}, "key": "orders", "params": {"versions": [1]},
            "created": "2026-01-01T00:00:00Z", "expires": "2026-01-02T00:00:00Z", "requested_by": ""}
#: a request as keymgr request writes it now: with what it shows its approvers
_REQUEST_SHOWN = {**_REQUEST, "shows": {
    "quorum": {"threshold": 2, "custodians": [{"name": n, "fingerprint": f * 32, "token": f"{n}-usb", "serial": ""}
                                             for n, f in (("alice", "11"), ("bob", "22"))]},
    "keys": [{"version": 1, "id": "ab" * 16, "kcv": "0a1b2c", "state": "active"}]}}
_APPROVAL = {"format": "keymgr-approval/1", "request": "00" * 32, "custodian": "alice", "fingerprint": "11" * 32,
             "signed": "2026-01-01T00:00:00Z", "signature": "22" * 64}
_BACKUP = {"format": "keymgr-backup/1", "id": "00" * 16, "created": "x", "source": {"token": "A", "serial": "1"},
           "mechanism": "aes-kw", "quorum": {"threshold": 1, "custodians": ["a"]},
           "keys": [{"record": {"format": 1, "name": "k", "profile": "kw", "primary": 1, "generation": 1,
                                "versions": [{"version": 1, "id": "00" * 16, "state": "active", "created": "x"}]},
                     "versions": [{"version": 1, "wrapped": "00" * 40, "proof": "00" * 40}]}],
           "shares": [], "approvals": [], "mac": "00" * 32}

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                  max_size=4), max_leaves=12)


def _only_keymgr_errors(parse: Any, data: bytes) -> None:
    with contextlib.suppress(errors.KeymgrError):
        parse(data)


def _mutations(base: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """The document with one field (possibly nested) replaced by arbitrary JSON, or removed."""
    def mutate(path_value: tuple[list[str], Any, bool]) -> bytes:
        path, value, remove = path_value
        doc = json.loads(json.dumps(base))
        node = doc
        for key in path[:-1]:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and path:
            if remove:
                node.pop(path[-1], None)
            else:
                node[path[-1]] = value
        return json.dumps(doc).encode()

    keys = st.lists(st.sampled_from(sorted({k for k in base} | {"keyring", "token", "params", "versions", "quorum",
                                                                "threshold", "custodians", "record", "shows", "keys",
                                                                "kcv", "id", "fingerprint", "state", "version"})),
                    min_size=1, max_size=3)
    return st.tuples(keys, _json, st.booleans()).map(mutate)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=512), _mutations(_REQUEST), _mutations(_REQUEST_SHOWN)))
def test_request_parser(data: bytes) -> None:
    _only_keymgr_errors(Request.parse, data)


def test_what_an_approver_is_shown_carries_no_terminal_controls() -> None:
    """Free text in a request (who asked, a state) cannot hide or rewrite the lines above it."""
    doc = json.loads(json.dumps(_REQUEST_SHOWN))
    doc["requested_by"] = "ops\x1b[2K\x1b[1A\rall fine"
    doc["shows"]["keys"][0]["state"] = "active\x1b[8m"
    lines = Request.parse(json.dumps(doc).encode()).explain()
    assert not any(c in line for line in lines for c in "\x1b\r")
    assert any("DESTROY key 'orders' version(s) 1: irreversible" in line for line in lines)
    assert any(line.strip().startswith("requested by: ops\\x1b[2K") for line in lines)


def test_a_request_reads_back_what_it_shows() -> None:
    parsed = Request.parse(json.dumps(_REQUEST_SHOWN).encode())
    assert parsed.shows == _REQUEST_SHOWN["shows"]
    assert Request.parse(parsed.to_bytes()) == parsed
    assert Request.parse(json.dumps(_REQUEST).encode()).shows is None  # an older keymgr's request still reads


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=512), _mutations(_APPROVAL)))
def test_approval_parser(data: bytes) -> None:
    _only_keymgr_errors(Approval.parse, data)


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=512), _mutations(_BACKUP)))
def test_backup_parser(data: bytes) -> None:
    _only_keymgr_errors(BackupFile.parse, data)


@settings(max_examples=100, deadline=None)
@given(_json)
def test_register_parser(value: Any) -> None:
    with contextlib.suppress(errors.KeymgrError):
        Register.from_json(value)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=512))
def test_transcript_parser(data: bytes) -> None:
    _only_keymgr_errors(verify_transcript, data)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=256))
def test_transcript_parser_on_signed_data_shapes(tail: bytes) -> None:
    shell = cms.ContentInfo({"content_type": "signed_data", "content": {
        "version": "v1", "digest_algorithms": [{"algorithm": "sha256"}],
        "encap_content_info": {"content_type": "data", "content": tail}, "signer_infos": []}}).dump()
    _only_keymgr_errors(verify_transcript, shell)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=512))
def test_threshold_recipient_parser(value: bytes) -> None:
    try:
        ri = other_recipient_info(OID_THRESHOLD_RECIPIENT, value)
    except errors.KeymgrError:
        return
    with contextlib.suppress(errors.KeymgrError):
        read_threshold(ri)


_threshold_values = st.builds(
    lambda version, rid, threshold, shares: _Value({"version": version, "id": rid, "threshold": threshold,
                                                     "shares": shares}).dump(),
    st.integers(-1, 3), st.binary(min_size=14, max_size=18), st.integers(-2, 20),
    st.lists(st.fixed_dictionaries({"custodian": st.text(max_size=8), "public_key": st.binary(max_size=96),
                                    "index": st.integers(-2, 300), "commitment": st.binary(max_size=70),
                                    "sealed": st.binary(max_size=40)}), max_size=4))


@settings(max_examples=150, deadline=None)
@given(_threshold_values, st.integers(0, 10_000), st.integers(0, 255))
def test_threshold_recipient_parser_on_structured_values(value: bytes, at: int, byte: int) -> None:
    mutated = bytearray(value)
    mutated[at % len(mutated)] = byte
    for candidate in (value, bytes(mutated)):
        with contextlib.suppress(errors.KeymgrError):
            read_threshold(other_recipient_info(OID_THRESHOLD_RECIPIENT, candidate))


@pytest.fixture(scope="module")
def real_files() -> tuple[bytes, bytes]:
    """A real backup file and its signed transcript, made on the run's tokens."""
    from keymgr.custody.ceremony import backup_keys
    from keymgr.hsm.pins import Pin
    from tests.custody_helpers import approvals, guarded_key, hsm, request, so_pin

    km = hsm()
    name = f"fuzzed-{uuid.uuid4().hex[:8]}"
    guarded_key(km, name)
    req = request(km, "backup", name, versions=None)
    result = backup_keys(keyring_of(km), name, so_pin=Pin(so_pin()), request=req, approvals=approvals(km, req, 1, 3))
    return result.backup, result.transcript


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), min_size=1, max_size=4))
def test_real_files_with_bytes_changed(real_files: tuple[bytes, bytes], edits: list[tuple[int, int]]) -> None:
    for parse, original in ((BackupFile.parse, real_files[0]), (verify_transcript, real_files[1])):
        data = bytearray(original)
        for at, byte in edits:
            data[at % len(data)] = byte
        _only_keymgr_errors(parse, bytes(data))
