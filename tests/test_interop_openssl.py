"""``openssl cms`` with its default options, both ways, through the ``keymgr`` command (issue 15).

The recipient's key pair lives on SoftHSM, made by ``keymgr token keygen --cert`` (the token
signs a self-signed certificate and keeps it beside the pair). OpenSSL encrypts to that
certificate as anyone would (``-recip cert.pem``, no ``-keyid``: the recipient is named by
issuer and serial number), and ``keymgr decrypt IN -o OUT`` (a real process, no Python API)
recovers the plaintext:

* RSA: ``-keyopt rsa_padding_mode:oaep`` with OpenSSL's default OAEP hash, SHA-1, the one
  SoftHSM 2.6.1 decrypts (STACK-FACTS 7);
* EC: OpenSSL's default key agreement, ``dhSinglePass-stdDH-sha1kdf-scheme``;
* ``-stream``: BER with indefinite lengths and a constructed ciphertext.

The other way, OpenSSL decrypts what ``keymgr encrypt --recipient cert.pem`` writes (OpenSSL
needs the private key as a file there, so those keys are software keys). What keymgr refuses
(PKCS#1 v1.5, a content cipher it does not read, a hash the token lacks) is one line naming
it, never "tampered".
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from asn1crypto import cms

from tests._interop import keymgr_cli, one_line, unavailable
from tests.conftest import TokenUnderTest, softhsm_token

OPENSSL = shutil.which("openssl")
PLAINTEXT = b"from openssl, with its defaults\n" * 40


def openssl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([OPENSSL or "openssl", *args], capture_output=True, timeout=60, check=False)


@pytest.fixture(scope="module", autouse=True)
def _openssl_installed() -> None:
    if OPENSSL is None:
        unavailable("OpenSSL", "the openssl command is not installed")


@pytest.fixture(scope="module")
def custodian() -> TokenUnderTest:
    return softhsm_token("custodian-3")


def _keygen(tok: TokenUnderTest, kind: str, directory: Path) -> Path:
    """A key pair on the token with a self-signed certificate, made with the CLI; the recipient file."""
    cert = directory / f"{kind}.cert.pem"
    done = keymgr_cli("token", "keygen", "--type", kind, "--label", f"interop-{kind}-{uuid.uuid4().hex[:6]}",
                      "--cert", "--out", str(cert), token=tok)
    assert done.returncode == 0, done.stderr
    return cert


@pytest.fixture(scope="module")
def certs(custodian: TokenUnderTest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("openssl-interop")
    return {"rsa": _keygen(custodian, "rsa-2048", directory), "ec": _keygen(custodian, "ec-p256", directory)}


def _encrypt_with_openssl(tmp_path: Path, cert: Path, *options: str) -> Path:
    (tmp_path / "in.txt").write_bytes(PLAINTEXT)
    out = tmp_path / "m.cms"
    done = openssl("cms", "-encrypt", "-aes-256-gcm", "-recip", str(cert), *options, "-binary", "-outform", "DER",
                   "-in", str(tmp_path / "in.txt"), "-out", str(out))
    assert done.returncode == 0, done.stderr.decode()
    return out


def _decrypt_with_keymgr(tok: TokenUnderTest, message: Path) -> bytes:
    out = message.with_suffix(".out")
    done = keymgr_cli("decrypt", str(message), "-o", str(out), token=tok)
    assert done.returncode == 0, done.stderr
    return out.read_bytes()


@pytest.mark.slow
def test_openssl_rsa_oaep_to_a_certificate_on_the_token(custodian: TokenUnderTest, certs: dict[str, Path],
                                                        tmp_path: Path) -> None:
    message = _encrypt_with_openssl(tmp_path, certs["rsa"], "-keyopt", "rsa_padding_mode:oaep")
    ktri = cms.ContentInfo.load(message.read_bytes())["content"]["recipient_infos"][0].chosen
    assert ktri["rid"].name == "issuer_and_serial_number" and ktri["version"].native == "v0"
    assert ktri["key_encryption_algorithm"]["parameters"].dump() == b"\x30\x00"  # OAEP, every field DEFAULT (SHA-1)
    assert _decrypt_with_keymgr(custodian, message) == PLAINTEXT


def test_openssl_default_ecdh_to_a_certificate_on_the_token(custodian: TokenUnderTest, certs: dict[str, Path],
                                                            tmp_path: Path) -> None:
    message = _encrypt_with_openssl(tmp_path, certs["ec"])
    kari = cms.ContentInfo.load(message.read_bytes())["content"]["recipient_infos"][0].chosen
    assert kari["key_encryption_algorithm"]["algorithm"].dotted == "1.3.133.16.840.63.0.2"  # stdDH-sha1kdf
    assert kari["recipient_encrypted_keys"][0]["rid"].name == "issuer_and_serial_number"
    assert _decrypt_with_keymgr(custodian, message) == PLAINTEXT


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_openssl_stream_ber_output(custodian: TokenUnderTest, certs: dict[str, Path], tmp_path: Path,
                                   kind: str) -> None:
    options = ["-keyopt", "rsa_padding_mode:oaep"] if kind == "rsa" else []
    message = _encrypt_with_openssl(tmp_path, certs[kind], "-stream", *options)
    assert message.read_bytes()[:2] == b"\x30\x80"  # BER: indefinite length
    assert _decrypt_with_keymgr(custodian, message) == PLAINTEXT


@pytest.mark.slow
def test_refusals_name_the_algorithm(custodian: TokenUnderTest, certs: dict[str, Path], tmp_path: Path) -> None:
    """What keymgr does not read is one line naming it (exit 7, a FormatError), not 'tampered' (4);
    a hash the token lacks is the token's limit, said as such."""
    cases = [
        (certs["rsa"], ["-aes-256-gcm"], "RSA PKCS#1 v1.5", 7),  # openssl's default RSA padding
        (certs["ec"], ["-aes-128-gcm"], "AES-128-GCM", 7),
        (certs["ec"], ["-aes-256-cbc"], "EnvelopedData", 7),
        (certs["rsa"], ["-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256"],
         "RSA-OAEP using SHA-256", 1),
    ]
    (tmp_path / "in.txt").write_bytes(PLAINTEXT)
    for cert, options, named, code in cases:
        cipher = [o for o in options if o.startswith("-aes")] or ["-aes-256-gcm"]
        rest = [o for o in options if not o.startswith("-aes")]
        done = openssl("cms", "-encrypt", *cipher, "-recip", str(cert), *rest, "-binary", "-outform", "DER",
                       "-in", str(tmp_path / "in.txt"), "-out", str(tmp_path / "m.cms"))
        assert done.returncode == 0, done.stderr.decode()
        failed = keymgr_cli("decrypt", str(tmp_path / "m.cms"), "-o", str(tmp_path / "out"), token=custodian)
        line = one_line(failed.stderr)
        assert failed.returncode == code and named in line, (named, line)
        assert "tampered" not in line and not (tmp_path / "out").exists()
    assert "SHA-1 only" in line and "--oaep-hash sha1" in line  # the last case: what the token can do, what to ask


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_openssl_decrypts_what_keymgr_encrypts_to_a_certificate(tmp_path: Path, kind: str) -> None:
    """keymgr names a certificate recipient by issuer and serial number, as OpenSSL does: OpenSSL
    finds it with -recip. Compat form: OpenSSL 3.0 cannot parse authAttrs (docs/format.md)."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    algorithm = ["-newkey", "rsa:2048"] if kind == "rsa" else ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    made = openssl("req", "-x509", *algorithm, "-nodes", "-keyout", str(key), "-out", str(cert), "-subj",
                   "/CN=colleague", "-days", "2")
    assert made.returncode == 0, made.stderr.decode()
    (tmp_path / "in").write_bytes(PLAINTEXT)
    done = keymgr_cli("encrypt", "--recipient", str(cert), "--compat-openssl", str(tmp_path / "in"), "-o",
                      str(tmp_path / "m.cms"))
    assert done.returncode == 0, done.stderr
    back = openssl("cms", "-decrypt", "-inform", "DER", "-in", str(tmp_path / "m.cms"), "-recip", str(cert),
                   "-inkey", str(key), "-binary")
    assert back.returncode == 0, back.stderr.decode()
    assert back.stdout == PLAINTEXT
