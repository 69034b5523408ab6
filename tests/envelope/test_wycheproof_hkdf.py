"""Wycheproof HKDF-SHA-256 vectors through ``keymgr.envelope._aead.hkdf_sha256``, the KDF of
stream segment keys and key commitments (shared/vectors/README.md)."""

from __future__ import annotations

from typing import Any

import pytest

from keymgr.envelope._aead import hkdf_sha256
from tests._vectors import wycheproof_cases

CASES = wycheproof_cases("hkdf_sha256_test")


@pytest.mark.parametrize(("group", "test"), CASES, ids=[f"tc{t['tcId']}-{t['result']}" for _, t in CASES])
def test_hkdf_sha256(group: dict[str, Any], test: dict[str, Any]) -> None:
    ikm, salt, info = (bytes.fromhex(test[k]) for k in ("ikm", "salt", "info"))
    if test["result"] == "valid":
        assert hkdf_sha256(ikm, salt=salt or None, info=info, length=test["size"]) == bytes.fromhex(test["okm"])
    else:  # only over-long outputs are invalid: refused, not truncated
        with pytest.raises(ValueError):
            hkdf_sha256(ikm, salt=salt or None, info=info, length=test["size"])
