"""A PIN holder plants a KEK whose value they know and forges the keyring fact that makes it primary.

The threat model's main case is a compromised application host: it holds the user PIN, so it
can C_Sign with the metadata MAC key (a forged fact MACs fine), import an AES key with a known
value (C_CreateObject) or generate a readable one, and label it like a keymgr version. If keymgr
then encrypted under it, every later message would decrypt offline, without the token.
keymgr must refuse: the planted version never encrypts, ``keymgr key verify`` names it (exit 4),
the refusal is in the audit log, and data encrypted after the attack (once the operator rotates)
does not open with the planted value.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap
from pkcs11 import Attribute, KeyType, ObjectClass

import keymgr
from keymgr._canonical import canonical_json as canonical
from keymgr.audit import AuditLog
from keymgr.keyring.facts import Fact, new_fact_id
from keymgr.keyring.store import APPLICATION, FACT_PREFIX, META_MAC_LABEL
from tests._internals import keyring_of, token_of
from tests.conftest import TokenUnderTest

REPO = Path(__file__).resolve().parents[2]


def _plant(km: keymgr.KeyManager, name: str, how: str) -> tuple[bytes, bytes]:
    """The attack, with python-pkcs11 directly under the victim's login: make a KEK whose value
    the attacker knows, then forge a version fact naming it with the highest epoch. Returns
    (planted CKA_ID, its value)."""
    value = os.urandom(32)
    key_id = os.urandom(16)
    record = km.describe_key(name)
    label = f"{name}/v{len(record.versions) + 1}"

    def attack(session: object) -> tuple[bytes, str]:
        roles = {Attribute.WRAP: True, Attribute.UNWRAP: True, Attribute.ENCRYPT: False, Attribute.DECRYPT: False,
                 Attribute.SIGN: False, Attribute.VERIFY: False, Attribute.DERIVE: False}
        if how == "imported":
            key = session.create_object({  # type: ignore[attr-defined]
                Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES, Attribute.TOKEN: True,
                Attribute.PRIVATE: True, Attribute.LABEL: label, Attribute.ID: key_id, Attribute.VALUE: value,
                Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.MODIFIABLE: False,
                Attribute.COPYABLE: False, **roles})
            planted = value
        else:  # generated inside the token, but readable: LOCAL is true, ALWAYS_SENSITIVE is not
            key = session.generate_key(KeyType.AES, 256, label=label, id=key_id, store=True,  # type: ignore[attr-defined]
                                       template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True, **roles})
            planted = bytes(key[Attribute.VALUE])
            key[Attribute.SENSITIVE] = True
            key[Attribute.EXTRACTABLE] = False
        kcv = bytes(key[Attribute.CHECK_VALUE]).hex()
        facts = keyring_of(km).facts(name)
        epoch = 1000 + max((f.body.get("epoch") or 0 for f in facts), default=0)
        fact = Fact("version", name, new_fact_id(), "2026-12-06T00:00:00Z",
                    {"kid": key_id.hex(), "num": len(record.versions) + 1, "kcv": kcv, "epoch": epoch,
                     "restored": False})
        inner = fact.to_json()
        mac_key = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,  # type: ignore[attr-defined]
                                            Attribute.LABEL: META_MAC_LABEL}))[0]  # list(): the search ends here
        from pkcs11 import Mechanism

        mac = mac_key.sign(b"keymgr keyring fact v2\x00" + canonical(inner), mechanism=Mechanism.SHA256_HMAC)
        session.create_object({  # type: ignore[attr-defined]
            Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: True, Attribute.PRIVATE: True,
            Attribute.APPLICATION: APPLICATION, Attribute.LABEL: f"{FACT_PREFIX}{name}/{fact.fact_id}",
            Attribute.VALUE: canonical({"fact": inner, "mac": bytes(mac).hex(), "key": mac_key[Attribute.ID].hex()})})
        return planted, kcv

    planted, _ = token_of(km).run("plant a KEK", attack)
    return key_id, planted


def _opens_with(blob: bytes, value: bytes) -> bool:
    """Whether any KEK recipient's wrapped data key of a message unwraps under ``value`` (offline)."""
    content = cms.ContentInfo.load(blob)["content"]
    wrapped = [ri.chosen["encrypted_key"].native for ri in content["recipient_infos"] if ri.name == "kekri"]
    assert wrapped, "the message has no KEK recipient"
    for data in wrapped:
        try:
            aes_key_unwrap(value, data)
            return True
        except (InvalidUnwrap, ValueError):
            continue
    return False


def test_a_known_value_key_never_encrypts_even_for_the_keyring_that_recorded_it(softhsm: TokenUnderTest,
                                                                                  key_name: str) -> None:
    """No caller of keymgr, the tests included, can make a key of known value that encrypts: the
    very manager whose keyring recorded the imported version refuses it (keymgr once exempted
    such a keyring: a back door). Decrypting under it is tests/envelope/test_envelope_rfc5083.py's."""
    from tests._known_keys import imported_key

    with keymgr.KeyManager(softhsm.uri(), audit=False) as km:
        imported_key(km, key_name, os.urandom(32))
        for _ in range(2):  # and not from a cache on the second try
            with pytest.raises(keymgr.PolicyError, match=r"CKA_LOCAL is False \(not generated in this token\)"):
                km.encrypt(b"under a known key", key=key_name)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["imported", "generated-readable"])
def test_a_planted_kek_never_encrypts(softhsm: TokenUnderTest, key_name: str, tmp_path: Path, how: str) -> None:
    log = tmp_path / "audit.log"
    with keymgr.KeyManager(softhsm.uri(), audit=AuditLog(log)) as km:
        km.create_key(key_name)
        before = km.encrypt(b"before the attack", key=key_name)
        planted_id, planted_value = _plant(km, key_name, how)
    # a fresh manager (another host, or the app restarted): the forged fact is authentic and wins the primary
    with keymgr.KeyManager(softhsm.uri(), audit=AuditLog(log)) as km:
        record = km.describe_key(key_name)
        assert record.primary_version.key_id == planted_id  # the forgery is MACed by the real key
        attribute = "CKA_LOCAL" if how == "imported" else "CKA_ALWAYS_SENSITIVE"
        with pytest.raises(keymgr.PolicyError, match=f"version {record.primary} .*may not encrypt.*{attribute}"):
            km.encrypt(b"after the attack", key=key_name)
        with pytest.raises(keymgr.PolicyError, match=attribute):  # and not by a cached data key either
            km.encrypt(b"again", key=key_name)
        assert km.decrypt(before) == b"before the attack"
        checks = {c.key_id: c for c in km.verify_keys(key_name)}
        assert not checks[planted_id].ok and attribute in checks[planted_id].verdict
        assert all(c.ok for k, c in checks.items() if k != planted_id)
        # the operator's response: rotate; the new version is generated here and encrypts
        rotated = km.rotate(key_name)
        assert rotated.primary_version.key_id != planted_id
        after = km.encrypt(b"after the rotation", key=key_name)
        assert km.decrypt(after) == b"after the rotation"
    assert not _opens_with(after, planted_value)
    assert not _opens_with(before, planted_value)
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    refused = [e for e in entries if e.get("op") == "encrypt" and e.get("outcome") != "ok"]
    assert refused and "PolicyError" in json.dumps(refused)
    # keymgr key verify names the planted version and exits 4
    env = {**os.environ, **softhsm.env, "PYTHONPATH": str(REPO), "KEYMGR_AUDIT_LOG": str(tmp_path / "cli.log")}
    proc = subprocess.run([sys.executable, "-m", "keymgr", "--token", softhsm.uri(), "key", "verify", key_name],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert planted_id.hex() in proc.stdout and "FAILED" in proc.stdout and attribute in proc.stdout


def _swapper(key_id: bytes, label: str, profile: str, *, extractable: bool) -> Any:
    """A token call that destroys the object(s) under ``key_id`` and creates in their place an
    AES key of a value the PIN holder chose (not LOCAL), with the roles of ``profile``."""
    roles = ({Attribute.WRAP: True, Attribute.UNWRAP: True} if profile == "kw"
             else {Attribute.ENCRYPT: True, Attribute.DECRYPT: True})

    def swap(session: Any) -> None:
        for obj in list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: key_id})):
            obj.destroy()
        session.create_object({
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES, Attribute.TOKEN: True,
            Attribute.PRIVATE: True, Attribute.LABEL: label, Attribute.ID: key_id, Attribute.VALUE: os.urandom(32),
            Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: extractable, Attribute.MODIFIABLE: False, **roles})

    return swap


@pytest.mark.parametrize("profile", ["kw", "gcm"])
def test_a_kek_replaced_under_a_running_manager_never_encrypts(softhsm: TokenUnderTest, key_name: str,
                                                               profile: str) -> None:
    """The running process checked the genuine version already; the PIN holder destroys its object
    and imports one of known value under the same CKA_ID. The next encryption must not use it."""
    with keymgr.KeyManager(softhsm.uri(), audit=False) as km:
        record = km.create_key(key_name, profile=profile)
        km.encrypt(b"checked and trusted", key=key_name)
        key_id = record.primary_version.key_id
        token_of(km).run("swap the KEK", _swapper(key_id, f"{key_name}/v1", profile, extractable=False))
        outcomes = []
        for _ in range(5):
            try:
                km.encrypt(b"after the swap", key=key_name)
                outcomes.append("encrypted")
            except (keymgr.KeyNotFoundError, keymgr.PolicyError) as exc:
                outcomes.append(type(exc).__name__ + (": CKA_LOCAL" if "CKA_LOCAL" in str(exc) else ""))
    assert "encrypted" not in outcomes, outcomes
    assert outcomes[-1] == "PolicyError: CKA_LOCAL", outcomes


@pytest.mark.parametrize("profile", ["kw", "gcm"])
def test_a_kek_swapped_while_the_session_reopens_mid_call_never_encrypts(softhsm: TokenUnderTest, key_name: str,
                                                                        profile: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The provenance check passed for the object this session holds; then, inside the token call
    that encrypts, the session is reopened (its handle cache starts empty) and the object under
    that CKA_ID is found anew. A PIN holder who swapped the object in between must not get the
    message: the find itself asks for the attributes only a generated key shows, so the planted
    object is never the one found."""
    from keymgr.hsm import objects

    with keymgr.KeyManager(softhsm.uri(), audit=False) as km:
        record = km.create_key(key_name, profile=profile)
        km.encrypt(b"checked and trusted", key=key_name)
        key_id = record.primary_version.key_id
        ts = token_of(km)
        swap = _swapper(key_id, f"{key_name}/v1", profile, extractable=True)

        real_with_key = objects._with_key

        def reopened_mid_call(ts_: object, kid: bytes, operation: str, use: object, **kw: object) -> object:
            if kid == key_id and operation in ("wrap data key", "encrypt data key"):
                ts.cache.clear()  # what a session reopened inside TokenSession.run starts with
                ts.run("swap the KEK", swap)
            return real_with_key(ts_, kid, operation, use, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(objects, "_with_key", reopened_mid_call)
        with pytest.raises(keymgr.KeyNotFoundError):
            km.encrypt(b"after the swap", key=key_name)
