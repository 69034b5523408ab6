"""Public-key recipients (keymgr.recipients.pubkey): encrypt from the public key alone, decrypt in the token.

RSA-OAEP on both tokens (SHA-256 on the TPM, SHA-1 where SoftHSM 2.6.1 can do only that),
ECDH P-256 / P-384 on SoftHSM (the TPM has no C_DeriveKey), OpenSSL interop both ways.
"""

from __future__ import annotations

import datetime
import io
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

import keymgr
from keymgr.envelope import DataKey, parse_message, replace_recipients
from keymgr.hsm import asym, open_token, probe
from keymgr.recipients import pubkey
from tests.conftest import TokenUnderTest, requires, softhsm_token

#: the recipients' key pairs stay on the shared tokens, each label with a random part
pytestmark = pytest.mark.leaves_objects("pk-")

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


def _pem(key: pubkey.PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _token_key(tok: TokenUnderTest, kind: str) -> pubkey.TokenPrivateKey:
    ts = open_token(tok.uri())
    return pubkey.TokenPrivateKey(ts, asym.generate_keypair(ts, kind, label=f"pk-{kind}-{uuid.uuid4().hex[:8]}"))


@pytest.fixture(scope="module")
def tpm_rsa(request: pytest.FixtureRequest) -> pubkey.TokenPrivateKey:
    from tests.conftest import tpm_token

    return _token_key(tpm_token(), "rsa-2048")


def test_tpm_rsa_oaep_sha256_from_public_key_alone(tpm: TokenUnderTest, tpm_rsa: pubkey.TokenPrivateKey) -> None:
    # the encrypting side sees only a PEM: no token, no PIN
    pem = _pem(asym.public_key(open_token(tpm.uri()), tpm_rsa.ref))
    recipient = pubkey.public_key_recipient(pem, oaep_hash="sha256")
    blob = pubkey.encrypt_to(b"for the TPM only", [recipient], context={"purpose": "test"})
    ktri = parse_message(blob).recipient_infos[0].chosen
    params = ktri["key_encryption_algorithm"]["parameters"]
    assert ktri["key_encryption_algorithm"]["algorithm"].dotted == pubkey.OID_RSAES_OAEP
    assert params["hash_algorithm"]["algorithm"].native == "sha256"
    assert params["mask_gen_algorithm"]["parameters"]["algorithm"].native == "sha256"
    assert pubkey.decrypt_with(blob, [tpm_rsa], context={"purpose": "test"}) == b"for the TPM only"
    with pytest.raises(keymgr.IntegrityError):
        pubkey.decrypt_with(blob, [tpm_rsa], context={"purpose": "other"})
    # the token's own recipient picks SHA-256, because the probe found the TPM can
    assert "OAEP-SHA256" in tpm_rsa.recipient().description


def test_tpm_stream_to_rsa_key(tpm: TokenUnderTest, tpm_rsa: pubkey.TokenPrivateKey) -> None:
    data = os.urandom(300_000)
    sealed = io.BytesIO()
    pubkey.encrypt_stream_to(io.BytesIO(data), sealed, [tpm_rsa.recipient()], context={"f": "x"})
    out = io.BytesIO()
    assert pubkey.decrypt_stream_with(io.BytesIO(sealed.getvalue()), out, [tpm_rsa], context={"f": "x"}) == len(data)
    assert out.getvalue() == data


def test_tampered_encrypted_key_is_an_integrity_error(tpm: TokenUnderTest, tpm_rsa: pubkey.TokenPrivateKey) -> None:
    blob = pubkey.encrypt_to(b"x", [tpm_rsa.recipient()])
    ri = parse_message(blob).recipient_infos[0]
    raw = bytearray(ri.dump())
    raw[-5] ^= 0x40  # inside encryptedKey
    tampered = replace_recipients(blob, [cms.RecipientInfo.load(bytes(raw))])
    with pytest.raises(keymgr.IntegrityError):
        pubkey.decrypt_with(tampered, [tpm_rsa])


@pytest.mark.parametrize("kind", ["ec-p256", "ec-p384"])
def test_softhsm_ecdh_message_and_stream(softhsm: TokenUnderTest, kind: str) -> None:
    requires(softhsm, f"ecdh-{kind[3:]}")
    key = _token_key(softhsm, kind)
    pem = _pem(asym.public_key(open_token(softhsm.uri()), key.ref))
    recipient = pubkey.public_key_recipient(pem)
    assert isinstance(recipient, pubkey.EcdhRecipient)
    blob = pubkey.encrypt_to(b"ecdh", [recipient], context={"k": "v"})
    kari = parse_message(blob).recipient_infos[0].chosen
    assert kari["version"].native == "v3"
    assert kari["key_encryption_algorithm"]["algorithm"].dotted == pubkey.OID_ECDH_SHA256KDF
    assert pubkey.decrypt_with(blob, [key], context={"k": "v"}) == b"ecdh"
    sealed, out = io.BytesIO(), io.BytesIO()
    pubkey.encrypt_stream_to(io.BytesIO(b"s" * 5000), sealed, [recipient])
    pubkey.decrypt_stream_with(io.BytesIO(sealed.getvalue()), out, [key])
    assert out.getvalue() == b"s" * 5000


def test_bad_originator_point_is_refused(softhsm: TokenUnderTest) -> None:
    key = _token_key(softhsm, "ec-p256")
    blob = pubkey.encrypt_to(b"x", [key.recipient()])
    ri = parse_message(blob).recipient_infos[0]
    raw = bytearray(ri.dump())
    point = bytes(ri.chosen["originator"].chosen["public_key"].contents[1:])
    at = bytes(raw).index(point)
    raw[at + 64] ^= 1  # last byte of y: the point leaves the curve
    with pytest.raises(keymgr.FormatError):
        pubkey.decrypt_with(replace_recipients(blob, [cms.RecipientInfo.load(bytes(raw))]), [key])


def test_keymanager_decrypts_with_added_private_keys(softhsm: TokenUnderTest, key_name: str) -> None:
    """A server encrypts with its KEK and to two custodians' public keys; the custodian's
    manager, which has no such KEK, decrypts with its key pair."""
    from tests.conftest import softhsm_token

    custodian = softhsm_token("custodian-1")
    rsa_key, ec_key = _token_key(custodian, "rsa-2048"), _token_key(custodian, "ec-p256")
    with keymgr.KeyManager(softhsm.uri()) as server:
        server.create_key(key_name)
        blob = server.encrypt(b"shared", key=key_name, also_to=[rsa_key.recipient(), ec_key.recipient()],
                              context={"t": "1"})
    with keymgr.KeyManager(softhsm_token("keymgr-B").uri()) as elsewhere:
        with pytest.raises(keymgr.KeyNotFoundError):
            elsewhere.decrypt(blob, context={"t": "1"})
        elsewhere.add_private_key(ec_key.ref.label, token=custodian.uri())
        assert elsewhere.decrypt(blob, context={"t": "1"}) == b"shared"


def test_sha256_to_a_sha1_only_token_says_so(softhsm: TokenUnderTest) -> None:
    if probe(open_token(softhsm.uri())).has("rsa-oaep-sha256"):
        pytest.skip("this SoftHSM decrypts OAEP-SHA256 (newer than 2.6.1)")
    key = _token_key(softhsm, "rsa-2048")
    assert "OAEP-SHA1" in key.recipient().description
    blob = pubkey.encrypt_to(b"x", [pubkey.public_key_recipient(_pem(asym.public_key(open_token(softhsm.uri()),
                                                                                         key.ref)))])
    with pytest.raises(keymgr.MechanismUnsupportedError):
        pubkey.decrypt_with(blob, [key])


def test_recipient_input_checks() -> None:
    small = rsa.generate_private_key(65537, 1024).public_key()
    with pytest.raises(keymgr.PolicyError):
        pubkey.public_key_recipient(small)
    with pytest.raises(keymgr.ConfigurationError):
        pubkey.public_key_recipient(_pem(ec.generate_private_key(ec.SECP521R1()).public_key()))
    with pytest.raises(keymgr.ConfigurationError):
        pubkey.public_key_recipient(b"not a key")
    with pytest.raises(keymgr.ConfigurationError):
        pubkey.public_key_recipient(rsa.generate_private_key(65537, 2048).public_key(), oaep_hash="md5")


# -- OpenSSL interop ------------------------------------------------------------------------------


def _openssl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([OPENSSL or "openssl", "cms", *args], capture_output=True, check=False)


@needs_openssl
@pytest.mark.parametrize("kind,oaep_hash", [("rsa", "sha1"), ("rsa", "sha256"), ("p256", ""), ("p384", "")])
def test_openssl_decrypts_public_key_recipients(tmp_path: Path, kind: str, oaep_hash: str) -> None:
    """Software keys here: OpenSSL needs the private key as a file."""
    private = (rsa.generate_private_key(65537, 2048) if kind == "rsa"
               else ec.generate_private_key(ec.SECP256R1() if kind == "p256" else ec.SECP384R1()))
    (tmp_path / "key.pem").write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    recipient = pubkey.public_key_recipient(_pem(private.public_key()), oaep_hash=oaep_hash or "sha256")
    plaintext = os.urandom(1000)
    (tmp_path / "m.der").write_bytes(pubkey.encrypt_to(plaintext, [recipient], compat_openssl=True))
    out = _openssl("-decrypt", "-inform", "DER", "-in", str(tmp_path / "m.der"), "-inkey", str(tmp_path / "key.pem"),
                   "-binary")
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == plaintext


def _certificate(public: pubkey.PublicKey) -> bytes:
    """A certificate for a token's public key (signed by a throwaway CA: OpenSSL only reads it)."""
    ca = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keymgr test custodian")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public)
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(ca, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


@needs_openssl
@pytest.mark.parametrize("kind", ["rsa-2048", "ec-p256"])
def test_token_decrypts_what_openssl_encrypts(softhsm: TokenUnderTest, tmp_path: Path, kind: str) -> None:
    key = _token_key(softhsm, kind)
    cert = _certificate(asym.public_key(open_token(softhsm.uri()), key.ref))
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "in.txt").write_bytes(b"from openssl")
    # keyid: name the recipient by subject key identifier; SoftHSM 2.6.1 decrypts OAEP with SHA-1 only
    keyopts = (["-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha1"] if kind.startswith("rsa")
               else ["-keyopt", "ecdh_kdf_md:sha256"])
    out = _openssl("-encrypt", "-aes-256-gcm", "-keyid", "-binary", "-outform", "DER", "-in",
                   str(tmp_path / "in.txt"), "-out", str(tmp_path / "m.der"), "-recip", str(tmp_path / "cert.pem"),
                   *keyopts)
    assert out.returncode == 0, out.stderr.decode()
    assert pubkey.decrypt_with((tmp_path / "m.der").read_bytes(), [key]) == b"from openssl"
    # a certificate is also a way to name the recipient on our side: by its issuer and serial
    # number, which the key pair matches once it knows the certificate (given here; on a
    # token, the certificate object under the pair's CKA_ID)
    oaep_hash = probe(open_token(softhsm.uri())).oaep_hash() or "sha256"
    again = pubkey.encrypt_to(b"via cert", [pubkey.public_key_recipient(cert, oaep_hash=oaep_hash)])
    entry = parse_message(again).recipient_infos[0].chosen
    rid = entry["rid"] if kind.startswith("rsa") else entry["recipient_encrypted_keys"][0]["rid"]
    assert rid.name == "issuer_and_serial_number"
    with pytest.raises(keymgr.RecipientNotFoundError):
        pubkey.decrypt_with(again, [key])
    with_cert = pubkey.TokenPrivateKey(open_token(softhsm.uri()), key.ref, certificates=[cert])
    assert pubkey.decrypt_with(again, [with_cert]) == b"via cert"


_ENCRYPT_OFFLINE = """
import os, sys
from keymgr.recipients import pubkey
from keymgr.hsm.modules import loaded_modules
pem = open(sys.argv[1], "rb").read()
blob = pubkey.encrypt_to(b"sealed on a machine without the token", [pubkey.public_key_recipient(pem)],
                         context={"host": "server"})
assert loaded_modules() == [], "encrypting to a public key loaded a PKCS#11 module"
open(sys.argv[2], "wb").write(blob)
"""


def test_tpm_key_recipient_from_a_process_with_no_token(tpm: TokenUnderTest, tpm_rsa: pubkey.TokenPrivateKey,
                                                        tmp_path: Path) -> None:
    """A server that has never seen the TPM: only the PEM, no module, no TPM environment, no PIN."""
    (tmp_path / "key.pem").write_bytes(_pem(asym.public_key(open_token(tpm.uri()), tpm_rsa.ref)))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TPM2", "TSS2", "DBUS", "SOFTHSM2", "KEYMGR_"))}
    env["KEYMGR_MODULE"] = str(tmp_path / "no-such-module.so")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-c", _ENCRYPT_OFFLINE, str(tmp_path / "key.pem"), str(tmp_path / "m")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    blob = (tmp_path / "m").read_bytes()
    params = parse_message(blob).recipient_infos[0].chosen["key_encryption_algorithm"]["parameters"]
    assert params["hash_algorithm"]["algorithm"].native == "sha256"  # the default, recorded in the message
    assert pubkey.decrypt_with(blob, [tpm_rsa], context={"host": "server"}) == b"sealed on a machine without the token"


# -- what others write by default (issue 15) -------------------------------------------------------


def _kari_to(public: ec.EllipticCurvePublicKey, dek: bytes, kdf_oid: str, kdf_hash: str) -> cms.RecipientInfo:
    """A KeyAgreeRecipientInfo as another implementation writes it, with the KDF scheme ``kdf_oid``."""
    from asn1crypto import keys as asn1_keys
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap

    from keymgr.recipients import _pk_algorithms

    ephemeral = ec.generate_private_key(public.curve)
    kek = _pk_algorithms.derive_kek(ephemeral.exchange(ec.ECDH(), public), kdf_hash, None)
    point = ephemeral.public_key().public_bytes(serialization.Encoding.X962,
                                                serialization.PublicFormat.UncompressedPoint)
    return cms.RecipientInfo(name="kari", value=cms.KeyAgreeRecipientInfo({
        "version": "v3",
        "originator": cms.OriginatorIdentifierOrKey(name="originator_key", value=asn1_keys.PublicKeyInfo(
            {"algorithm": {"algorithm": "ec"}, "public_key": point})),
        "key_encryption_algorithm": {"algorithm": kdf_oid, "parameters": _pk_algorithms.AES256_WRAP_ID},
        "recipient_encrypted_keys": [{"rid": cms.KeyAgreementRecipientIdentifier(
            name="r_key_id", value={"subject_key_identifier": pubkey.subject_key_identifier(public)}),
            "encrypted_key": aes_key_wrap(kek, dek)}],
    }))


@pytest.mark.parametrize(("kdf_oid", "kdf_hash"), [
    ("1.3.133.16.840.63.0.2", "sha1"),  # OpenSSL's default: dhSinglePass-stdDH-sha1kdf-scheme
    ("1.3.132.1.11.0", "sha224"), ("1.3.132.1.11.2", "sha384"), ("1.3.132.1.11.3", "sha512"),
    ("1.3.132.1.14.1", "sha256"),  # cofactorDH: the same Z on P-256 (cofactor 1)
])
def test_every_x963_kdf_hash_is_read(softhsm: TokenUnderTest, kdf_oid: str, kdf_hash: str) -> None:
    from keymgr.envelope import seal_message

    key = _token_key(softhsm, "ec-p256")
    public = asym.public_key(open_token(softhsm.uri()), key.ref)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    dek = os.urandom(32)
    blob = seal_message(b"kdf", dek=dek, recipient_infos=[_kari_to(public, dek, kdf_oid, kdf_hash)], context=None)
    assert pubkey.decrypt_with(blob, [key]) == b"kdf"


def _ktri_pkcs1(public: rsa.RSAPublicKey, dek: bytes) -> cms.RecipientInfo:
    from cryptography.hazmat.primitives.asymmetric import padding

    return cms.RecipientInfo(name="ktri", value=cms.KeyTransRecipientInfo({
        "version": "v2", "rid": cms.RecipientIdentifier(name="subject_key_identifier",
                                                         value=pubkey.subject_key_identifier(public)),
        "key_encryption_algorithm": {"algorithm": "rsaes_pkcs1v15"},
        "encrypted_key": public.encrypt(dek, padding.PKCS1v15()),
    }))


def test_refused_algorithms_are_named_not_tampered(softhsm: TokenUnderTest, key_name: str) -> None:
    """PKCS#1 v1.5 to our key: UnsupportedAlgorithmError naming it, through KeyManager.decrypt too
    (not the integrity error); a second recipient we can use still decrypts (the refusal is kept
    until no recipient yields a key). An OAEP hash the token lacks names both sides."""
    from keymgr.envelope import seal_message

    custodian = softhsm_token("custodian-1")
    key = _token_key(custodian, "rsa-2048")
    public = asym.public_key(open_token(custodian.uri()), key.ref)
    assert isinstance(public, rsa.RSAPublicKey)
    dek = os.urandom(32)
    blob = seal_message(b"v1.5", dek=dek, recipient_infos=[_ktri_pkcs1(public, dek)], context=None)
    with pytest.raises(keymgr.UnsupportedAlgorithmError, match="PKCS#1 v1.5"):
        pubkey.decrypt_with(blob, [key])
    with keymgr.KeyManager(custodian.uri()) as km:
        with pytest.raises(keymgr.UnsupportedAlgorithmError, match="rsaEncryption") as info:
            km.decrypt(blob)  # the manager finds the token's key pair by itself
        assert not isinstance(info.value, keymgr.IntegrityError)
    both = seal_message(b"v1.5 and OAEP", dek=dek, recipient_infos=[
        _ktri_pkcs1(public, dek), pubkey.RsaOaepRecipient(public, oaep_hash="sha1").wrap(DataKey(dek))], context=None)
    assert pubkey.decrypt_with(both, [key]) == b"v1.5 and OAEP"
    if not probe(open_token(custodian.uri())).has("rsa-oaep-sha384"):
        sha384 = pubkey.encrypt_to(b"x", [pubkey.RsaOaepRecipient(public, oaep_hash="sha384")])
        with pytest.raises(keymgr.MechanismUnsupportedError, match="RSA-OAEP using SHA-384.*decrypts RSA-OAEP with"):
            pubkey.decrypt_with(sha384, [key])


def test_keymanager_finds_the_token_key_pair_a_recipient_names(softhsm: TokenUnderTest) -> None:
    """No add_private_key: the token's key pairs are listed on the first KeyTrans / KeyAgree
    recipient, and again (at most once a second) when a recipient names none of them, so a pair
    made later is found; by SKI, and by issuer and serial through the certificate on the token."""
    from keymgr.recipients.token_keys import TokenKeyPairs, self_signed_certificate

    custodian = softhsm_token("custodian-1")
    ts = open_token(custodian.uri())
    now = [100.0]
    pairs = TokenKeyPairs(ts, clock=lambda: now[0])
    first = _token_key(custodian, "ec-p256")
    to_first = pubkey.encrypt_to(b"first", [first.recipient()])
    assert pubkey.decrypt_with(to_first, [pairs]) == b"first"
    later = _token_key(custodian, "ec-p384")
    cert = self_signed_certificate(ts, later.ref)
    to_later = pubkey.encrypt_to(b"later", [pubkey.public_key_recipient(cert)])
    with pytest.raises(keymgr.RecipientNotFoundError):
        pubkey.decrypt_with(to_later, [pairs])  # listed less than a second ago
    now[0] += 2
    assert pubkey.decrypt_with(to_later, [pairs]) == b"later"
    with keymgr.KeyManager(custodian.uri()) as km:
        assert km.decrypt(to_later) == b"later"
