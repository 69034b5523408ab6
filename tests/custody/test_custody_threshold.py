"""Threshold recipients: data only M custodians together can recover (break glass)."""

from __future__ import annotations

import pytest
from asn1crypto import cms

from keymgr import errors
from keymgr.custody.custodians import CustodyRegister, QuorumPolicy
from keymgr.custody.threshold import ThresholdRecipient, decrypt_with_quorum, read_threshold, threshold_recipient
from keymgr.envelope import OID_THRESHOLD_RECIPIENT, parse_message, read_other_recipient, replace_recipients
from tests._internals import keyring_of
from tests.custody_helpers import hsm, party, registered


@pytest.fixture(scope="module")
def message() -> tuple[bytes, list]:
    km = hsm()
    custodians = registered(km, 1, 2, 3)
    name = f"breakglass-{party(1).name}"
    if name not in {r.name for r in km.list_keys()}:
        km.create_key(name)
    recipient = ThresholdRecipient(custodians, 2)
    blob = km.encrypt(b"root password: hunter2", key=name, context={"vault": "prod"}, also_to=[recipient])
    return blob, custodians


def _tokens(custodians: list, *numbers: int) -> list:
    return [party(n).open(custodians[n - 1]) for n in numbers]


def test_message_carries_an_other_recipient_info_with_our_oid(message: tuple[bytes, list]) -> None:
    blob, custodians = message
    ris = parse_message(blob).recipient_infos
    ori = [ri for ri in ris if ri.dump()[0] == 0xA4]
    assert len(ori) == 1 and read_other_recipient(ori[0])[0] == OID_THRESHOLD_RECIPIENT
    info = read_threshold(ori[0])
    assert info is not None and info.threshold == 2 and info.names == tuple(c.name for c in custodians)
    assert cms.ContentInfo.load(blob)["content_type"].native == "authenticated_enveloped_data"


@pytest.mark.parametrize("numbers", [(1, 2), (1, 3), (2, 3), (3, 1, 2)])
def test_any_two_custodians_recover(message: tuple[bytes, list], numbers: tuple[int, ...]) -> None:
    blob, custodians = message
    assert decrypt_with_quorum(blob, _tokens(custodians, *numbers), context={"vault": "prod"}) == \
        b"root password: hunter2"


def test_one_custodian_or_wrong_context_fails(message: tuple[bytes, list]) -> None:
    blob, custodians = message
    with pytest.raises(errors.PolicyError, match="needs 2 of its custodians .* only 1 took part"):
        decrypt_with_quorum(blob, _tokens(custodians, 2), context={"vault": "prod"})
    with pytest.raises(errors.IntegrityError):
        decrypt_with_quorum(blob, _tokens(custodians, 1, 2), context={"vault": "dev"})


def test_tampered_share_is_named(message: tuple[bytes, list]) -> None:
    blob, custodians = message
    ris = list(parse_message(blob).recipient_infos)
    index = next(i for i, ri in enumerate(ris) if ri.dump()[0] == 0xA4)
    raw = bytearray(ris[index].dump())
    raw[-40] ^= 0x01  # inside the ciphertext of the last share (custodian 3's): the DER stays intact
    ris[index] = cms.RecipientInfo.load(bytes(raw))
    tampered = replace_recipients(blob, ris)
    last = custodians[-1].name
    with pytest.raises(errors.IntegrityError, match=f"custodian {last!r}"):
        decrypt_with_quorum(tampered, _tokens(custodians, 1, 3), context={"vault": "prod"})
    assert decrypt_with_quorum(tampered, _tokens(custodians, 1, 2), context={"vault": "prod"})


def test_a_share_that_is_not_the_one_dealt_is_named(message: tuple[bytes, list]) -> None:
    """Custodian 1's commitment swapped for custodian 2's: the share still opens, its commitment
    check names custodian 1 (the same check and message as a backup's, keymgr.custody._shares)."""
    from keymgr.custody.threshold import _Value
    from keymgr.envelope.recipients import other_recipient_info

    blob, custodians = message
    ris = list(parse_message(blob).recipient_infos)
    index = next(i for i, ri in enumerate(ris) if ri.dump()[0] == 0xA4)
    value = _Value.load(read_other_recipient(ris[index])[1])
    first, second = value["shares"][0]["commitment"].native, value["shares"][1]["commitment"].native
    value["shares"][0]["commitment"] = second
    value["shares"][1]["commitment"] = first
    ris[index] = other_recipient_info(OID_THRESHOLD_RECIPIENT, value.dump(force=True))
    swapped = replace_recipients(blob, ris)
    with pytest.raises(errors.IntegrityError, match=f"share of custodian {custodians[0].name!r} does not match "
                                                    "its commitment in the message"):
        decrypt_with_quorum(swapped, _tokens(custodians, 1, 3), context={"vault": "prod"})
    assert decrypt_with_quorum(blob, _tokens(custodians, 1, 3), context={"vault": "prod"})  # the control


def test_recipient_from_the_register_policy(key_name: str) -> None:
    km = hsm()
    custodians = registered(km, 1, 2)
    km.create_key(key_name)
    CustodyRegister(keyring_of(km)).set_policy(QuorumPolicy(2, tuple(c.name for c in custodians)), key=key_name)
    recipient = threshold_recipient(CustodyRegister(keyring_of(km)).load(), key=key_name)
    blob = km.encrypt(b"x", key=key_name, also_to=[recipient])
    assert decrypt_with_quorum(blob, _tokens(custodians, 1, 2)) == b"x"
    assert recipient.description.startswith("any 2 of")
