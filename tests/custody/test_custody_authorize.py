"""The destroy gate (keymgr.custody.authorize.authorize_destroy): the edges of "M distinct custodians".

``test_custody_approvals.py`` covers the main path (one approval refused, the same
approval twice counts once, two custodians proceed, replay, alteration); these
tests cover who counts: the same custodian signing twice, a registered custodian
outside the key's quorum, a name nobody registered, approvals signed outside the
request's validity, and a request for another key. Each refusal leaves the key
in the token and the request unspent.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from keymgr import errors
from keymgr.custody.approvals import Approval, approve, make_request
from keymgr.custody.authorize import authorize_destroy
from keymgr.custody.custodians import CustodyRegister
from keymgr.hsm import objects
from keymgr.manager import KeyManager
from tests._internals import keyring_of, token_of
from tests.custody_helpers import approvals, guarded_key, hsm, party, registered, request


def _signed_by(km: KeyManager, req: object, number: int, *, now: datetime | None = None) -> Approval:
    custodian = CustodyRegister(keyring_of(km)).load().custodian(party(number).name)
    return approve(req, party(number).open(custodian), now=now)  # type: ignore[arg-type]


def _key_id(km: KeyManager, name: str) -> bytes:
    return km.describe_key(name).version(1).key_id


def test_one_custodian_signing_twice_counts_once(key_name: str) -> None:
    km = hsm()
    guarded_key(km, key_name)
    req = request(km, "destroy", key_name, versions=[1])
    earlier = _signed_by(km, req, 1, now=datetime.now(UTC) - timedelta(minutes=2))
    later = _signed_by(km, req, 1)
    assert earlier.to_bytes() != later.to_bytes()  # two different, valid signatures by one person
    with pytest.raises(errors.PolicyError, match=rf"valid distinct approvals: 1 \({party(1).name}\)"):
        authorize_destroy(keyring_of(km), key_name, [1], request=req, approvals=[earlier, later])
    assert objects.key_exists(token_of(km), _key_id(km, key_name))
    auth = authorize_destroy(keyring_of(km), key_name, [1], request=req, approvals=[earlier, later,
                                                                                  *approvals(km, req, 2)])
    assert auth is not None and set(auth.approvers) == {party(1).name, party(2).name}


def test_registered_custodian_outside_the_keys_quorum_does_not_count(key_name: str) -> None:
    km = hsm()
    registered(km, 3)  # registered in this keyring, but not one of this key's custodians
    guarded_key(km, key_name, 2, (1, 2))
    req = request(km, "destroy", key_name, versions=[1])
    with pytest.raises(errors.PolicyError, match=f"{party(3).name!r}: that custodian is not part of this quorum"):
        authorize_destroy(keyring_of(km), key_name, [1], request=req, approvals=approvals(km, req, 1, 3))
    assert objects.key_exists(token_of(km), _key_id(km, key_name))
    assert authorize_destroy(keyring_of(km), key_name, [1], request=req, approvals=approvals(km, req, 1, 2)) is not None


def test_a_name_nobody_registered_is_refused(key_name: str) -> None:
    km = hsm()
    guarded_key(km, key_name)
    req = request(km, "destroy", key_name, versions=[1])
    real = _signed_by(km, req, 2)
    stranger = Approval(real.request_digest, "nobody-registered-this", real.fingerprint, real.signed,
                        real.signature)
    with pytest.raises(errors.PolicyError, match="'nobody-registered-this': no such custodian is registered"):
        authorize_destroy(keyring_of(km), key_name, [1], request=req, approvals=[_signed_by(km, req, 1), stranger])
    assert objects.key_exists(token_of(km), _key_id(km, key_name))


def test_approval_signed_before_the_request_existed_is_refused(key_name: str) -> None:
    km = hsm()
    guarded_key(km, key_name)
    req = request(km, "destroy", key_name, versions=[1])
    backdated = _signed_by(km, req, 3, now=datetime.now(UTC) - timedelta(hours=1))
    with pytest.raises(errors.PolicyError, match="signed outside the request's validity"):
        authorize_destroy(keyring_of(km), key_name, [1], request=req, approvals=[_signed_by(km, req, 1), backdated])
    assert objects.key_exists(token_of(km), _key_id(km, key_name))


def test_request_from_the_future_is_refused(key_name: str) -> None:
    km = hsm()
    guarded_key(km, key_name)
    future = make_request("destroy", token=token_of(km), key=key_name, params={"versions": [1]},
                          now=datetime.now(UTC) + timedelta(hours=2))
    signed = [_signed_by(km, future, n, now=datetime.now(UTC) + timedelta(hours=2)) for n in (1, 2)]
    with pytest.raises(errors.PolicyError, match="created in the future"):
        authorize_destroy(keyring_of(km), key_name, [1], request=future, approvals=signed)


def test_approvals_for_another_key_do_not_destroy_this_one(key_name: str) -> None:
    km = hsm()
    other = f"{key_name}-other"
    guarded_key(km, key_name)
    guarded_key(km, other)
    req = request(km, "destroy", other, versions=[1])
    approved = approvals(km, req, 1, 2)
    with pytest.raises(errors.PolicyError, match="the approved request is for destroy key"):
        authorize_destroy(keyring_of(km), key_name, [1], request=req, approvals=approved)
    assert objects.key_exists(token_of(km), _key_id(km, key_name))
    # the request was not spent by the refusal: it still authorises what it names, once
    assert authorize_destroy(keyring_of(km), other, [1], request=req, approvals=approved) is not None
    with pytest.raises(errors.PolicyError, match="already carried out"):
        authorize_destroy(keyring_of(km), other, [1], request=req, approvals=approved)


def test_confirmation_is_no_substitute_for_the_quorum(key_name: str) -> None:
    km = hsm()
    guarded_key(km, key_name)
    with pytest.raises(errors.PolicyError, match="needs approvals by 2 of 3"):
        authorize_destroy(keyring_of(km), key_name, [1], confirmed=True)
    req = request(km, "destroy", key_name, versions=[1])
    with pytest.raises(errors.PolicyError, match="valid distinct approvals: 1"):
        authorize_destroy(keyring_of(km), key_name, [1], request=req, approvals=approvals(km, req, 3), confirmed=True)
