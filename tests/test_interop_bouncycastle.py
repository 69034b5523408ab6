"""Bouncy Castle, both ways, through the ``keymgr`` command (issue 15).

A small Java program (tests/interop/KeymgrInterop.java), compiled once per module with
``javac`` against Debian's libbcprov-java / libbcpkix-java (BC 1.72; scripts/setup.sh --dev
installs them with default-jdk-headless), stands in for a Java application:

* it encrypts with ``CMSAuthEnvelopedDataGenerator`` and AES-256-GCM, whose default output
  is BER (indefinite lengths), to a certificate made by ``keymgr token keygen --cert``
  (recipient named by issuer and serial number), and ``keymgr decrypt`` reads it; BC's
  default RSA key transport, PKCS#1 v1.5, is refused by name;
* it decrypts what ``keymgr encrypt --recipient cert.pem`` writes, context attributes included
  (the private key is a software key there: Java needs it as a file).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests._interop import keymgr_cli, one_line, self_signed, unavailable
from tests.conftest import TokenUnderTest, softhsm_token

JARS = [Path("/usr/share/java") / name for name in ("bcprov.jar", "bcpkix.jar", "bcutil.jar")]
SOURCE = Path(__file__).resolve().parent / "interop" / "KeymgrInterop.java"
PLAINTEXT = b"written by Bouncy Castle's CMSAuthEnvelopedDataGenerator\n" * 30


@pytest.fixture(scope="module")
def java(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The command that runs KeymgrInterop (compiled here, once per module)."""
    javac, runtime = shutil.which("javac"), shutil.which("java")
    if javac is None or runtime is None:
        unavailable("Bouncy Castle", "no JDK: javac or java is not installed")
    missing = [str(jar) for jar in JARS if not jar.is_file()]
    if missing:
        unavailable("Bouncy Castle", f"missing {', '.join(missing)}")
    classpath = os.pathsep.join(map(str, JARS))
    classes = tmp_path_factory.mktemp("bc-classes")
    built = subprocess.run([javac or "javac", "-cp", classpath, "-d", str(classes), str(SOURCE)], capture_output=True,
                           text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    return [runtime or "java", "-cp", os.pathsep.join([classpath, str(classes)]), "KeymgrInterop"]


def run_java(java: list[str], *args: str) -> None:
    done = subprocess.run([*java, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def custodian() -> TokenUnderTest:
    return softhsm_token("custodian-3")


@pytest.fixture(scope="module")
def certs(custodian: TokenUnderTest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An RSA and an EC key pair on SoftHSM, each with a certificate the token signed."""
    directory = tmp_path_factory.mktemp("bc-certs")
    found = {}
    for kind in ("rsa-2048", "ec-p256"):
        found[kind[:2]] = directory / f"{kind}.pem"
        done = keymgr_cli("token", "keygen", "--type", kind, "--label", f"bc-{kind}-{os.urandom(3).hex()}", "--cert",
                          "--out", str(found[kind[:2]]), token=custodian)
        assert done.returncode == 0, done.stderr
    return found


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ecdh-sha256kdf", "ecdh-sha1kdf", "oaep-sha1"])
def test_keymgr_decrypts_bouncy_castles_ber(java: list[str], custodian: TokenUnderTest, certs: dict[str, Path],
                                            tmp_path: Path, mode: str) -> None:
    """OAEP with SHA-1: what SoftHSM 2.6.1 decrypts (STACK-FACTS 7)."""
    (tmp_path / "in").write_bytes(PLAINTEXT)
    run_java(java, "encrypt", str(certs["ec" if mode.startswith("ecdh") else "rs"]), str(tmp_path / "in"),
             str(tmp_path / "m.cms"), mode)
    assert (tmp_path / "m.cms").read_bytes()[:2] == b"\x30\x80"  # BER, as BC writes by default
    done = keymgr_cli("decrypt", str(tmp_path / "m.cms"), "-o", str(tmp_path / "out"), token=custodian)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out").read_bytes() == PLAINTEXT


@pytest.mark.slow
def test_bouncy_castles_default_rsa_transport_is_refused_by_name(java: list[str], custodian: TokenUnderTest,
                                                                 certs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "in").write_bytes(PLAINTEXT)
    run_java(java, "encrypt", str(certs["rs"]), str(tmp_path / "in"), str(tmp_path / "m.cms"), "default")
    done = keymgr_cli("decrypt", str(tmp_path / "m.cms"), "-o", str(tmp_path / "out"), token=custodian)
    line = one_line(done.stderr)
    assert done.returncode == 7 and "RSA PKCS#1 v1.5" in line and "tampered" not in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_bouncy_castle_decrypts_keymgr_messages_to_a_certificate(java: list[str], tmp_path: Path, kind: str) -> None:
    """keymgr to a certificate (issuer and serial number). RSA with context attributes: BC checks
    the tag over them (RFC 5083's AAD). EC in the attribute-free form: BC 1.72 has no AEAD
    key-agreement recipient (JceKeyAgreeAuthEnvelopedRecipient came later; its
    JceKeyAgreeEnvelopedRecipient cannot take authAttrs: ClassCastException to
    InputAEADDecryptor), so it reads ECDH AuthEnvelopedData only without attributes."""
    private = rsa.generate_private_key(65537, 2048) if kind == "rsa" else ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "key.pem").write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    (tmp_path / "cert.pem").write_bytes(self_signed(private))
    (tmp_path / "in").write_bytes(PLAINTEXT)
    form = ["--context", "tenant=acme"] if kind == "rsa" else ["--compat-openssl"]
    done = keymgr_cli("encrypt", "--recipient", str(tmp_path / "cert.pem"), "--format", "message", *form,
                      str(tmp_path / "in"), "-o", str(tmp_path / "m.cms"))
    assert done.returncode == 0, done.stderr
    run_java(java, "decrypt", str(tmp_path / "key.pem"), str(tmp_path / "m.cms"), str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == PLAINTEXT
