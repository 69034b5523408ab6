"""The attack suite is live: weaken one of keymgr's templates and the same attack code wins.

Each case builds a weakened copy of a keymgr template (one defence removed),
makes a key from it recorded by keymgr's own keyring (with a known value, so the
test can tell a real leak from noise: :func:`tests._known_keys.imported_key`),
runs the attack function of test_attacks.py on it, and asserts that

* the suite's verdict (:func:`tests.security.test_attacks.assert_defeated`) now fails, and
* the bytes the attacker recovered are exactly the key (or exactly what the attack
  promises: AES-ECB under the key for derive, the attacker's chosen key for
  encrypt-then-unwrap).

Together with test_attacks.py this shows that the templates, not the attack code,
stop each attack.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import replace

import pytest

from keymgr import KeyManager
from keymgr.hsm import templates as templates_module
from keymgr.hsm.templates import PROFILES, KeyTemplate
from keymgr.keyring.store import KeyPolicy
from tests._known_keys import imported_key
from tests.security._attacker import Target, aes_ecb
from tests.security.test_attacks import assert_defeated, run_attack

#: What a winning attack must recover, given the key's known value and the attack's result.
Expect = Callable[[bytes, bytes], bool]
def _IS_KEY(key: bytes, leaked: bytes) -> bool:
    return leaked == key


def _ECB(key: bytes, leaked: bytes) -> bool:
    return leaked == aes_ecb(key, bytes(range(32)))


def _PLANTED(key: bytes, leaked: bytes) -> bool:
    """Encrypt-then-unwrap: a 32-byte key of the attacker's choosing now sits in the token."""
    return len(leaked) == 32 and leaked != key


def _GAINED(key: bytes, leaked: bytes) -> bool:
    """A forbidden capability was gained (the attacks mark that with b""); the value is still in."""
    return leaked == b""


MUTATIONS: list[tuple[str, str, bool, dict[str, bool], str, Expect]] = [
    # (case, profile, backup, attribute changes, attack, what the attacker recovers)
    ("kw+DERIVE", "kw", False, {"DERIVE": True}, "derive-readable", _ECB),
    ("gcm+DERIVE", "gcm", False, {"DERIVE": True}, "derive-readable", _ECB),
    ("kw+DECRYPT", "kw", False, {"DECRYPT": True}, "wrong-purpose", _GAINED),
    ("kw+DECRYPT+EXTRACTABLE-WWT", "kw", False, {"DECRYPT": True, "EXTRACTABLE": True, "WRAP_WITH_TRUSTED": False},
     "wrap-then-decrypt", _IS_KEY),
    ("kw+EXTRACTABLE-WWT", "kw", False, {"EXTRACTABLE": True, "WRAP_WITH_TRUSTED": False},
     "wrap-under-attacker-key", _IS_KEY),
    ("kw+EXTRACTABLE-WWT", "kw", False, {"EXTRACTABLE": True, "WRAP_WITH_TRUSTED": False},
     "unwrap-weaker-template", _IS_KEY),
    ("kw+ENCRYPT", "kw", False, {"ENCRYPT": True}, "encrypt-then-unwrap", _PLANTED),
    ("gcm+UNWRAP", "gcm", False, {"UNWRAP": True}, "encrypt-then-unwrap", _PLANTED),
    ("gcm+WRAP", "gcm", False, {"WRAP": True}, "wrong-purpose", _GAINED),
    ("kw+MODIFIABLE", "kw", False, {"MODIFIABLE": True}, "flip-attributes", _GAINED),
    ("kw+COPYABLE+MODIFIABLE", "kw", False, {"COPYABLE": True, "MODIFIABLE": True}, "copy-object", _GAINED),
    ("kw+backup-WWT", "kw", True, {"WRAP_WITH_TRUSTED": False}, "untrusted-wrap", _IS_KEY),
    ("gcm+backup-WWT", "gcm", True, {"WRAP_WITH_TRUSTED": False}, "wrap-under-attacker-key", _IS_KEY),
]


def weakened(profile: str, changes: dict[str, bool]) -> KeyTemplate:
    base = PROFILES[profile].template
    return KeyTemplate(f"{base.purpose}-weakened", base.key_type, base.bits, {**base.attributes, **changes})


@pytest.mark.slow
@pytest.mark.parametrize(("case", "profile", "backup", "changes", "attack", "expect"), MUTATIONS,
                         ids=[f"{m[0]}->{m[4]}" for m in MUTATIONS])
def test_weakened_template_is_broken(manager: KeyManager, targets: dict[str, Target], monkeypatch: pytest.MonkeyPatch,
                                     case: str, profile: str, backup: bool, changes: dict[str, bool], attack: str,
                                     expect: Expect) -> None:
    monkeypatch.setattr(templates_module, "PROFILES",
                        {**PROFILES, profile: replace(PROFILES[profile], template=weakened(profile, changes))})
    value = os.urandom(32)
    name = f"weak-{uuid.uuid4().hex[:10]}"
    record = imported_key(manager, name, value, profile=profile, policy=KeyPolicy(backup=backup))
    purpose = {"kw": "kek-wrap", "gcm": "kek-gcm"}[profile] + ("+backup" if backup else "")
    target = Target(purpose, record.primary_version.key_id, lever_id=targets["kek-wrap"].key_id)
    result = run_attack(manager, attack, target)
    with pytest.raises(AssertionError):
        assert_defeated(result)
    assert result.leaked is not None and expect(value, result.leaked), result.summary()


def test_the_same_attacks_fail_on_the_real_templates(manager: KeyManager, targets: dict[str, Target]) -> None:
    """The control: each mutation's attack, on a key made from the unmodified template with a known value."""
    for profile, backup in {(m[1], m[2]) for m in MUTATIONS}:
        value = os.urandom(32)
        record = imported_key(manager, f"ctl-{uuid.uuid4().hex[:10]}", value, profile=profile,
                              policy=KeyPolicy(backup=backup))
        purpose = {"kw": "kek-wrap", "gcm": "kek-gcm"}[profile] + ("+backup" if backup else "")
        target = Target(purpose, record.primary_version.key_id, lever_id=targets["kek-wrap"].key_id)
        for attack in {m[4] for m in MUTATIONS if (m[1], m[2]) == (profile, backup)}:
            result = run_attack(manager, attack, target)
            assert_defeated(result)
