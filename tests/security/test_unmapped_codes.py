"""Refusals python-pkcs11 has no exception class for reach the caller as keymgr errors naming the code.

python-pkcs11 0.10.1 raises a bare ``PKCS11Error("Unmapped error code 0x68")`` for
CKR_KEY_FUNCTION_NOT_PERMITTED and CKR_ACTION_PROHIBITED, two of the answers a hardened
template exists to give. Through keymgr's session layer they are a PolicyError that says
which (they were a TokenError with the code "PKCS11Error"). The token is driven as the
attacker drives it (tests/security/_attacker.py), inside TokenSession.run.
"""

from __future__ import annotations

from typing import Any

import pytest
from pkcs11 import Attribute, Mechanism

from keymgr import KeyManager, errors
from tests._internals import token_of
from tests.security._attacker import Target, find


def test_an_attribute_flip_is_a_policy_error_naming_ckr_action_prohibited(manager: KeyManager,
                                                                         targets: dict[str, Target]) -> None:
    key_id = targets["kek-wrap"].key_id

    def flip(session: Any) -> None:
        find(session, key_id)[Attribute.EXTRACTABLE] = True

    with pytest.raises(errors.PolicyError, match="CKR_ACTION_PROHIBITED") as caught:
        token_of(manager).run("flip an attribute", flip)
    assert "refused by the key's attributes" in str(caught.value)


def test_a_kw_kek_asked_to_encrypt_is_a_policy_error_naming_ckr_key_function_not_permitted(
        manager: KeyManager, targets: dict[str, Target]) -> None:
    key_id = targets["kek-wrap"].key_id

    def encrypt(session: Any) -> bytes:
        return bytes(find(session, key_id).encrypt(bytes(16), mechanism=Mechanism.AES_ECB))

    with pytest.raises(errors.PolicyError, match="CKR_KEY_FUNCTION_NOT_PERMITTED"):
        token_of(manager).run("encrypt under a wrap key", encrypt)
    # the session is still good afterwards
    assert token_of(manager).run("still here", lambda session: find(session, key_id)) is not None
