"""Error mapping at the token layer (keymgr.hsm.objects): real failures provoked on SoftHSM.

Each misuse or bad input reaches the token (or python-pkcs11) for real and must come
back as the keymgr error a caller can act on, naming the operation and the token,
never as a raw ``pkcs11`` exception or a bare ``AttributeError``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import keymgr
from keymgr import errors
from keymgr.hsm import objects
from tests._internals import token_of
from tests.conftest import TokenUnderTest


@pytest.fixture
def keys(softhsm: TokenUnderTest, key_name: str) -> Iterator[tuple[keymgr.KeyManager, bytes, bytes]]:
    """A KeyManager on SoftHSM with a wrap-only (kw) key and an encrypt-only (gcm) key."""
    with keymgr.KeyManager(softhsm.uri()) as km:
        kw = km.create_key(f"{key_name}-kw").primary_version.key_id
        gcm = km.create_key(f"{key_name}-gcm", profile="gcm").primary_version.key_id
        yield km, kw, gcm


def _raised(call: Callable[[], Any]) -> errors.KeymgrError:
    with pytest.raises(errors.KeymgrError) as caught:
        call()
    assert not type(caught.value).__module__.startswith("pkcs11")
    return caught.value


def test_wrapped_key_that_is_not_authentic(keys: tuple[keymgr.KeyManager, bytes, bytes]) -> None:
    km, kw, _ = keys
    garbage = os.urandom(40)
    error = _raised(lambda: objects.unwrap_data_key(token_of(km), kw, garbage))
    assert isinstance(error, errors.IntegrityError) and "unwrap data key on token 'keymgr-A'" in str(error)
    assert garbage.hex() not in str(error)
    short = _raised(lambda: objects.unwrap_data_key(token_of(km), kw, os.urandom(7)))
    assert isinstance(short, errors.IntegrityError) and "CKR_WRAPPED_KEY_LEN_RANGE" in str(short)


def test_tampered_gcm_ciphertext(keys: tuple[keymgr.KeyManager, bytes, bytes]) -> None:
    km, _, gcm = keys
    nonce = os.urandom(12)
    sealed = bytearray(objects.gcm_encrypt(token_of(km), gcm, b"data key", nonce=nonce, aad=b"a"))
    sealed[0] ^= 1
    error = _raised(lambda: objects.gcm_decrypt(token_of(km), gcm, bytes(sealed), nonce=nonce, aad=b"a"))
    assert isinstance(error, errors.IntegrityError)


@pytest.mark.parametrize("misuse, role", [
    ("wrap with the gcm key", "wrap"), ("unwrap with the gcm key", "unwrap"),
    ("gcm with the kw key", "encrypt"), ("hmac with the kw key", "sign"),
])
@pytest.mark.slow
def test_key_used_outside_its_role_is_a_policy_error(keys: tuple[keymgr.KeyManager, bytes, bytes], misuse: str,
                                                     role: str) -> None:
    km, kw, gcm = keys
    calls: dict[str, Callable[[], Any]] = {
        "wrap with the gcm key": lambda: objects.wrap_data_key(token_of(km), gcm, os.urandom(32)),
        "unwrap with the gcm key": lambda: objects.unwrap_data_key(token_of(km), gcm, os.urandom(40)),
        "gcm with the kw key": lambda: objects.gcm_encrypt(token_of(km), kw, b"x", nonce=os.urandom(12), aad=b""),
        "hmac with the kw key": lambda: objects.hmac_sha256(token_of(km), kw, b"x"),
    }
    error = _raised(calls[misuse])
    assert isinstance(error, errors.PolicyError), repr(error)
    assert f"has no {role} role" in str(error) and "keymgr-A" in str(error)
    # the session is still good afterwards
    assert objects.unwrap_data_key(token_of(km), kw, objects.wrap_data_key(token_of(km), kw, bytes(32))) == bytes(32)


def test_gcm_nonce_of_the_wrong_size(keys: tuple[keymgr.KeyManager, bytes, bytes]) -> None:
    km, _, gcm = keys
    for size in (0, 8, 16):
        error = _raised(lambda: objects.gcm_encrypt(token_of(km), gcm, b"x", nonce=os.urandom(size), aad=b""))
        assert isinstance(error, errors.ConfigurationError) and f"not {size}" in str(error)
        error = _raised(lambda: objects.gcm_decrypt(token_of(km), gcm, bytes(17), nonce=os.urandom(size), aad=b""))
        assert isinstance(error, errors.ConfigurationError)


def test_destroyed_key_is_not_found(keys: tuple[keymgr.KeyManager, bytes, bytes]) -> None:
    km, kw, _ = keys
    wrapped = objects.wrap_data_key(token_of(km), kw, os.urandom(32))  # the handle is cached now
    objects.destroy_key(token_of(km), kw)
    error = _raised(lambda: objects.unwrap_data_key(token_of(km), kw, wrapped))
    assert isinstance(error, errors.KeyNotFoundError) and kw.hex() in str(error)


_DESTROY_ALL = """
import sys
import pkcs11
from pkcs11 import Attribute, ObjectClass
module, label, pin, application = sys.argv[1:5]
token = pkcs11.lib(module).get_token(token_label=label)
with token.open(user_pin=pin, rw=True) as session:
    doomed = list(session.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.APPLICATION: application,
                                       Attribute.LABEL: "doomed"}))
    print("ready", flush=True)
    for obj in doomed:
        obj.destroy()
"""


@pytest.mark.slow
def test_a_scan_skips_objects_another_process_destroys_meanwhile(softhsm: TokenUnderTest, key_name: str) -> None:
    """Another host compacting destroys objects between our C_FindObjects and the reads that
    follow it: every scan still succeeds and still sees every object nobody destroyed (before,
    a scan started over and gave up after five tries: an eight-host CI run failed so)."""
    application = f"keymgr-vanish-{key_name}"
    stable = {f"stable-{i}" for i in range(10)}
    with keymgr.KeyManager(softhsm.uri()) as km:
        ts = token_of(km)
        try:
            for label in sorted(stable):
                objects.write_data_object(ts, application=application, label=label, value=b"kept")
            for _ in range(400):
                objects.write_data_object(ts, application=application, label="doomed", value=b"gone soon")
            child = subprocess.Popen(
                [sys.executable, "-c", _DESTROY_ALL, softhsm.module_path, softhsm.label, softhsm.user_pin,
                 application], stdout=subprocess.PIPE, text=True, env={**os.environ, **softhsm.env})
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
            memo, scans = objects.DataObjectScan(), 0
            while child.poll() is None:
                assert stable <= {label for label, _ in objects.read_data_objects(ts, application=application)}
                present, _ = objects.scan_data_objects(ts, application=application, memo=memo)
                assert stable <= present
                scans += 2
            assert child.wait() == 0 and scans >= 4, scans
            present, _ = objects.scan_data_objects(ts, application=application, memo=memo)
            assert present == stable
        finally:
            for label in stable | {"doomed"}:
                objects.destroy_data_object(ts, application=application, label=label)
