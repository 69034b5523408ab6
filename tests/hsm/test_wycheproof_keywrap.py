"""Wycheproof AES-KW (RFC 3394) and AES-KWP (RFC 5649) vectors through the token's C_UnwrapKey.

Each case's wrapping key is imported into SoftHSM as a session object that may
only unwrap, and the token itself unwraps the case's ciphertext
(:func:`tests._known_keys.unwrap_with_session_key`): the path every ``kw``
message takes on decrypt. ``valid`` cases must give exactly the expected key
bytes (of every length the files hold, 1 to 384 bytes: as AES keys where the
length allows, else as GENERIC_SECRET), ``invalid`` ones must be refused as an
:class:`~keymgr.errors.IntegrityError`, ``acceptable`` ones may go either way;
nothing else may happen. The KWP mechanism is the one the probe found
(SoftHSM: 0x210A, STACK-FACTS 13).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any

import pytest

from keymgr.errors import IntegrityError
from keymgr.hsm import TokenSession, open_token, probe
from tests._known_keys import unwrap_with_session_key
from tests._vectors import load_wycheproof, wycheproof_cases
from tests.conftest import softhsm_token

KW = wycheproof_cases("aes_wrap_test")
KWP = wycheproof_cases("aes_kwp_test")


def _ids(cases: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[str]:
    return [f"tc{t['tcId']}-k{g['keySize']}-{t['result']}" for g, t in cases]


def _session_keys(ts: TokenSession) -> Counter[tuple[object, object]]:
    """(label, CKA_ID) of every secret session object this process sees on the token. Other
    tests in the same process may leave their own (session objects are per process: STACK-FACTS 11)."""
    from pkcs11 import Attribute, ObjectClass

    def read(session: object) -> Counter[tuple[object, object]]:
        keys = session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TOKEN: False})  # type: ignore[attr-defined]
        return Counter((k[Attribute.LABEL], k[Attribute.ID]) for k in keys)

    return ts.run("list session keys", read)  # type: ignore[no-any-return]


_BEFORE: Counter[tuple[object, object]] = Counter()


@pytest.fixture(scope="module")
def ts() -> TokenSession:
    session = open_token(softhsm_token().uri())
    _BEFORE.update(_session_keys(session))  # what was there before this module's cases ran
    return session


def kwp_mechanism(ts: TokenSession) -> str:
    caps = probe(ts)
    for name in ("aes-kwp", "aes-kwp-3.0"):
        if caps.has(name):
            return name
    pytest.skip("the token has neither KWP mechanism (probed)")


def check(ts: TokenSession, mechanism: str, test: dict[str, Any]) -> None:
    key, msg, ct = (bytes.fromhex(test[k]) for k in ("key", "msg", "ct"))
    if test["result"] == "valid":
        assert unwrap_with_session_key(ts, key, ct, mechanism) == msg
    elif test["result"] == "invalid":
        with pytest.raises(IntegrityError) as info:
            unwrap_with_session_key(ts, key, ct, mechanism)
        assert key.hex() not in str(info.value) and (not msg or msg.hex() not in str(info.value))
    else:
        with contextlib.suppress(IntegrityError):
            assert unwrap_with_session_key(ts, key, ct, mechanism) == msg


def test_the_files_are_the_ones_we_expect() -> None:
    for name, cases in (("aes_wrap_test", KW), ("aes_kwp_test", KWP)):
        data = load_wycheproof(name)
        assert len(cases) == data["numberOfTests"]
        results = {t["result"] for _, t in cases}
        assert {"valid", "invalid"} <= results
        assert {len(t["msg"]) // 2 for _, t in cases if t["result"] == "valid"} - {16, 24, 32}  # other sizes too


@pytest.mark.parametrize(("group", "test"), KW, ids=_ids(KW))
def test_aes_kw(ts: TokenSession, group: dict[str, Any], test: dict[str, Any]) -> None:
    check(ts, "aes-kw", test)


@pytest.mark.parametrize(("group", "test"), KWP, ids=_ids(KWP))
def test_aes_kwp(ts: TokenSession, group: dict[str, Any], test: dict[str, Any]) -> None:
    check(ts, kwp_mechanism(ts), test)


def test_no_session_objects_left_behind(ts: TokenSession) -> None:
    """Every case destroyed its wrapping key and its unwrapped key."""
    assert not _session_keys(ts) - _BEFORE  # a multiset: an unlabelled leak is not hidden by another
