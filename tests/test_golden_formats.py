"""Golden files: the message (CMS AuthEnvelopedData) and stream formats, byte for byte.

tests/golden/message.cms and tests/golden/stream.kmg were written once from the fixed
inputs in tests/golden/inputs.json (a Wycheproof KEK and data key, fixed nonces, salt
and prefix: tests/_fixed_randomness.py replaces the modules' random source, since keymgr
lets no caller choose them).
Each test fails on any change to the bytes keymgr writes or to how it reads them, so a
format change is a decision: when it is one, run
``KEYMGR_WRITE_GOLDEN=1 pytest tests/test_golden_formats.py``, bump the format version
where readers must tell old from new, say so in docs/format.md and commit the new files.
Old goldens that must keep decrypting belong beside the new ones, not overwritten.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap

from keymgr.envelope import cms, stream
from keymgr.envelope.recipients import kek_recipient_der, read_kek_recipient, recipient_kind
from keymgr.hsm import open_token
from tests._fixed_randomness import fixed_message_nonce, fixed_stream_randomness
from tests._known_keys import unwrap_with_session_key
from tests._vectors import load_wycheproof
from tests.conftest import TokenUnderTest

GOLDEN = Path(__file__).parent / "golden"
INPUTS: dict[str, Any] = json.loads((GOLDEN / "inputs.json").read_text(encoding="utf-8"))


def _vector() -> tuple[bytes, bytes, bytes]:
    """(KEK, data key, RFC 3394 wrap of the data key) from the Wycheproof test the inputs name."""
    wanted = INPUTS["wycheproof"]
    for group in load_wycheproof(wanted["file"])["testGroups"]:
        for test in group["tests"]:
            if test["tcId"] == wanted["tcId"]:
                assert test["result"] == "valid" and group["keySize"] == 256 and len(test["msg"]) == 64
                return bytes.fromhex(test["key"]), bytes.fromhex(test["msg"]), bytes.fromhex(test["ct"])
    raise AssertionError(f"no Wycheproof test {wanted}")


def _recipients() -> list[bytes]:
    """A KW recipient (the vector's wrap) and a GCM recipient (the data key sealed under the same
    KEK with a fixed nonce, as keymgr's gcm profile does in the token)."""
    kek, dek, wrapped = _vector()
    kek_id = bytes.fromhex(INPUTS["kek_id"])
    nonce = bytes.fromhex(INPUTS["message"]["gcm_recipient_nonce"])
    return [kek_recipient_der(kek_id, wrapped, "aes256_wrap"),
            kek_recipient_der(kek_id, AESGCM(kek).encrypt(nonce, dek, b""), "aes256_gcm", gcm_nonce=nonce)]


def _message() -> bytes:
    _, dek, _ = _vector()
    with fixed_message_nonce(bytes.fromhex(INPUTS["message"]["nonce"])):
        return cms.seal_message(INPUTS["plaintext"].encode(), dek=dek, recipient_infos=_recipients(),
                                context=INPUTS["context"])


def _stream() -> bytes:
    _, dek, _ = _vector()
    fixed = INPUTS["stream"]
    out = io.BytesIO()
    with fixed_stream_randomness(bytes.fromhex(fixed["salt"]), bytes.fromhex(fixed["nonce_prefix"])):
        stream.encrypt_stream(io.BytesIO(INPUTS["plaintext"].encode()), out, dek=dek, recipient_infos=_recipients(),
                              context=INPUTS["context"], segment_size=fixed["segment_size"])
    return out.getvalue()


def _golden(name: str, made: bytes) -> bytes:
    path = GOLDEN / name
    if os.environ.get("KEYMGR_WRITE_GOLDEN") == "1":
        path.write_bytes(made)
    return path.read_bytes()


@pytest.mark.parametrize(("name", "make"), [("message.cms", _message), ("stream.kmg", _stream)])
def test_writing_the_fixed_inputs_gives_the_golden_bytes(name: str, make: Any) -> None:
    made = make()
    golden = _golden(name, made)
    assert made == golden, f"{name}: keymgr now writes other bytes; a format change must be a decision (module doc)"


def _token_unwrap(softhsm: TokenUnderTest) -> Any:
    """An unwrap that goes through the token: the vector KEK as a session object, C_UnwrapKey (KW)."""
    kek, _, _ = _vector()
    ts = open_token(softhsm.uri())
    kek_id = bytes.fromhex(INPUTS["kek_id"])

    def unwrap(der: bytes) -> bytearray | None:
        if recipient_kind(der) != "kekri":
            return None
        recipient = read_kek_recipient(der)
        if recipient.kek_id != kek_id or recipient.algorithm != "aes256_wrap":
            return None  # the GCM recipient: the token path here is KW (the GCM one is checked host-side)
        return unwrap_with_session_key(ts, kek, recipient.encrypted_key, "aes-kw")

    return unwrap


def test_the_golden_message_decrypts_to_the_fixed_plaintext(softhsm: TokenUnderTest) -> None:
    golden = (GOLDEN / "message.cms").read_bytes()
    plaintext, context = cms.open_message(golden, unwrap_der=_token_unwrap(softhsm), context=None,
                                          return_context=True, require_commitment=True)
    assert plaintext == INPUTS["plaintext"].encode() and context == INPUTS["context"]
    with pytest.raises(Exception, match="failed"):  # the context is bound: another one fails
        cms.open_message(golden, unwrap_der=_token_unwrap(softhsm), context={"purpose": "other"})


def test_the_golden_stream_decrypts_to_the_fixed_plaintext(softhsm: TokenUnderTest) -> None:
    out = io.BytesIO()
    total = stream.decrypt_stream(io.BytesIO((GOLDEN / "stream.kmg").read_bytes()), out,
                                  unwrap_der=_token_unwrap(softhsm), context=INPUTS["context"])
    assert out.getvalue() == INPUTS["plaintext"].encode() and total == len(INPUTS["plaintext"])


def test_the_golden_files_parse_to_the_fixed_fields() -> None:
    """The structure, field by field, without any key: what a reader sees before it decrypts."""
    kek, dek, wrapped = _vector()
    kek_id = bytes.fromhex(INPUTS["kek_id"])
    message = cms.parse_message((GOLDEN / "message.cms").read_bytes())
    assert message.nonce == bytes.fromhex(INPUTS["message"]["nonce"]) and message.icv_length == 16
    assert message.auth_attrs is not None and message.auth_attrs.context == INPUTS["context"]
    assert len(message.encrypted_content) == len(INPUTS["plaintext"])
    header = stream.read_stream_header(io.BytesIO((GOLDEN / "stream.kmg").read_bytes()))
    fixed = INPUTS["stream"]
    assert (header.segment_size, header.salt.hex(), header.nonce_prefix.hex(), header.context) == (
        fixed["segment_size"], fixed["salt"], fixed["nonce_prefix"], INPUTS["context"])
    for recipients in (message.recipient_infos.der, header.recipient_infos.der):
        kw, gcm = (read_kek_recipient(der) for der in recipients)
        assert (kw.kek_id, kw.algorithm, kw.encrypted_key) == (kek_id, "aes256_wrap", wrapped)
        assert aes_key_unwrap(kek, kw.encrypted_key) == dek
        assert (gcm.kek_id, gcm.algorithm, gcm.gcm_nonce) == (
            kek_id, "aes256_gcm", bytes.fromhex(INPUTS["message"]["gcm_recipient_nonce"]))
        assert AESGCM(kek).decrypt(gcm.gcm_nonce, gcm.encrypted_key, b"") == dek
