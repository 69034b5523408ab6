"""Key pairs on real tokens (keymgr.hsm.asym): generation, lookup, the four private-key operations,
CKA_ALWAYS_AUTHENTICATE, and the probe's clean-up, on SoftHSM and the TPM."""

from __future__ import annotations

import os
import uuid

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pkcs11 import Attribute, ObjectClass

import keymgr
from keymgr.hsm import TokenSession, asym, open_token, probe
from keymgr.hsm.pins import PinRequest, pin_source_from_uri
from tests.conftest import TokenUnderTest, requires, softhsm_token

#: the key pairs stay on the shared tokens, under labels unique to each test (``_label``)
pytestmark = pytest.mark.leaves_objects("t-")


def _label(kind: str) -> str:
    return f"t-{kind}-{uuid.uuid4().hex[:8]}"


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rsa-2048", "ec-p256", "ec-p384"])
def test_generate_find_sign_and_recover(token: TokenUnderTest, kind: str) -> None:
    requires(token, "rsa-keygen" if kind.startswith("rsa") else "ec-keygen")
    ts = open_token(token.uri())
    ref = asym.generate_keypair(ts, kind, label=_label(kind))
    assert asym.find_keypair(ts, label=ref.label) == ref
    assert asym.find_keypair(ts, key_id=ref.key_id) == ref
    public = asym.public_key(ts, ref)
    signature = asym.sign(ts, ref, b"approve: destroy key k1")
    if isinstance(public, rsa.RSAPublicKey):
        public.verify(signature, b"approve: destroy key k1", padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                      hashes.SHA256())
        oaep_hash = probe(ts).oaep_hash()
        assert oaep_hash is not None
        algorithm = hashes.SHA256() if oaep_hash == "sha256" else hashes.SHA1()
        ciphertext = public.encrypt(b"k" * 32, padding.OAEP(padding.MGF1(algorithm), algorithm, None))
        assert asym.rsa_oaep_decrypt(ts, ref, ciphertext, hash=oaep_hash) == b"k" * 32
        flipped = bytes([ciphertext[0] ^ 1]) + ciphertext[1:]
        with pytest.raises(keymgr.IntegrityError):
            asym.rsa_oaep_decrypt(ts, ref, flipped, hash=oaep_hash)
        with pytest.raises(keymgr.IntegrityError):
            asym.rsa_oaep_decrypt(ts, ref, ciphertext[:-1], hash=oaep_hash)
        # the failed operations left nothing active: the next decrypt works
        assert asym.rsa_oaep_decrypt(ts, ref, ciphertext, hash=oaep_hash) == b"k" * 32
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signature, b"approve: destroy key k1",
                      ec.ECDSA(hashes.SHA256() if kind == "ec-p256" else hashes.SHA384()))
        if probe(ts).has(f"ecdh-{kind[3:]}"):
            peer = ec.generate_private_key(public.curve)
            assert asym.ecdh_derive(ts, ref, _point(peer.public_key())) == peer.exchange(ec.ECDH(), public)
        else:
            with pytest.raises(keymgr.MechanismUnsupportedError):
                asym.ecdh_derive(ts, ref, _point(ec.generate_private_key(public.curve).public_key()))


@pytest.mark.requires("rsa-keygen")
def test_private_key_is_sensitive_non_extractable_token_object(token: TokenUnderTest) -> None:
    ts = open_token(token.uri())
    ref = asym.generate_keypair(ts, "rsa-2048", label=_label("attrs"))

    def read(session: pkcs11.Session) -> dict[str, object]:  # type: ignore[name-defined]
        (key,) = session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: ref.key_id})
        return {name: key[Attribute[name]] for name in ("SENSITIVE", "EXTRACTABLE", "TOKEN", "PRIVATE",
                                                        "NEVER_EXTRACTABLE", "LOCAL", "DECRYPT", "SIGN")}

    attrs = ts.run("read", read)
    assert attrs == {"SENSITIVE": True, "EXTRACTABLE": False, "TOKEN": True, "PRIVATE": True,
                     "NEVER_EXTRACTABLE": True, "LOCAL": True, "DECRYPT": True, "SIGN": True}


def test_same_label_is_refused_and_lookups_fail_clearly(softhsm: TokenUnderTest) -> None:
    ts = open_token(softhsm.uri())
    ref = asym.generate_keypair(ts, "ec-p256", label=_label("dup"))
    with pytest.raises(keymgr.PolicyError):
        asym.generate_keypair(ts, "ec-p256", label=ref.label)
    with pytest.raises(keymgr.KeyNotFoundError):
        asym.find_keypair(ts, label="no-such-" + uuid.uuid4().hex)
    with pytest.raises(keymgr.ConfigurationError):
        asym.generate_keypair(ts, "dsa-1024", label=_label("bad"))
    # two pairs sharing a label (made behind keymgr's back) are ambiguous, not a guess
    twin = _label("twin")
    for _ in range(2):
        ts.run("twin", lambda s: s.create_domain_parameters(
            pkcs11.KeyType.EC, {Attribute.EC_PARAMS: pkcs11.util.ec.encode_named_curve_parameters("secp256r1")},
            local=True).generate_keypair(store=True, label=twin, id=os.urandom(8)))
    with pytest.raises(keymgr.PolicyError):
        asym.find_keypair(ts, label=twin)


def test_invalid_peer_points_never_reach_the_token(softhsm: TokenUnderTest) -> None:
    ts = open_token(softhsm.uri())
    ref = asym.generate_keypair(ts, "ec-p256", label=_label("curve"))
    good = _point(ec.generate_private_key(ec.SECP256R1()).public_key())
    off_curve = good[:-1] + bytes([good[-1] ^ 1])
    other_curve = _point(ec.generate_private_key(ec.SECP384R1()).public_key())
    compressed = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    for bad in (off_curve, other_curve, compressed, b"", b"\x04" + bytes(64)):
        with pytest.raises(keymgr.FormatError):
            asym.ecdh_derive(ts, ref, bad)


def _always_authenticate_pair(ts: object, label: str) -> asym.KeyPairRef:
    """An EC and an RSA pair with CKA_ALWAYS_AUTHENTICATE, as a PIV signature slot has (SoftHSM honours it)."""
    key_id = os.urandom(8)

    def make(session: pkcs11.Session) -> None:  # type: ignore[name-defined]
        session.generate_keypair(pkcs11.KeyType.RSA, 2048, store=True, label=label, id=key_id,
                                 private_template={Attribute.ALWAYS_AUTHENTICATE: True, Attribute.DECRYPT: True,
                                                   Attribute.SIGN: True})

    ts.run("make", make)  # type: ignore[attr-defined]
    return asym.KeyPairRef(ts.label, key_id, label, "rsa-2048")  # type: ignore[attr-defined]


def _asking_session(tok: TokenUnderTest, callback: object, monkeypatch: pytest.MonkeyPatch) -> TokenSession:
    """A session of ``tok`` whose context-specific PINs come from ``callback``. open_token shares
    one session per token in a process, with the PIN source of whoever opened it first (another
    test may have, with a PIN in its URI): for this test, that shared session asks ``callback``
    (restored after; closing it instead would leave its other holders reopening sessions the
    process no longer tracks)."""
    ts = open_token(tok.uri(pin=False), pin_callback=callback)  # type: ignore[arg-type]
    monkeypatch.setattr(ts, "_pin_source", pin_source_from_uri(None, None))
    monkeypatch.setattr(ts, "_pin_callback", callback)
    return ts


def test_always_authenticate_asks_the_callback_each_use(softhsm: TokenUnderTest,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    tok = softhsm_token("custodian-3")
    asked: list[PinRequest] = []

    def callback(request: PinRequest) -> str:
        asked.append(request)
        return tok.user_pin

    ts = _asking_session(tok, callback, monkeypatch)
    ref = _always_authenticate_pair(ts, _label("piv-9c"))
    public = asym.public_key(ts, ref)
    assert isinstance(public, rsa.RSAPublicKey)
    logins = len(asked)
    ciphertext = public.encrypt(b"s" * 32, padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))
    assert asym.rsa_oaep_decrypt(ts, ref, ciphertext, hash="sha1") == b"s" * 32
    asym.sign(ts, ref, b"approval")
    assert [r.reason for r in asked[logins:]] == ["context-specific", "context-specific"]
    assert all(r.token_label == "custodian-3" for r in asked)


def test_wrong_context_pin_is_reported_and_not_retried(softhsm: TokenUnderTest,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    tok = softhsm_token("custodian-2")
    context_answers = iter(["0000", tok.user_pin])  # a wrong PIN for the first use, then the right one
    asked: list[str] = []

    def callback(request: PinRequest) -> str:
        asked.append(request.reason)
        return next(context_answers) if request.reason == "context-specific" else tok.user_pin

    ts = _asking_session(tok, callback, monkeypatch)
    ref = _always_authenticate_pair(ts, _label("ctx"))
    public = asym.public_key(ts, ref)
    assert isinstance(public, rsa.RSAPublicKey)
    ciphertext = public.encrypt(b"p" * 32, padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))
    with pytest.raises(keymgr.PinIncorrectError) as caught:
        asym.rsa_oaep_decrypt(ts, ref, ciphertext, hash="sha1")
    assert "0000" not in str(caught.value)
    assert asked.count("context-specific") == 1  # asked once, not retried
    # the next use asks again and works (the half-done operation was cleared)
    assert asym.rsa_oaep_decrypt(ts, ref, ciphertext, hash="sha1") == b"p" * 32


def test_probe_leaves_no_probe_objects(token: TokenUnderTest) -> None:
    ts = open_token(token.uri())
    caps = probe(ts, refresh=True)
    assert caps.supported  # both tokens can do something

    def leftovers(session: pkcs11.Session) -> list[object]:  # type: ignore[name-defined]
        return list(session.get_objects({Attribute.LABEL: "keymgr-probe"}))

    assert ts.run("find probe objects", leftovers) == []


def test_probed_capability_sets(token: TokenUnderTest) -> None:
    """What each token was measured to do (docs/tokens.md): a change in SoftHSM or tpm2-pkcs11
    shows up here first."""
    caps = probe(open_token(token.uri()))
    if token.kind == "softhsm":
        assert {"aes-kw", "aes-gcm", "hmac-sha256", "rsa-oaep-sha1", "ecdh-p256", "ecdh-p384",
                "ecdsa-sign", "rsa-pss-sign"} <= caps.supported
        assert set(caps.schemes) >= {"kek-kw", "kek-gcm", "rsa-oaep", "ecdh"}
    else:
        assert {"rsa-keygen", "rsa-oaep-sha1", "rsa-oaep-sha256", "rsa-pss-sign", "ec-keygen",
                "ecdsa-sign"} <= caps.supported
        assert not caps.supported & {"aes-keygen", "aes-kw", "aes-gcm", "ecdh-p256", "ecdh-p384"}
        assert caps.schemes == ("rsa-oaep",)


def test_key_pair_asked_for_a_role_it_lacks_is_a_policy_error(tpm: TokenUnderTest) -> None:
    """The TPM's EC key (made by tpm2_ptool) has no CKA_DERIVE: python-pkcs11 answers with a bare
    AttributeError, which must reach the caller as a PolicyError naming the role."""
    ts = open_token(tpm.uri())
    ref = asym.find_keypair(ts, label="ec-kek")
    point = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    with pytest.raises(keymgr.PolicyError, match="key pair 'ec-kek' has no derive role"):
        asym.ecdh_derive(ts, ref, point)
    signature = asym.sign(ts, ref, b"still usable for what it may do")
    public = asym.public_key(ts, ref)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, b"still usable for what it may do", ec.ECDSA(hashes.SHA256()))
