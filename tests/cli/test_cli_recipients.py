"""Public-key recipients on the command line (issue 15): ``keymgr encrypt --recipient FILE``,
``keymgr decrypt`` finding the token's key pair a recipient names, ``--with-key``, and the
recipient files ``keymgr token keygen / pubkey`` write (certificate, descriptor, OAEP hash).

The colleague's token is SoftHSM ``custodian-2``; the sender has no token at all.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

import keymgr
from keymgr.cli import cli
from keymgr.envelope import _der, parse_message
from tests._interop import keymgr_cli, one_line, self_signed
from tests.conftest import TokenUnderTest, softhsm_token

#: the colleagues' key pairs stay on the shared tokens, each label with a random part
pytestmark = pytest.mark.leaves_objects("colleague-")

PLAINTEXT = os.urandom(5000)
CTX = ("--context", "tenant=acme", "--context", "purpose=handover")


def run(*args: str, token: TokenUnderTest | None = None) -> tuple[int, str, str]:
    prefix = ["--token", token.uri()] if token is not None else []
    result = CliRunner().invoke(cli, [*prefix, *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def colleague() -> TokenUnderTest:
    return softhsm_token("custodian-2")


def _keygen(tok: TokenUnderTest, kind: str, out: Path, *extra: str) -> str:
    label = f"colleague-{kind}-{uuid.uuid4().hex[:6]}"
    code, _, err = run("token", "keygen", "--type", kind, "--label", label, *extra, "--out", str(out), token=tok)
    assert code == 0, err
    return label


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rsa-2048", "ec-p256"])
@pytest.mark.parametrize("fmt", ["stream", "message"])
def test_encrypt_to_a_colleagues_certificate_then_decrypt_on_their_token(colleague: TokenUnderTest, tmp_path: Path,
                                                                         kind: str, fmt: str) -> None:
    """The must-show round trip, in real processes: the sender has only colleague.crt (no token,
    no PIN); the colleague's ``keymgr decrypt`` finds the key pair the message names by the
    certificate's issuer and serial number, with the context checked."""
    crt = tmp_path / "colleague.crt"
    _keygen(colleague, kind, crt, "--cert")
    if kind.startswith("rsa"):  # the file says what SoftHSM decrypts, and encrypt takes it from there
        assert b"keymgr-oaep-hash: sha1" in crt.read_bytes()
    (tmp_path / "in").write_bytes(PLAINTEXT)
    sent = keymgr_cli("encrypt", "--recipient", str(crt), "--format", fmt, *CTX, str(tmp_path / "in"), "-o",
                      str(tmp_path / "ct"))
    assert sent.returncode == 0, sent.stderr
    back = keymgr_cli("decrypt", *CTX, str(tmp_path / "ct"), "-o", str(tmp_path / "out"), token=colleague)
    assert back.returncode == 0, back.stderr
    assert (tmp_path / "out").read_bytes() == PLAINTEXT
    wrong = keymgr_cli("decrypt", "--context", "tenant=other", str(tmp_path / "ct"), "-o", str(tmp_path / "x"),
                       token=colleague)
    assert wrong.returncode == 4 and "failed authentication" in one_line(wrong.stderr)


def test_descriptor_and_plain_pem_and_oaep_hash(colleague: TokenUnderTest, tmp_path: Path) -> None:
    """`token pubkey --json` is the recipient descriptor; a plain PEM says nothing about the hash,
    so SHA-256 is used and the decrypt on a SHA-1-only token says so; --oaep-hash overrides."""
    label = _keygen(colleague, "rsa-2048", tmp_path / "annotated.pem")
    key_uri = f"pkcs11:token={colleague.label};object={label};type=private?module-path={colleague.module_path}" \
              f"&pin-value={colleague.user_pin}"
    code, out, err = run("--json", "token", "pubkey", key_uri)
    assert code == 0, err
    descriptor = json.loads(out)
    assert descriptor["keymgr_recipient"] == 1 and descriptor["oaep_hash"] == "sha1"
    assert descriptor["oaep_hashes"] == ["sha1"] and "certificate_pem" not in descriptor
    (tmp_path / "colleague.json").write_text(out)
    (tmp_path / "plain.pem").write_text(descriptor["public_key_pem"])
    (tmp_path / "in").write_bytes(PLAINTEXT)
    for recipient, extra, ok in (("colleague.json", (), True), ("plain.pem", (), False),
                                 ("plain.pem", ("--oaep-hash", "sha1"), True)):
        code, _, err = run("encrypt", "--recipient", str(tmp_path / recipient), *extra, str(tmp_path / "in"), "-o",
                           str(tmp_path / "ct"))
        assert code == 0, err
        code, _, err = run("decrypt", str(tmp_path / "ct"), "-o", str(tmp_path / "out"), token=colleague)
        if ok:
            assert code == 0 and (tmp_path / "out").read_bytes() == PLAINTEXT, err
        else:
            line = one_line(err)
            assert code == 1 and "RSA-OAEP using SHA-256" in line and "SHA-1 only" in line, line


def test_with_key_names_a_pair_on_another_token(colleague: TokenUnderTest, tmp_path: Path, key_name: str) -> None:
    """--key and --recipient together: the keyring token decrypts with its KEK; a third token with
    neither decrypts only when --with-key names the colleague's pair."""
    keyring = softhsm_token("keymgr-A")
    label = _keygen(colleague, "ec-p256", tmp_path / "colleague.pem")
    with keymgr.KeyManager(keyring.uri()) as km:
        km.create_key(key_name)
    (tmp_path / "in").write_bytes(PLAINTEXT)
    code, _, err = run("encrypt", "--key", key_name, "--recipient", str(tmp_path / "colleague.pem"), *CTX,
                       str(tmp_path / "in"), "-o", str(tmp_path / "ct"), token=keyring)
    assert code == 0, err
    code, _, err = run("decrypt", *CTX, str(tmp_path / "ct"), "-o", str(tmp_path / "out"), token=keyring)
    assert code == 0 and (tmp_path / "out").read_bytes() == PLAINTEXT, err
    elsewhere = softhsm_token("keymgr-B")
    code, _, err = run("decrypt", *CTX, str(tmp_path / "ct"), "-o", str(tmp_path / "out2"), token=elsewhere)
    assert code == 4 and "none of the 2 recipients" in one_line(err)
    pair = f"pkcs11:token={colleague.label};object={label}?module-path={colleague.module_path}" \
           f"&pin-value={colleague.user_pin}"
    code, _, err = run("decrypt", "--with-key", pair, *CTX, str(tmp_path / "ct"), "-o", str(tmp_path / "out2"),
                       token=elsewhere)
    assert code == 0 and (tmp_path / "out2").read_bytes() == PLAINTEXT, err


def test_keygen_cert_pubkey_prints_it_and_import_cert(colleague: TokenUnderTest, tmp_path: Path) -> None:
    """--cert: a certificate the token signed, kept beside the pair; `pubkey` prints it. A CA's
    certificate for an existing pair is stored with `import-cert` and found by issuer and serial."""
    label = _keygen(colleague, "ec-p384", tmp_path / "own.pem", "--cert")
    key_uri = f"pkcs11:token={colleague.label};object={label}?module-path={colleague.module_path}" \
              f"&pin-value={colleague.user_pin}"
    code, out, err = run("token", "pubkey", key_uri)
    assert code == 0, err
    cert = x509.load_pem_x509_certificate(out[out.index("-----BEGIN CERTIFICATE-----"):].encode())
    common_name = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    assert cert.subject == cert.issuer and common_name == label
    assert cert.public_key() == x509.load_pem_x509_certificate((tmp_path / "own.pem").read_bytes()).public_key()
    # a certificate from elsewhere (here: signed by a throwaway CA key) for a new pair
    label2 = _keygen(colleague, "ec-p256", tmp_path / "pub.pem")
    from cryptography.hazmat.primitives import serialization

    public = serialization.load_pem_public_key((tmp_path / "pub.pem").read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    issued = _issued_by_ca(public)
    (tmp_path / "issued.pem").write_bytes(issued)
    (tmp_path / "in").write_bytes(PLAINTEXT)
    assert run("encrypt", "--recipient", str(tmp_path / "issued.pem"), str(tmp_path / "in"), "-o",
               str(tmp_path / "ct"))[0] == 0
    code, _, err = run("decrypt", str(tmp_path / "ct"), "-o", str(tmp_path / "out"), token=colleague)
    assert code == 4 and "none of the 1 recipients" in err  # the token does not know that certificate yet
    uri2 = key_uri.replace(f"object={label}", f"object={label2}")
    code, _, err = run("token", "import-cert", uri2, str(tmp_path / "issued.pem"))
    assert code == 0, err
    code, _, err = run("decrypt", str(tmp_path / "ct"), "-o", str(tmp_path / "out"), token=colleague)
    assert code == 0 and (tmp_path / "out").read_bytes() == PLAINTEXT, err
    code, _, err = run("token", "import-cert", key_uri, str(tmp_path / "issued.pem"))  # another key's certificate
    assert code == 2 and "not for key pair" in one_line(err)


def _issued_by_ca(public: ec.EllipticCurvePublicKey) -> bytes:
    import datetime

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    ca = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "colleague")]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Example CA")]))
            .public_key(public).serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=2)).sign(ca, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_unknown_content_algorithm_is_named(colleague: TokenUnderTest, tmp_path: Path) -> None:
    """A message whose content algorithm keymgr does not know: one line naming its OID, exit 7, not
    'tampered' (4). (PKCS#1 v1.5 recipients: tests/test_interop_openssl.py and _bouncycastle.py.)"""
    private = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "c.pem").write_bytes(self_signed(private))
    (tmp_path / "in").write_bytes(b"x")
    assert run("encrypt", "--recipient", str(tmp_path / "c.pem"), "--format", "message", str(tmp_path / "in"),
               "-o", str(tmp_path / "ct"))[0] == 0
    blob = (tmp_path / "ct").read_bytes()
    gcm = _der.encode_oid("2.16.840.1.101.3.4.1.46")
    unknown = _der.encode_oid("2.16.840.1.101.3.4.1.99")
    at = blob.rindex(gcm)
    (tmp_path / "odd").write_bytes(blob[:at] + unknown + blob[at + len(gcm):])
    code, _, err = run("decrypt", str(tmp_path / "odd"), "-o", str(tmp_path / "out"), token=colleague)
    line = one_line(err)
    assert code == 7 and "2.16.840.1.101.3.4.1.99" in line and "tampered" not in line, line
    assert parse_message(blob).recipient_infos[0].chosen["recipient_encrypted_keys"][0]["rid"].name \
        == "issuer_and_serial_number"


def test_bad_recipient_arguments_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "in").write_bytes(b"x")
    (tmp_path / "junk.pem").write_bytes(b"not a key")
    (tmp_path / "bad.json").write_text('{"keymgr_recipient": 1, "public_key_pem": 5}')
    for args, shown in ((("encrypt", str(tmp_path / "in"), "-o", str(tmp_path / "ct")), "--recipient FILE"),
                        (("encrypt", "--recipient", str(tmp_path / "nope"), str(tmp_path / "in"), "-o",
                          str(tmp_path / "ct")), "cannot read recipient file"),
                        (("encrypt", "--recipient", str(tmp_path / "junk.pem"), str(tmp_path / "in"), "-o",
                          str(tmp_path / "ct")), "not a PEM or DER"),
                        (("encrypt", "--recipient", str(tmp_path / "bad.json"), str(tmp_path / "in"), "-o",
                          str(tmp_path / "ct")), "no public_key_pem")):
        code, _, err = run(*args)
        assert code == 2 and shown in one_line(err), (args, err)
        assert not (tmp_path / "ct").exists()
