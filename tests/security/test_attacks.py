"""The known PKCS#11 API attacks, run against every key template keymgr makes (SoftHSM 2.6.1).

One test per attack, parameterised over the templates it applies to; each
asserts that no key-dependent bytes left the token (``Result.leaked``) and
that the token itself refused at least one step the attack needs. The steps
and the token's answers are printed with ``-rA`` (and listed in docs/security.md).
That the attack code can win at all is shown by test_attack_mutations.py.

References: Clulow, "On the security of PKCS#11", CHES 2003; Delaune, Kremer &
Steel, "Formal analysis of PKCS#11", CSF 2008; Bortolozzo, Centenaro, Focardi &
Steel, "Attacking and fixing PKCS#11 security tokens", CCS 2010.
"""

from __future__ import annotations

import pytest
from pkcs11 import Attribute, ObjectClass

from keymgr import KeyManager
from keymgr.hsm.templates import KEYPAIR_PRIVATE, TEMPLATES
from tests._internals import token_of
from tests.security._attacker import ATTACKS, FLIPPABLE, Result, Target

SECRET = ("kek-wrap", "kek-gcm", "kek-wrap+backup", "kek-gcm+backup", "mac", "blind-index", "transport",
          "transport-import")
PAIRS = ("keypair-rsa", "keypair-ec")
#: Which templates each attack applies to: encrypt-then-unwrap and derive target symmetric keys;
#: an EC pair's DERIVE is ECDH by design (its output is a shared secret, not the private key).
APPLIES = {
    "wrap-then-decrypt": SECRET + PAIRS,
    "encrypt-then-unwrap": SECRET,
    "wrap-under-attacker-key": SECRET + PAIRS,
    "flip-attributes": SECRET + PAIRS,
    "copy-object": SECRET + PAIRS,
    "unwrap-weaker-template": SECRET + PAIRS,
    "wrong-purpose": SECRET + ("keypair-rsa",),
    "derive-readable": SECRET,
    "untrusted-wrap": SECRET + PAIRS,
}
CASES = [(attack, purpose) for attack, purposes in APPLIES.items() for purpose in purposes]


def run_attack(km: KeyManager, attack: str, target: Target) -> Result:
    return token_of(km).run(f"attack {attack}", lambda session: ATTACKS[attack](session, target))


def assert_defeated(result: Result) -> None:
    """The suite's verdict on one attack (the mutation tests check that it can fail)."""
    print(result.summary())
    assert result.leaked is None, result.summary()
    assert result.refusals, f"the token refused nothing: {result.summary()}"


@pytest.mark.parametrize(("attack", "purpose"), CASES, ids=[f"{a}[{p}]" for a, p in CASES])
def test_attack_is_defeated(manager: KeyManager, targets: dict[str, Target], attack: str, purpose: str) -> None:
    assert_defeated(run_attack(manager, attack, targets[purpose]))


def test_every_template_is_attacked(targets: dict[str, Target]) -> None:
    """Every template keymgr makes long-term keys from is a target (the ephemeral data key is the one
    extractable template by design: its value is generated on the host; TRANSPORT_EXPORT needs the SO
    to exist, see test_user_cannot_make_a_trusted_key and docs/security.md)."""
    purposes = {p for ps in APPLIES.values() for p in ps}
    expected = set(TEMPLATES) - {"ephemeral-data-key", "transport-export"}
    expected |= {"kek-wrap+backup", "kek-gcm+backup", "keypair-rsa", "keypair-ec"}
    assert purposes == expected == set(targets)


def test_flips_cover_every_protective_attribute() -> None:
    for template in TEMPLATES.values():
        assert set(template.attributes) - {"TOKEN", "PRIVATE", "TRUSTED"} <= set(FLIPPABLE), template.purpose
    assert set(KEYPAIR_PRIVATE) - {"TOKEN", "PRIVATE"} <= set(FLIPPABLE)


def test_refusals_are_the_tokens(manager: KeyManager, targets: dict[str, Target]) -> None:
    """The decisive refusals come from the token (CKR codes), not from python-pkcs11 lacking a method."""
    codes = set()
    for attack in ("wrap-then-decrypt", "flip-attributes", "copy-object", "derive-readable", "untrusted-wrap"):
        codes |= {s.code for s in run_attack(manager, attack, targets["kek-wrap+backup"]).refusals}
    assert {"CKR_KEY_FUNCTION_NOT_PERMITTED", "CKR_ACTION_PROHIBITED", "CKR_KEY_NOT_WRAPPABLE",
            "CKR_ATTRIBUTE_READ_ONLY"} <= codes, codes
    assert "not implemented" not in codes


def test_user_cannot_make_a_trusted_key(manager: KeyManager, targets: dict[str, Target]) -> None:
    """TRANSPORT_EXPORT is CKA_TRUSTED, which only the SO may set (PKCS#11 v2.40 4.9): the user
    cannot make one, so WRAP_WITH_TRUSTED keys leave only in an SO-attended backup."""
    result = run_attack(manager, "untrusted-wrap", targets["kek-wrap+backup"])
    first = result.steps[0]
    assert first.name.startswith("C_CreateObject(CKA_TRUSTED") and first.code == "CKR_ATTRIBUTE_READ_ONLY"


def test_keys_read_back_as_their_templates(manager: KeyManager, targets: dict[str, Target]) -> None:
    """The token holds what the templates say (the attacks' premise), read with python-pkcs11."""
    def read(session: object) -> dict[str, dict[str, object]]:
        out = {}
        for purpose, target in targets.items():
            # list(): a search left half-read is finished by the garbage collector, perhaps after its
            # session is gone, and python-pkcs11 then prints a traceback into whatever runs next
            obj = list(session.get_objects({Attribute.ID: target.key_id,  # type: ignore[attr-defined]
                                            Attribute.CLASS: target.object_class}))[0]
            out[purpose] = {n: obj[Attribute[n]] for n in ("SENSITIVE", "EXTRACTABLE", "MODIFIABLE", "COPYABLE",
                                                          "ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE")}
        return out

    seen = token_of(manager).run("read attributes", read)
    for purpose, attrs in seen.items():
        assert attrs["SENSITIVE"] is True and attrs["MODIFIABLE"] is False and attrs["COPYABLE"] is False, purpose
        assert attrs["EXTRACTABLE"] is purpose.endswith("+backup"), purpose
        if purpose != "transport-import":  # made from a known value, as restore makes it: never "always sensitive"
            assert attrs["ALWAYS_SENSITIVE"] is True, purpose
    assert targets["keypair-rsa"].object_class == ObjectClass.PRIVATE_KEY
