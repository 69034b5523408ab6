"""Wycheproof AES-GCM vectors through keymgr's content encryption (``keymgr.envelope._aead``).

The AES-256 / 96-bit-IV groups are keymgr's parameters: every valid vector
must give exactly the expected ciphertext and tag and decrypt back, every
invalid one must fail as IntegrityError, both through the one-shot calls CMS
messages use and the into-buffer calls streams use. Vectors with other key
or IV sizes must be refused cleanly (FormatError), never crash and never
decrypt.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from keymgr.envelope._aead import DataKey, gcm_open, gcm_seal
from keymgr.errors import FormatError, IntegrityError
from tests._vectors import load_wycheproof, wycheproof_cases

CASES = wycheproof_cases("aes_gcm_test")
OURS = [(g, t) for g, t in CASES if g["keySize"] == 256 and g["ivSize"] == 96 and g["tagSize"] == 128]
OTHERS = [(g, t) for g, t in CASES if (g, t) not in OURS]


def _ids(cases: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[str]:
    return [f"tc{t['tcId']}-k{g['keySize']}-iv{g['ivSize']}-{t['result']}" for g, t in cases]


def _bytes(test: dict[str, Any]) -> tuple[bytes, ...]:
    return tuple(bytes.fromhex(test[k]) for k in ("key", "iv", "aad", "msg", "ct", "tag"))


def test_the_file_is_the_one_we_expect() -> None:
    data = load_wycheproof("aes_gcm_test")
    assert data["algorithm"] == "AES-GCM"
    assert len(CASES) == data["numberOfTests"]
    assert len(OURS) >= 60 and any(t["result"] == "invalid" for _, t in OURS)


@pytest.mark.parametrize(("group", "test"), OURS, ids=_ids(OURS))
def test_keymgr_parameters(group: dict[str, Any], test: dict[str, Any]) -> None:
    key, iv, aad, msg, ct, tag = _bytes(test)
    if test["result"] == "valid":
        assert gcm_seal(key, iv, msg, aad) == (ct, tag)
        assert gcm_open(key, iv, ct, tag, aad) == msg
        sealed = bytearray(len(msg) + 16)
        DataKey(key).seal_into(iv, memoryview(msg), aad, memoryview(sealed))
        assert bytes(sealed) == ct + tag
        plain = bytearray(len(ct))
        DataKey(key).open_into(iv, memoryview(ct + tag), aad, memoryview(plain))
        assert bytes(plain) == msg
    elif test["result"] == "invalid":
        with pytest.raises(IntegrityError):
            gcm_open(key, iv, ct, tag, aad)
        plain = bytearray(len(ct))
        with pytest.raises(IntegrityError):
            DataKey(key).open_into(iv, memoryview(ct + tag), aad, memoryview(plain))
        assert plain == bytearray(len(ct))  # no unverified plaintext left behind
    else:  # "acceptable": either way, but cleanly
        with contextlib.suppress(IntegrityError):
            gcm_open(key, iv, ct, tag, aad)


@pytest.mark.parametrize(("group", "test"), OTHERS, ids=_ids(OTHERS))
def test_other_sizes_are_refused(group: dict[str, Any], test: dict[str, Any]) -> None:
    key, iv, aad, msg, ct, tag = _bytes(test)
    with pytest.raises(FormatError):
        gcm_seal(key, iv, msg, aad)
    with pytest.raises(FormatError):
        gcm_open(key, iv, ct, tag, aad)
