"""Anomaly limits (keymgr.audit.limits): decryptions per principal per interval, refusal,
audit entry, and suspension of the key version until an operator resumes it. Real SoftHSM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import keymgr
from keymgr import errors
from keymgr.audit import RateLimit, RateLimiter, acting_as, verify_log
from keymgr.hsm import open_token
from tests._internals import clocked
from tests.conftest import TokenUnderTest


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_fixed_windows_per_key_and_principal() -> None:
    clock = Clock()
    limiter = RateLimiter({"orders": RateLimit(2, per=10.0), "*": RateLimit(5, per=10.0)}, clock=clock)
    assert [limiter.hit("orders", "a") for _ in range(3)] == [None, None, RateLimit(2, per=10.0)]
    assert limiter.hit("orders", "b") is None  # another principal has its own count
    assert all(limiter.hit("other", "a") is None for _ in range(5)) and limiter.hit("other", "a") is not None
    clock.now += 10.0
    assert limiter.hit("orders", "a") is None  # a new window
    assert RateLimiter({"orders": RateLimit(1)}).hit("unlimited", "a") is None
    for bad in ({"max_ops": 0}, {"max_ops": 1, "per": 0}):
        with pytest.raises(errors.ConfigurationError):
            RateLimit(**bad)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_limit_refuses_and_is_audited(tmp_path: Path, softhsm: TokenUnderTest, key_name: str) -> None:
    clock = Clock()
    path = tmp_path / "a.log"
    with clocked(keymgr.KeyManager(softhsm.uri(), audit=path, rate_limits={key_name: RateLimit(3, per=60.0)}),
                 clock=clock) as km:
        km.create_key(key_name)
        blob = km.encrypt(b"record", key=key_name)
        with acting_as("reporting"):
            for _ in range(3):
                km.decrypt(blob)
            with pytest.raises(errors.PolicyError, match="more than 3 decryptions by 'reporting'"):
                km.decrypt(blob)
        with acting_as("billing"):
            assert km.decrypt(blob) == b"record"  # limits are per principal
        clock.now += 60.0
        with acting_as("reporting"):
            assert km.decrypt(blob) == b"record"  # the next window
        assert km.describe_key(key_name).version(1).state == "active"  # not configured to suspend
    refused = [r for r in _rows(path) if r["outcome"] == "refused"]
    assert [(r["op"], r["key"], r["version"], r["error"], r["actor"]["principal"]) for r in refused] == [
        ("decrypt", key_name, 1, "PolicyError", "reporting")]
    why = refused[0]["detail"].pop("why")
    assert "more than 3 decryptions by 'reporting' within 60 s" in why
    assert refused[0]["detail"] == {"reason": "rate-limit", "limit": 3, "per_seconds": 60, "suspended": False}
    assert verify_log(path, token=open_token(softhsm.uri())).ok


def test_limit_can_suspend_until_an_operator_resumes(tmp_path: Path, softhsm: TokenUnderTest,
                                                     key_name: str) -> None:
    clock = Clock()
    path = tmp_path / "a.log"
    with clocked(keymgr.KeyManager(softhsm.uri(), audit=path,
                                   rate_limits={"*": RateLimit(2, per=60.0, suspend=True)}), clock=clock) as km:
        km.create_key(key_name)
        blob = km.encrypt(b"record", key=key_name)
        km.decrypt(blob)
        km.decrypt(blob)
        with pytest.raises(errors.PolicyError, match="suspended until an operator resumes it"):
            km.decrypt(blob)
        assert km.describe_key(key_name).version(1).state == "suspended"
        clock.now += 3600  # a new window does not lift the suspension: only an operator does
        with pytest.raises(errors.PolicyError, match="suspended"):
            km.decrypt(blob)
        # every manager (and process) sees it: the state is in the token's keyring
        with keymgr.KeyManager(softhsm.uri(), audit=False) as other, \
                pytest.raises(errors.PolicyError, match="suspended"):
            other.decrypt(blob)
        km.resume(key_name, 1)
        assert km.decrypt(blob) == b"record"
    rows = [r for r in _rows(path) if r["key"] == key_name and r["op"] != "encrypt"]
    refused = [r for r in rows if r["outcome"] == "refused"]
    assert refused[0]["detail"]["suspended"] is True and len(refused) == 2


def test_limits_and_suspension_hold_for_cached_data_keys(tmp_path: Path, softhsm: TokenUnderTest,
                                                         key_name: str) -> None:
    """With the decrypt cache on, a repeated message needs no unwrap: the limit still counts it."""
    clock = Clock()
    with clocked(keymgr.KeyManager(softhsm.uri(), audit=tmp_path / "a.log", cache=True,
                                   rate_limits={key_name: RateLimit(3, per=60.0, suspend=True)}), clock=clock) as km:
        km.create_key(key_name)
        blob = km.encrypt(b"record", key=key_name)
        for _ in range(3):
            km.decrypt(blob)
        with pytest.raises(errors.PolicyError, match="more than 3"):
            km.decrypt(blob)
        clock.now += 3600
        with pytest.raises(errors.PolicyError, match="is suspended"):
            km.decrypt(blob)  # the cached data key is refused too
        km.resume(key_name, 1)
        assert km.decrypt(blob) == b"record"
    decrypts = [r for r in _rows(tmp_path / "a.log") if r["op"] == "decrypt"]
    assert sum(r["detail"].get("count", 1) for r in decrypts if r["outcome"] == "ok") == 4
    assert all(r["key"] == key_name for r in decrypts)


def test_a_forked_child_counts_with_a_lock_of_its_own() -> None:
    """A rate limiter's lock held by another thread of the parent at fork stays held in the child
    unless replaced: the child's first decryption would hang for good."""
    import os
    import signal

    from keymgr.audit.limits import RateLimit, RateLimiter

    limiter = RateLimiter(RateLimit(max_ops=5, per=60))
    limiter.hit("k", "alice")
    limiter._lock.acquire()  # noqa: SLF001 - as another thread could hold it at the fork
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)  # a hang ends in SIGALRM instead
        os._exit(0 if limiter.hit("k", "alice") is None else 3)
    limiter._lock.release()  # noqa: SLF001
    assert os.waitpid(pid, 0)[1] == 0
