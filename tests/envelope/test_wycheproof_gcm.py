"""Wycheproof AES-GCM vectors through keymgr's content encryption (``keymgr.envelope._aead``).

The AES-256 / 96-bit-IV groups are keymgr's parameters: every valid vector
must give exactly the expected ciphertext and tag and decrypt back, every
invalid one must fail as IntegrityError, both through the one-shot calls CMS
messages use (``DataKey.seal`` / ``open``) and the into-buffer calls streams
use. Vectors with other key or IV sizes must be refused cleanly (a key of
another size as ConfigurationError, a nonce as FormatError), never crash and
never decrypt.

The vectors in keymgr's parameters with an empty AAD also go through the whole
decrypt path of a message: each becomes a CMS AuthEnvelopedData without
attributes (the form OpenSSL writes) whose data key is the vector's key,
wrapped (RFC 3394) under a KEK imported into SoftHSM, and ``KeyManager.decrypt``
must give back the message or raise the integrity error. (A vector with AAD
cannot be a CMS message: there the AAD is the attribute set.)

Counts (the file's 316 cases): 66 in keymgr's parameters (39 valid, 27
invalid), 48 of them with an empty AAD (21 valid, 27 invalid); 250 with other
key, IV or tag sizes, all refused.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import pytest
from asn1crypto import cms
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

import keymgr
from keymgr.envelope._aead import DataKey
from keymgr.errors import ConfigurationError, FormatError, IntegrityError
from keymgr.manager import INTEGRITY_MESSAGE
from tests._known_keys import imported_key
from tests._vectors import load_wycheproof, wycheproof_cases
from tests.conftest import softhsm_token
from tests.envelope.test_envelope_cms import GcmParameters

CASES = wycheproof_cases("aes_gcm_test")
OURS = [(g, t) for g, t in CASES if g["keySize"] == 256 and g["ivSize"] == 96 and g["tagSize"] == 128]
OTHERS = [(g, t) for g, t in CASES if (g, t) not in OURS]
AS_MESSAGES = [(g, t) for g, t in OURS if not t["aad"]]


def _ids(cases: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[str]:
    return [f"tc{t['tcId']}-k{g['keySize']}-iv{g['ivSize']}-{t['result']}" for g, t in cases]


def _bytes(test: dict[str, Any]) -> tuple[bytes, ...]:
    return tuple(bytes.fromhex(test[k]) for k in ("key", "iv", "aad", "msg", "ct", "tag"))


def test_the_file_is_the_one_we_expect() -> None:
    data = load_wycheproof("aes_gcm_test")
    assert data["algorithm"] == "AES-GCM"
    assert len(CASES) == data["numberOfTests"]
    assert len(OURS) >= 60 and any(t["result"] == "invalid" for _, t in OURS)
    counts = {(name, result): sum(t["result"] == result for _, t in cases) for name, cases in
              (("ours", OURS), ("messages", AS_MESSAGES), ("others", OTHERS)) for result in ("valid", "invalid")}
    assert counts == {("ours", "valid"): 39, ("ours", "invalid"): 27, ("messages", "valid"): 21,
                      ("messages", "invalid"): 27, ("others", "valid"): 190, ("others", "invalid"): 60}
    assert len(OURS) + len(OTHERS) == 316 and not any(t["result"] == "acceptable" for _, t in CASES)


@pytest.mark.parametrize(("group", "test"), OURS, ids=_ids(OURS))
def test_keymgr_parameters(group: dict[str, Any], test: dict[str, Any]) -> None:
    key, iv, aad, msg, ct, tag = _bytes(test)
    if test["result"] == "valid":
        assert DataKey(key).seal(iv, msg, aad) == ct + tag
        assert DataKey(key).open(iv, ct + tag, aad) == msg
        sealed = bytearray(len(msg) + 16)
        DataKey(key).seal_into(iv, memoryview(msg), aad, memoryview(sealed))
        assert bytes(sealed) == ct + tag
        plain = bytearray(len(ct))
        DataKey(key).open_into(iv, memoryview(ct + tag), aad, memoryview(plain))
        assert bytes(plain) == msg
    elif test["result"] == "invalid":
        with pytest.raises(IntegrityError):
            DataKey(key).open(iv, ct + tag, aad)
        plain = bytearray(len(ct))
        with pytest.raises(IntegrityError):
            DataKey(key).open_into(iv, memoryview(ct + tag), aad, memoryview(plain))
        assert plain == bytearray(len(ct))  # no unverified plaintext left behind
    else:  # "acceptable": either way, but cleanly
        with contextlib.suppress(IntegrityError):
            DataKey(key).open(iv, ct + tag, aad)


@pytest.mark.parametrize(("group", "test"), OTHERS, ids=_ids(OTHERS))
def test_other_sizes_are_refused(group: dict[str, Any], test: dict[str, Any]) -> None:
    key, iv, aad, msg, ct, tag = _bytes(test)
    if len(key) != 32:
        with pytest.raises(ConfigurationError):
            DataKey(key)
        return
    with pytest.raises(FormatError):
        DataKey(key).seal(iv, msg, aad)
    with pytest.raises(FormatError):
        DataKey(key).open(iv, ct + tag, aad)
    with pytest.raises(FormatError):
        DataKey(key).open_into(iv, memoryview(ct + tag), aad, memoryview(bytearray(len(ct))))


@pytest.fixture(scope="module")
def known_kek() -> Iterator[tuple[keymgr.KeyManager, bytes, bytes]]:
    """A manager, and a kw KEK imported into its token with a value the test knows."""
    import uuid

    with keymgr.KeyManager(softhsm_token().uri()) as km:
        value = os.urandom(32)
        record = imported_key(km, f"wycheproof-gcm-{uuid.uuid4().hex[:8]}", value, profile="kw")
        yield km, value, record.primary_version.key_id


def as_message(test: dict[str, Any], kek: bytes, kek_id: bytes) -> bytes:
    key, iv, _, _, ct, tag = _bytes(test)
    kekri = cms.KEKRecipientInfo({"version": "v4", "kekid": {"key_identifier": kek_id},
                                  "key_encryption_algorithm": {"algorithm": "aes256_wrap"},
                                  "encrypted_key": aes_key_wrap(kek, key)})
    aed = cms.AuthEnvelopedData({
        "version": "v0", "recipient_infos": [cms.RecipientInfo(name="kekri", value=kekri)],
        "auth_encrypted_content_info": {
            "content_type": "data",
            "content_encryption_algorithm": {"algorithm": "aes256_gcm",
                                             "parameters": GcmParameters({"aes_nonce": iv, "aes_icvlen": 16})},
            "encrypted_content": ct},
        "mac": tag})
    return cms.ContentInfo({"content_type": "authenticated_enveloped_data", "content": aed}).dump()


@pytest.mark.slow
@pytest.mark.parametrize(("group", "test"), AS_MESSAGES, ids=_ids(AS_MESSAGES))
def test_through_keymanager_decrypt(known_kek: tuple[keymgr.KeyManager, bytes, bytes], group: dict[str, Any],
                                    test: dict[str, Any]) -> None:
    km, kek, kek_id = known_kek
    blob = as_message(test, kek, kek_id)
    if test["result"] == "valid":
        assert km.decrypt(blob) == bytes.fromhex(test["msg"])
    else:
        with pytest.raises(IntegrityError, match="^" + INTEGRITY_MESSAGE + "$"):
            km.decrypt(blob)
