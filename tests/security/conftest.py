"""Fixtures of the security suite: keys of every keymgr template, made by keymgr, on SoftHSM.

The attack suite runs on SoftHSM 2.6.1 (the issue's reference token, and the
one whose behaviour STACK-FACTS.md records); every key is created through
keymgr's own code paths (KeyManager / Keyring / keymgr.hsm), never by the test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from keymgr import KeyManager
from keymgr.hsm import asym, objects
from keymgr.hsm.templates import TRANSPORT_IMPORT, TRANSPORT_KEY
from keymgr.keyring.store import META_MAC_LABEL
from tests._internals import token_of
from tests._known_keys import import_secret_key
from tests.conftest import softhsm_token
from tests.security._attacker import Target

RUN = uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def manager() -> Iterator[KeyManager]:
    with KeyManager(softhsm_token().uri()) as km:
        yield km


@pytest.fixture(scope="session")
def targets(manager: KeyManager) -> Iterator[dict[str, Target]]:
    """One key per template keymgr makes, keyed by template purpose."""
    km = manager
    made: dict[str, bytes] = {}
    for profile in ("kw", "gcm"):
        for backup in (False, True):
            name = f"sec-{profile}{'-b' if backup else ''}-{RUN}"
            km.create_key(name, profile=profile, backup=backup)
            purpose = {"kw": "kek-wrap", "gcm": "kek-gcm"}[profile] + ("+backup" if backup else "")
            made[purpose] = km.describe_key(name).primary_version.key_id
    # the keyring's own MAC key, made by the first create above: found by its label (its CKA_ID has a
    # random part); the lowest CKA_ID is the one every writer MACs with
    mac_keys = objects.singleton_keys(token_of(km), META_MAC_LABEL)
    assert mac_keys, "the keyring made no metadata MAC key"
    made["mac"] = mac_keys[0]
    made["blind-index"] = km.blind_index(f"sec-index-{RUN}", bits=32).key_ids()[0]
    ts = token_of(km)
    session_ids = {"transport": os.urandom(16), "transport-import": os.urandom(16)}
    objects.generate_key(ts, TRANSPORT_KEY, label=f"sec-transport-{RUN}", key_id=session_ids["transport"])
    # the restoring side makes its transport key from the custodians' recovered value (keymgr.hsm.transport)
    import_secret_key(ts, TRANSPORT_IMPORT, label=f"sec-transport-import-{RUN}",
                      key_id=session_ids["transport-import"], value=os.urandom(32))
    made.update(session_ids)
    pairs = {"keypair-rsa": asym.generate_keypair(ts, "rsa-2048", label=f"sec-rsa-{RUN}"),
             "keypair-ec": asym.generate_keypair(ts, "ec-p256", label=f"sec-ec-{RUN}")}
    lever = made["kek-wrap"]
    out = {purpose: Target(purpose, key_id, lever_id=lever) for purpose, key_id in made.items()}
    from pkcs11 import ObjectClass

    for purpose, ref in pairs.items():
        out[purpose] = Target(purpose, ref.key_id, ObjectClass.PRIVATE_KEY, lever_id=lever)
    yield out
    for key_id in session_ids.values():
        objects.destroy_key(ts, key_id)
    for ref in pairs.values():
        _destroy_pair(ts, ref.key_id)


def _destroy_pair(ts: object, key_id: bytes) -> None:
    def call(session: object) -> None:
        from pkcs11 import Attribute

        for obj in list(session.get_objects({Attribute.ID: key_id})):  # type: ignore[attr-defined]
            obj.destroy()

    ts.run("destroy test key pair", call)  # type: ignore[attr-defined]
