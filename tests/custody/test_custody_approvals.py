"""Signed approvals: M distinct custodians over exactly one request; no replay, no alteration."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from keymgr import errors
from keymgr.custody.approvals import Approval, Request, make_request
from keymgr.custody.authorize import authorize, authorize_destroy, change_policy
from keymgr.custody.custodian_token import enroll_custodian
from keymgr.custody.custodians import CustodyRegister, QuorumPolicy
from keymgr.hsm import asym, objects, open_token
from tests._internals import keyring_of, token_of
from tests.custody_helpers import approvals, guarded_key, hsm, party, registered, request


def _destroy(km, name: str, version: int, req: Request | None, approved: list[Approval]) -> None:
    """What ``key destroy`` does: the gate, then the crypto-shredding."""
    auth = authorize_destroy(keyring_of(km), name, [version], request=req, approvals=approved)
    assert auth is not None
    objects.destroy_key(token_of(km), km.describe_key(name).version(version).key_id)


@pytest.mark.slow
def test_destroy_needs_two_distinct_custodians(key_name: str) -> None:
    km = hsm()
    guarded_key(km, key_name)
    key_id = km.describe_key(key_name).primary_version.key_id
    req = request(km, "destroy", key_name, versions=[1])
    one = approvals(km, req, 1)
    with pytest.raises(errors.PolicyError, match=r"needs approvals by 2 of 3 .* valid distinct approvals: 1"):
        _destroy(km, key_name, 1, req, one)
    with pytest.raises(errors.PolicyError, match="valid distinct approvals: 1"):
        _destroy(km, key_name, 1, req, one + one)  # the same approval twice counts once
    with pytest.raises(errors.PolicyError, match="needs approvals"):
        _destroy(km, key_name, 1, None, [])
    assert objects.key_exists(token_of(km), key_id)
    _destroy(km, key_name, 1, req, one + approvals(km, req, 3))
    assert not objects.key_exists(token_of(km), key_id)
    with pytest.raises(errors.PolicyError, match="already carried out"):
        _destroy(km, key_name, 1, req, one + approvals(km, req, 3))


def test_altered_or_foreign_approvals_are_refused(key_name: str) -> None:
    km = hsm()
    guarded_key(km, key_name)
    req = request(km, "destroy", key_name, versions=[1])
    other = request(km, "destroy", key_name, versions=[1])
    good = approvals(km, req, 1, 2)
    doc = json.loads(good[1].to_bytes())
    doc["signed"] = doc["signed"][:-3] + ("00Z" if doc["signed"][-3:] != "00Z" else "01Z")
    altered = Approval.parse(json.dumps(doc).encode())
    with pytest.raises(errors.PolicyError, match=f"approval by {party(2).name!r}: the signature does not verify"):
        authorize(keyring_of(km), "destroy", key=key_name, params={"versions": [1]}, request=req,
                  approvals=[good[0], altered])
    with pytest.raises(errors.PolicyError, match="is for another request"):
        authorize(keyring_of(km), "destroy", key=key_name, params={"versions": [1]}, request=req,
                  approvals=[good[0], *approvals(km, other, 3)])
    impostor = Approval(good[1].request_digest, party(3).name, good[1].fingerprint, good[1].signed,
                        good[1].signature)
    with pytest.raises(errors.PolicyError, match="does not verify with the registered key"):
        authorize(keyring_of(km), "destroy", key=key_name, params={"versions": [1]}, request=req,
                  approvals=[good[0], impostor])


def test_request_must_match_the_operation_exactly(key_name: str) -> None:
    km = hsm()
    guarded_key(km, key_name)
    req = request(km, "destroy", key_name, versions=[1])
    good = approvals(km, req, 1, 2)
    for operation, key, params in (("destroy", key_name, {"versions": [2]}), ("backup", key_name, {"versions": [1]})):
        with pytest.raises(errors.PolicyError, match="the approved request is for destroy"):
            authorize(keyring_of(km), operation, key=key, params=params, request=req, approvals=good)
    b = hsm("keymgr-B")  # the same request shown to another HSM
    with pytest.raises(errors.PolicyError):
        from keymgr.custody.approvals import check_quorum

        check_quorum(req, good, CustodyRegister(keyring_of(km)).load(), operation="destroy", token=token_of(b),
                     key=key_name, params={"versions": [1]})


def test_expired_request_is_refused(key_name: str) -> None:
    km = hsm()
    guarded_key(km, key_name)
    old = make_request("destroy", token=token_of(km), key=key_name, params={"versions": [1]},
                       ttl=timedelta(minutes=5), now=datetime.now(UTC) - timedelta(hours=1))
    from keymgr.custody.approvals import approve

    custodian = CustodyRegister(keyring_of(km)).load().custodian(party(1).name)
    with pytest.raises(errors.PolicyError, match="expired"):
        approve(old, party(1).open(custodian))
    signed_then = [approve(old, party(n).open(CustodyRegister(keyring_of(km)).load().custodian(party(n).name)),
                           now=datetime.now(UTC) - timedelta(minutes=59)) for n in (1, 2)]
    with pytest.raises(errors.PolicyError, match="expired"):
        authorize(keyring_of(km), "destroy", key=key_name, params={"versions": [1]}, request=old, approvals=signed_then)


def test_without_a_policy_destroy_keeps_its_explicit_confirmation(key_name: str) -> None:
    km = hsm()
    km.create_key(key_name)
    assert authorize(keyring_of(km), "destroy", key=key_name, params={"versions": [1]}, request=None,
                     approvals=[]) is None
    with pytest.raises(errors.PolicyError, match="confirm it explicitly"):
        authorize_destroy(keyring_of(km), key_name, [1])
    assert authorize_destroy(keyring_of(km), key_name, [1], confirmed=True) is None


def test_policy_change_is_approved_under_the_current_policy(key_name: str) -> None:
    km = hsm()
    guarded_key(km, key_name)
    names = tuple(c.name for c in registered(km, 1, 2))
    weaker = QuorumPolicy(2, names)  # 2 of 2 named custodians instead of 2 of 3
    with pytest.raises(errors.PolicyError, match="set-policy needs approvals by 2 of 3"):
        change_policy(keyring_of(km), weaker, key=key_name)
    unbound = make_request("set-policy", token=token_of(km), key=None,
                           params={"scope": key_name, "policy": weaker.to_json()})
    with pytest.raises(errors.PolicyError, match="does not show the new custodians' keys"):
        change_policy(keyring_of(km), weaker, key=key_name, request=unbound, approvals=approvals(km, unbound, 2, 3))
    made = request(km, "set-policy", None, scope=key_name, policy=weaker.to_json())  # type: ignore[arg-type]
    with pytest.raises(errors.PolicyError, match="valid distinct approvals: 1"):
        change_policy(keyring_of(km), weaker, key=key_name, request=made, approvals=approvals(km, made, 2))
    register, transcript = change_policy(keyring_of(km), weaker, key=key_name, request=made,
                                         approvals=approvals(km, made, 2, 3))
    assert register.policy_for(key_name) == weaker and transcript
    with pytest.raises(errors.ConfigurationError, match="not dual control"):
        QuorumPolicy(1, names)


@pytest.mark.leaves_objects("eve-")  # the custodians' key pairs, named after this test's key
def test_policy_request_binds_the_new_custodians_keys_not_their_names(key_name: str) -> None:
    """Issue 14: approvals of "2 of (c1, eve)" must not carry over to an eve re-added on another token."""
    km = hsm()
    guarded_key(km, key_name)
    store = CustodyRegister(keyring_of(km))
    eve = f"eve-{key_name}"
    ts = open_token(party(1).uri())
    for label in (f"{eve}-own", f"{eve}-mal"):
        asym.generate_keypair(ts, "ec-p256", label=label)
    store.add(enroll_custodian(eve, ts, key_label=f"{eve}-own"))
    new = QuorumPolicy(2, (party(1).name, eve))
    made = request(km, "set-policy", None, scope=key_name, policy=new.to_json())  # type: ignore[arg-type]
    assert made.shows is not None and made.shows["new_quorum"]["custodians"][1]["fingerprint"] == \
        store.load().custodian(eve).fingerprint
    assert any(eve in line and store.load().custodian(eve).fingerprint in line for line in made.explain())
    approved = approvals(km, made, 1, 2)
    store.remove(eve)
    store.add(enroll_custodian(eve, ts, key_label=f"{eve}-mal"))  # same name, the attacker's key
    with pytest.raises(errors.PolicyError, match="custodian of the new quorum changed"):
        change_policy(keyring_of(km), new, key=key_name, request=made, approvals=approved)
    assert store.load().policy_for(key_name) != new


def test_register_is_authenticated_in_the_token(key_name: str) -> None:
    km = hsm()
    registered(km, 1)
    store = CustodyRegister(keyring_of(km))
    labels = [label for label, _ in objects.read_data_objects(token_of(km), application="keymgr")
              if label.startswith("keymgr/custody/register/")]
    assert len(labels) == 1
    value = dict(objects.read_data_objects(token_of(km), application="keymgr"))[labels[0]]
    doc = json.loads(value)
    doc["register"]["policies"][key_name] = {"threshold": 1, "custodians": [party(1).name]}
    forged = f"keymgr/custody/register/{doc['register']['generation'] + 1}"
    doc["register"]["generation"] += 1
    objects.write_data_object(token_of(km), application="keymgr", label=forged, value=json.dumps(doc).encode())
    try:
        with pytest.raises(errors.IntegrityError, match="custodian register .* is not authentic"):
            store.load()
    finally:
        objects.destroy_data_object(token_of(km), application="keymgr", label=forged)
    assert store.load().custodian(party(1).name).name == party(1).name


def test_custodian_token_must_hold_the_registered_key() -> None:
    km = hsm()
    one, three = registered(km, 1, 3)
    with pytest.raises(errors.PolicyError, match=f"does not hold the registered key of custodian {one.name!r}"):
        party(3).open(one)
    with pytest.raises(errors.PolicyError, match="already registered to custodian"):
        CustodyRegister(keyring_of(km)).add(type(three)(**{**three.__dict__, "name": "someone-else"}))
