"""OpenSSL interop through the token (issue 3, item 7): keymgr messages made by SoftHSM's
C_WrapKey are read by ``openssl cms``, and messages ``openssl cms -encrypt`` writes are
unwrapped by SoftHSM's C_UnwrapKey.

For OpenSSL to use the KEK, the test must know its value: the key is generated in the
token, backup-capable, and its value wrapped out under a trusted transport key the test
chose (:func:`tests._known_keys.generated_known_key`: the backup path, so the key is one
keymgr may encrypt under). Messages OpenSSL 3.0 reads are written
with ``compat_openssl=True`` (it cannot parse authAttrs: STACK-FACTS 15).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import keymgr
from keymgr.envelope import parse_message, read_kek_recipient
from keymgr.errors import IntegrityError
from keymgr.hsm import objects
from tests._internals import token_of
from tests._known_keys import generated_known_key
from tests.conftest import softhsm_token

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


def openssl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([OPENSSL or "openssl", "cms", *args], capture_output=True, check=False, timeout=60)


def kcv(key: bytes) -> str:
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305 - the KCV definition
    return (encryptor.update(bytes(16)) + encryptor.finalize())[:3].hex()


def known_kek(km: keymgr.KeyManager, name: str) -> tuple[bytes, bytes]:
    """(value, CKA_ID) of a kw-profile KEK generated in the token, whose value the test learnt."""
    value, record = generated_known_key(km, name, profile="kw")
    version = record.primary_version
    assert version.kcv == kcv(value)  # the token holds exactly this key
    attributes = objects.key_attributes(token_of(km), version.key_id).attributes
    assert attributes["UNWRAP"] and attributes["WRAP"] and not attributes["DECRYPT"] and attributes["SENSITIVE"]
    return value, version.key_id


@pytest.mark.slow
@pytest.mark.parametrize("size", [0, 1, 1000, 70_000])
def test_openssl_decrypts_token_wrapped_messages(km_a: keymgr.KeyManager, key_name: str, tmp_path: Path,
                                                 size: int) -> None:
    kek, kek_id = known_kek(km_a, key_name)
    plaintext = os.urandom(size)
    blob = km_a.encrypt(plaintext, key=key_name, compat_openssl=True)
    assert read_kek_recipient(parse_message(blob).recipient_infos.der[0]).algorithm == "aes256_wrap"
    (tmp_path / "m.der").write_bytes(blob)
    out = openssl("-decrypt", "-inform", "DER", "-in", str(tmp_path / "m.der"), "-secretkey", kek.hex(),
                  "-secretkeyid", kek_id.hex(), "-binary")
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == plaintext
    printed = openssl("-cmsout", "-print", "-inform", "DER", "-in", str(tmp_path / "m.der"))
    assert printed.returncode == 0, printed.stderr.decode()
    text = printed.stdout.decode()
    assert "authEnvelopedData" in text and "id-aes256-wrap" in text and "aes-256-gcm" in text
    assert "d.kekri:" in text
    wrong = openssl("-decrypt", "-inform", "DER", "-in", str(tmp_path / "m.der"), "-secretkey",
                    os.urandom(32).hex(), "-secretkeyid", kek_id.hex(), "-binary")
    assert wrong.returncode != 0 and (not plaintext or plaintext not in wrong.stdout)


def test_openssl_decrypts_with_either_token_key(km_a: keymgr.KeyManager, key_name: str, tmp_path: Path) -> None:
    with keymgr.KeyManager(softhsm_token("keymgr-B").uri()) as km_b:
        kek_a, id_a = known_kek(km_a, key_name)
        kek_b, id_b = known_kek(km_b, key_name + "-dr")
        blob = km_a.encrypt(b"two sites", key=key_name, also_to=[km_b.recipient(key_name + "-dr")],
                            compat_openssl=True)
        assert km_b.decrypt(blob) == b"two sites"
    (tmp_path / "m.der").write_bytes(blob)
    printed = openssl("-cmsout", "-print", "-inform", "DER", "-in", str(tmp_path / "m.der"))
    assert printed.returncode == 0 and printed.stdout.decode().count("d.kekri:") == 2
    for kek, kek_id in ((kek_a, id_a), (kek_b, id_b)):
        out = openssl("-decrypt", "-inform", "DER", "-in", str(tmp_path / "m.der"), "-secretkey", kek.hex(),
                      "-secretkeyid", kek_id.hex(), "-binary")
        assert out.returncode == 0 and out.stdout == b"two sites", out.stderr.decode()


@pytest.mark.slow
@pytest.mark.parametrize("size", [0, 1, 1000, 70_000])
def test_token_decrypts_what_openssl_writes(km_a: keymgr.KeyManager, key_name: str, tmp_path: Path,
                                            size: int) -> None:
    kek, kek_id = known_kek(km_a, key_name)
    plaintext = os.urandom(size)
    (tmp_path / "p.bin").write_bytes(plaintext)
    out = openssl("-encrypt", "-aes-256-gcm", "-secretkey", kek.hex(), "-secretkeyid", kek_id.hex(),
                  "-binary", "-outform", "DER", "-in", str(tmp_path / "p.bin"))
    assert out.returncode == 0, out.stderr.decode()
    blob = out.stdout
    assert parse_message(blob).auth_attrs is None  # OpenSSL writes no attributes
    assert km_a.decrypt(blob) == plaintext  # the token's C_UnwrapKey recovers OpenSSL's data key
    assert km_a.decrypt_with_context(blob) == (plaintext, {})
    with pytest.raises(IntegrityError):
        km_a.decrypt(blob, context={"tenant": "acme"})
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(IntegrityError):
        km_a.decrypt(bytes(tampered))
    wrapped_at = blob.index(read_kek_recipient(parse_message(blob).recipient_infos.der[0]).encrypted_key)
    tampered = bytearray(blob)
    tampered[wrapped_at] ^= 1  # the wrapped data key: the token's unwrap must reject it
    with pytest.raises(IntegrityError):
        km_a.decrypt(bytes(tampered))
