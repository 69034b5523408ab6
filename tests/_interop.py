"""Helpers of the interop tests (tests/test_interop_*.py): the ``keymgr`` command in a process
of its own, its one error line, and certificates for software keys."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.conftest import TokenUnderTest

REPO = Path(__file__).resolve().parents[1]


def unavailable(tool: str, reason: str) -> None:
    """Skip (saying why), or fail where the interop tools must be present (``KEYMGR_REQUIRE_INTEROP=1``,
    which scripts/test.sh and so CI set): a tool is skipped only where it cannot be installed."""
    message = (f"{tool} cannot run here ({reason}); scripts/setup.sh --dev installs openssl, default-jdk-headless, "
               "libbcprov-java, libbcpkix-java and libbcutil-java")
    if os.environ.get("KEYMGR_REQUIRE_INTEROP") == "1":
        pytest.fail(f"KEYMGR_REQUIRE_INTEROP=1 but {message}")
    pytest.skip(message)


def keymgr_cli(*args: str, token: TokenUnderTest | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m keymgr ...`` in a process of its own, as a user runs it (no Python API)."""
    prefix = ["--token", token.uri()] if token is not None else []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("KEYMGR_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "keymgr", *prefix, *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)


def one_line(stderr: str) -> str:
    """The one error line (a token's first use may add its audit-log notice: docs/audit.md)."""
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("keymgr: audit log of token")]
    assert len(lines) == 1 and lines[0].startswith("keymgr: error:") and "Traceback" not in stderr, stderr
    return lines[0]


def self_signed(private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, name: str = "colleague") -> bytes:
    """A PEM certificate for a software key, as a colleague's CA might issue (no SKI extension:
    recipients are named by issuer and serial number)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(private.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=2)).sign(private, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)
