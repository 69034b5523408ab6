"""Opt-in tests against a real USB key, smart card or HSM (``pytest -m hardware``).

They run only when ``KEYMGR_HW_TOKEN`` names the token by URI (with its PIN
source), and use only what a PIV card can do: an existing key pair (they never
generate one: on a PIV card that would overwrite a slot), its public key,
signing, and decrypting a data key by RSA-OAEP or ECDH. docs/tokens.md says how
to run them against a YubiKey, a Nitrokey or an OpenSC card.

Environment:

* ``KEYMGR_HW_TOKEN``: the token URI, e.g.
  ``pkcs11:token=YubiKey%20PIV%20%2312345678?module-path=/usr/lib/x86_64-linux-gnu/libykcs11.so&pin-source=env:PIV_PIN``
* ``KEYMGR_HW_KEY``: the key pair's CKA_LABEL (default: every key pair keymgr can use)
* ``KEYMGR_HW_SPEND_PIN_TRY=1``: also check the wrong-PIN report, which costs
  the card exactly one PIN try (the test then logs in with the right PIN,
  which resets the counter on PIV cards)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from keymgr.hsm import Pkcs11Uri, TokenSession, asym, open_token, probe
from keymgr.recipients import pubkey

HW_URI = os.environ.get("KEYMGR_HW_TOKEN", "")
pytestmark = [pytest.mark.hardware,
              pytest.mark.skipif(not HW_URI, reason="opt-in: set KEYMGR_HW_TOKEN=<pkcs11 URI> to test a real token")]


@pytest.fixture(scope="module")
def hw() -> TokenSession:
    return open_token(HW_URI)


@pytest.fixture(scope="module")
def pairs(hw: TokenSession) -> list[asym.KeyPairRef]:
    wanted = os.environ.get("KEYMGR_HW_KEY")
    found = [asym.find_keypair(hw, label=wanted)] if wanted else asym.list_keypairs(hw)
    if not found:
        pytest.fail(f"token {hw.label!r} holds no RSA 2048-4096 / P-256 / P-384 key pair (put one in a PIV slot)")
    return found


def test_public_keys_and_signatures(hw: TokenSession, pairs: list[asym.KeyPairRef]) -> None:
    for ref in pairs:
        public = asym.public_key(hw, ref)
        signature = asym.sign(hw, ref, b"keymgr hardware test")
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, b"keymgr hardware test", padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                          hashes.SHA256())
        else:
            assert isinstance(public, ec.EllipticCurvePublicKey)
            public.verify(signature, b"keymgr hardware test",
                          ec.ECDSA(hashes.SHA256() if ref.kind == "ec-p256" else hashes.SHA384()))


def test_message_to_public_key_decrypted_by_the_card(hw: TokenSession, pairs: list[asym.KeyPairRef]) -> None:
    caps = probe(hw)
    usable = [r for r in pairs if (caps.oaep_hash() if r.is_rsa else caps.has(f"ecdh-{r.kind[3:]}"))]
    if not usable:
        pytest.skip(f"token {hw.label!r} decrypts neither RSA-OAEP nor ECDH with its keys (probed)")
    for ref in usable:
        key = pubkey.TokenPrivateKey(hw, ref)
        blob = pubkey.encrypt_to(b"to the card", [key.recipient()], context={"test": "hardware"})
        assert pubkey.decrypt_with(blob, [key], context={"test": "hardware"}) == b"to the card"


def test_key_uri_finds_the_same_key(hw: TokenSession, pairs: list[asym.KeyPairRef]) -> None:
    base = Pkcs11Uri.parse(HW_URI)
    for ref in pairs:
        uri = base.with_(object=ref.label, type="private")
        again = open_token(uri)
        assert asym.find_keypair(again, label=uri.object) == ref


@pytest.mark.skipif(os.environ.get("KEYMGR_HW_SPEND_PIN_TRY") != "1",
                    reason="costs one PIN try: set KEYMGR_HW_SPEND_PIN_TRY=1")
def test_one_wrong_pin_is_reported_with_the_cards_state() -> None:
    """In a fresh process (this one is logged in): one wrong PIN, then the right one, which
    resets a PIV card's counter. keymgr must report the first and not retry it."""
    wrong = Pkcs11Uri.parse(HW_URI).with_(pin_value="00000000", pin_source=None)
    code = ("import json, sys\nfrom keymgr import errors\nfrom keymgr.hsm import open_token\nout = []\n"
            "for uri in sys.argv[1:]:\n    try:\n        open_token(uri).close(); out.append({'ok': True})\n"
            "    except errors.KeymgrError as e:\n"
            "        out.append({'error': type(e).__name__, 'tries_left': getattr(e, 'tries_left', None)})\n"
            "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", code, wrong.format(include_secrets=True), HW_URI],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    first, second = json.loads(proc.stdout.strip().splitlines()[-1])
    assert first.get("error") == "PinIncorrectError", first
    assert first["tries_left"] in {"unknown", "count-low", "final-try"}
    assert second == {"ok": True}
