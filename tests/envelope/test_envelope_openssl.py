"""OpenSSL interop for CMS messages, both ways (issue 3, item 7), with a software KEK.

OpenSSL 3.0 reads AuthEnvelopedData with an id-aes256-wrap KEKRecipientInfo
but cannot parse authAttrs (STACK-FACTS 15), so what it must read is written
with ``compat_openssl=True``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from keymgr.envelope import open_message, parse_message, seal_message
from keymgr.errors import IntegrityError
from tests._softkek import SoftKek

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


def openssl(*args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([OPENSSL or "openssl", "cms", *args], input=data, capture_output=True, check=False)


@pytest.mark.parametrize("size", [0, 1, 1000, 70_000])
def test_openssl_decrypts_compat_messages(tmp_path: Path, size: int) -> None:
    kek, dek, plaintext = SoftKek(b"kek-v1"), os.urandom(32), os.urandom(size)
    blob = seal_message(plaintext, dek=dek, recipient_infos=[kek.recipient(dek)], context=None, compat_openssl=True)
    path = tmp_path / "m.der"
    path.write_bytes(blob)
    out = openssl("-decrypt", "-inform", "DER", "-in", str(path), "-secretkey", kek.kek.hex(),
                  "-secretkeyid", kek.kek_id.hex(), "-binary")
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == plaintext
    printed = openssl("-cmsout", "-print", "-inform", "DER", "-in", str(path))
    assert printed.returncode == 0, printed.stderr.decode()
    text = printed.stdout.decode()
    assert "authEnvelopedData" in text and "id-aes256-wrap" in text and "aes-256-gcm" in text


def test_openssl_prints_compat_messages_with_several_recipients(tmp_path: Path) -> None:
    dek = os.urandom(32)
    keks = [SoftKek(b"a"), SoftKek(b"b")]
    blob = seal_message(b"x", dek=dek, recipient_infos=[k.recipient(dek) for k in keks], context=None,
                        compat_openssl=True)
    (tmp_path / "m.der").write_bytes(blob)
    printed = openssl("-cmsout", "-print", "-inform", "DER", "-in", str(tmp_path / "m.der"))
    assert printed.returncode == 0, printed.stderr.decode()
    assert printed.stdout.decode().count("d.kekri:") == 2
    for k in keks:
        out = openssl("-decrypt", "-inform", "DER", "-in", str(tmp_path / "m.der"), "-secretkey", k.kek.hex(),
                      "-secretkeyid", k.kek_id.hex(), "-binary")
        assert out.returncode == 0 and out.stdout == b"x", out.stderr.decode()


def test_openssl_wrong_kek_fails(tmp_path: Path) -> None:
    kek, dek = SoftKek(b"kek-v1"), os.urandom(32)
    blob = seal_message(b"secret", dek=dek, recipient_infos=[kek.recipient(dek)], context=None, compat_openssl=True)
    (tmp_path / "m.der").write_bytes(blob)
    out = openssl("-decrypt", "-inform", "DER", "-in", str(tmp_path / "m.der"), "-secretkey", os.urandom(32).hex(),
                  "-secretkeyid", kek.kek_id.hex(), "-binary")
    assert out.returncode != 0 and b"secret" not in out.stdout


@pytest.mark.parametrize("size", [0, 1, 1000, 70_000])
def test_we_decrypt_what_openssl_writes(tmp_path: Path, size: int) -> None:
    kek, plaintext = SoftKek(b"kek-v1"), os.urandom(size)
    (tmp_path / "p.bin").write_bytes(plaintext)
    out = openssl("-encrypt", "-aes-256-gcm", "-secretkey", kek.kek.hex(), "-secretkeyid", kek.kek_id.hex(),
                  "-binary", "-outform", "DER", "-in", str(tmp_path / "p.bin"))
    assert out.returncode == 0, out.stderr.decode()
    parsed = parse_message(out.stdout)
    assert parsed.auth_attrs is None and len(parsed.nonce) == 12
    assert open_message(out.stdout, unwrap=kek.unwrap, context=None) == plaintext
    with pytest.raises(IntegrityError):
        open_message(out.stdout, unwrap=kek.unwrap, context={"tenant": "acme"})
    tampered = bytearray(out.stdout)
    tampered[-1] ^= 1
    with pytest.raises(IntegrityError):
        open_message(bytes(tampered), unwrap=kek.unwrap, context=None)
