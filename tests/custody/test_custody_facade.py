"""``km.custody`` and ``km.token_info``: the public face the CLI uses instead of the manager's
private keyring and token session. Each custody change is in the manager's audit log, written
by keymgr (refusals too); every call fails once the manager is closed."""

from __future__ import annotations

import dataclasses
import json
import math
import uuid
from pathlib import Path

import pytest

from keymgr import KeyManager, TokenInfo, errors
from keymgr.custody import CustodianToken, approve, enroll_custodian
from keymgr.hsm import asym, open_token
from tests._internals import token_of
from tests.conftest import softhsm_token


def _ops(log: Path) -> list[tuple[str, str]]:
    """The custody operations' outcomes in ``log`` (each change also has its intent entry before it)."""
    return [(r["op"], r["outcome"]) for r in map(json.loads, log.read_text().splitlines())
            if r["op"].startswith(("custodian-", "policy")) and r["outcome"] != "intent"]


@pytest.mark.leaves_objects("facade-")
def test_custody_changes_are_audited_by_keymgr(tmp_path: Path, key_name: str) -> None:
    holder = softhsm_token("custodian-3")
    run = uuid.uuid4().hex[:8]  # key pairs and names of this test alone: no twin in the register
    labels = [f"facade-{run}-{n}" for n in (1, 2)]
    ts = open_token(holder.uri())
    for label in labels:
        asym.generate_keypair(ts, "ec-p256", label=label)
    custodians = [enroll_custodian(label, ts, key_label=label) for label in labels]
    log = tmp_path / "audit.log"
    with KeyManager(softhsm_token("keymgr-A").uri(), audit=log) as km:
        km.create_key(key_name)
        for custodian in custodians:
            km.custody.add_custodian(custodian)
        assert set(labels) <= {c.name for c in km.custody.custodians()}
        km.custody.set_policy(km.custody.quorum_policy(2, labels), key=key_name)
        assert km.custody.register().policy_for(key_name) is not None
        with pytest.raises(errors.PolicyError, match="part of the quorum"):
            km.custody.remove_custodian(labels[0])
        with pytest.raises(errors.PolicyError, match="needs approvals"):
            km.custody.check_approvals("destroy", key=key_name, params={"versions": [1]}, request=None, approvals=())
        request = km.custody.request("set-policy", key=None, params={"scope": key_name, "policy": None})
        approvals = []
        for custodian in custodians:
            signer = CustodianToken.open(custodian, holder.uri())
            try:
                approvals.append(approve(request, signer))
            finally:
                signer.close()
        km.custody.set_policy(None, key=key_name, request=request, approvals=approvals)
        for label in labels:
            km.custody.remove_custodian(label)
        assert not set(labels) & {c.name for c in km.custody.custodians()}
        custody = km.custody
    assert _ops(log) == [("custodian-add", "ok"), ("custodian-add", "ok"), ("policy", "ok"),
                         ("custodian-remove", "refused"), ("policy", "ok"), ("custodian-remove", "ok"),
                         ("custodian-remove", "ok")]
    with pytest.raises(errors.ConfigurationError, match="closed"):
        custody.custodians()  # a facade taken before close() does not outlive the manager


def test_token_info_is_facts_only(softhsm: object) -> None:
    with KeyManager(softhsm_token().uri(), audit=False) as km:
        info = km.token_info
        ts = token_of(km)
        assert info == TokenInfo(label=ts.label, serial=ts.serial, module_path=ts.module.path)
        assert [f.name for f in dataclasses.fields(TokenInfo)] == ["label", "serial", "module_path"]
        with pytest.raises(dataclasses.FrozenInstanceError):
            info.label = "other"  # type: ignore[misc]
    with pytest.raises(errors.ConfigurationError, match="closed"):
        _ = km.token_info


@pytest.mark.parametrize("bad", [-1, math.nan, "5", True])
def test_refresh_interval_takes_seconds_only(bad: object) -> None:
    with KeyManager(softhsm_token().uri(), audit=False) as km:
        km.refresh_interval = 0  # re-read before every operation
        assert km.refresh_interval == 0.0
        with pytest.raises(errors.ConfigurationError, match="refresh_interval"):
            km.refresh_interval = bad  # type: ignore[assignment]
        assert km.refresh_interval == 0.0


@pytest.mark.parametrize("call", [
    lambda c: c.add_custodian("bob"), lambda c: c.set_policy("2of3"), lambda c: c.remove_custodian(3),
    lambda c: c.key_transcript("create", "orders"), lambda c: c.request("backup", key=None, params=None),
    lambda c: c.request("backup", key=None, params={}, ttl=5), lambda c: c.quorum_policy("2", ["a"]),
    lambda c: c.quorum_policy(True, ["a"]), lambda c: c.quorum_policy(2, "ab"),
], ids=["custodian", "policy", "name", "record", "params", "ttl", "threshold", "threshold-bool", "names-str"])
def test_wrong_arguments_are_keymgrs_own_error(softhsm: object, call: object) -> None:
    """A caller's wrong argument is a ConfigurationError naming it (they were AttributeErrors and
    TypeErrors from deep inside), and nothing is audited as done."""
    with KeyManager(softhsm.uri()) as km, pytest.raises(errors.ConfigurationError):  # type: ignore[attr-defined]
        call(km.custody)  # type: ignore[operator]
