"""Sessions, logins, PINs, threads and fork against real tokens."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import keymgr
from keymgr.hsm import objects, open_token
from keymgr.hsm.pins import Pin, PinRequest, PinSource, pin_source_from_uri
from keymgr.hsm.sessions import tries_left_state
from tests._internals import keyring_of, token_of
from tests.conftest import SO_PIN, TokenUnderTest, softhsm_token


def test_open_token_logs_in_once_per_process(token: TokenUnderTest) -> None:
    first = open_token(token.uri())
    second = open_token(token.uri())
    assert first is second
    # the shared login is usable from the second handle
    assert len(objects.random_bytes(second, 16)) == 16


# In a fresh process: this one may be logged in to the token already (login is per process,
# and open_token does not log in again), so a wrong PIN here might never reach the token.
_WRONG_THEN_RIGHT = """
import json, sys
import keymgr
from keymgr.hsm import objects, open_token
wrong, right = sys.argv[1:]
try:
    open_token(wrong)
    print(json.dumps({"raised": None}))
except keymgr.PinIncorrectError as exc:
    ts = open_token(right)
    print(json.dumps({"raised": type(exc).__name__, "message": str(exc), "repr": repr(exc),
                      "tries_left": exc.tries_left, "then": len(objects.random_bytes(ts, 8))}))
"""


def test_wrong_pin_reports_token_and_state_and_is_not_retried(softhsm: TokenUnderTest) -> None:
    tok = softhsm_token("lockout")
    uri = f"pkcs11:token=lockout?module-path={tok.module_path}&pin-value=0000"
    proc = subprocess.run([sys.executable, "-c", _WRONG_THEN_RIGHT, uri, tok.uri()], capture_output=True, text=True,
                          env={**os.environ, **tok.env}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    caught = json.loads(proc.stdout)
    assert caught["raised"] == "PinIncorrectError"
    message = caught["message"]
    assert "lockout" in message
    assert "0000" not in message and "0000" not in caught["repr"]
    # SoftHSM raises CKF_USER_PIN_COUNT_LOW after a failed login (measured)
    assert caught["tries_left"] == "count-low"
    assert "did not retry" in message
    # the right PIN still works afterwards: keymgr spent exactly one try
    assert caught["then"] == 8


def test_tries_left_state_reads_the_flags() -> None:
    assert tries_left_state(0x40000 | 0x10000) == "locked"
    assert tries_left_state(0x20000) == "final-try"
    assert tries_left_state(0x10000) == "count-low"
    assert tries_left_state(0x400) == "unknown"


def test_pin_wrapper_hides_and_wipes() -> None:
    pin = Pin("s3cret-pin")
    assert "s3cret" not in repr(pin) and "s3cret" not in str(pin)
    with pytest.raises(TypeError):
        __import__("pickle").dumps(pin)
    assert pin.reveal() == "s3cret-pin"
    pin.wipe()
    assert "s3cret" not in repr(pin)


def test_pin_sources(tmp_path, monkeypatch) -> None:
    request = PinRequest("T")
    pin_file = tmp_path / "pin"
    pin_file.write_text("file-pin\n")
    pin_file.chmod(0o600)
    assert pin_source_from_uri(f"file:{pin_file}", None).read(request).reveal() == "file-pin"
    assert pin_source_from_uri(str(pin_file), None).read(request).reveal() == "file-pin"
    pin_file.chmod(0o644)
    with pytest.raises(keymgr.ConfigurationError, match="readable by others"):
        pin_source_from_uri(f"file:{pin_file}", None).read(request)
    monkeypatch.setenv("KM_TEST_PIN", "env-pin")
    assert pin_source_from_uri("env:KM_TEST_PIN", None).read(request).reveal() == "env-pin"
    monkeypatch.delenv("KM_TEST_PIN")
    with pytest.raises(keymgr.AuthenticationError):
        pin_source_from_uri("env:KM_TEST_PIN", None).read(request)
    value_source = pin_source_from_uri(None, "value-pin")
    assert "value-pin" not in repr(value_source)
    assert value_source.read(request).reveal() == "value-pin"
    assert PinSource("callback").read(request, lambda r: "cb-pin").reveal() == "cb-pin"
    with pytest.raises(keymgr.AuthenticationError, match="none was given"):
        PinSource("callback").read(request, lambda r: None)
    with pytest.raises(keymgr.ConfigurationError):
        pin_source_from_uri("https://example.invalid/pin", None)


_ASKED_AT_LOGIN = """
import sys
from pathlib import Path
from keymgr.hsm import objects, open_token
asked = []
def callback(request):
    asked.append((request.token_label, request.reason))
    return sys.argv[2]
ts = open_token(sys.argv[1], pin_callback=callback)
assert len(objects.random_bytes(ts, 4)) == 4
print(asked)
"""


def test_pin_callback_is_asked_with_token_label(softhsm: TokenUnderTest) -> None:
    """A process's first login asks the callback, naming the token. Run in a process of its own:
    logging this one out (close_all) to see a first login again left every fixture holding a
    session reopening sessions the process no longer tracked."""
    done = subprocess.run([sys.executable, "-c", _ASKED_AT_LOGIN, softhsm.uri(pin=False), softhsm.user_pin],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **softhsm.env},
                          cwd=str(Path(__file__).resolve().parents[2]))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == repr([(softhsm.label, "login")])


@pytest.mark.slow
def test_eight_threads_thousand_operations_each(softhsm: TokenUnderTest, key_name: str) -> None:
    km = keymgr.KeyManager(softhsm.uri())
    km.create_key(key_name, profile="gcm")
    ts = token_of(km)
    key_id = km.describe_key(key_name).primary_version.key_id

    def worker(n: int) -> int:
        done = 0
        for i in range(1000):
            nonce = os.urandom(12)
            data = f"{n}-{i}".encode()
            ct = objects.gcm_encrypt(ts, key_id, data, nonce=nonce, aad=b"a")
            assert bytes(objects.gcm_decrypt(ts, key_id, ct, nonce=nonce, aad=b"a")) == data
            done += 1
        return done

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(worker, range(8)))
    assert results == [1000] * 8


@pytest.mark.skipif(sys.platform != "linux", reason="fork semantics tested on Linux")
def test_child_after_fork_reinitialises_and_works(softhsm: TokenUnderTest, key_name: str) -> None:
    km = keymgr.KeyManager(softhsm.uri())
    km.create_key(key_name, profile="gcm")
    key_id = km.describe_key(key_name).primary_version.key_id
    nonce = os.urandom(12)
    ct = objects.gcm_encrypt(token_of(km), key_id, b"before fork", nonce=nonce, aad=b"")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        status = 1
        try:
            out = objects.gcm_decrypt(token_of(km), key_id, ct, nonce=nonce, aad=b"")
            status = 0 if bytes(out) == b"before fork" else 2
        except BaseException:  # noqa: BLE001
            status = 3
        finally:
            os.write(write_fd, bytes([status]))
            os._exit(0)
    os.close(write_fd)
    result = os.read(read_fd, 1)
    os.waitpid(pid, 0)
    assert result == b"\x00", f"child status {result!r}"
    # the parent's session is untouched by the child's re-initialisation
    assert bytes(objects.gcm_decrypt(token_of(km), key_id, ct, nonce=nonce, aad=b"")) == b"before fork"


def _fork_child_start() -> float:
    """Fork a child that reports when it started running, then leaves at once; that time."""
    import time

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write_fd, repr(time.monotonic()).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        started = float(pipe.read())
    os.waitpid(pid, 0)
    return started


def _hold_module_lock(module: object, seconds: float) -> tuple[object, object, list[float]]:
    """A thread in a 'token call' (the module lock held) for ``seconds``: (thread, entered, released at)."""
    import threading
    import time

    entered, released = threading.Event(), []

    def token_call() -> None:
        with module.lock:  # type: ignore[attr-defined]  # what TokenSession.run holds around each call
            entered.set()
            time.sleep(seconds)
            released.append(time.monotonic())

    thread = threading.Thread(target=token_call)
    thread.start()
    entered.wait()
    return thread, entered, released


def _assert_module_free(module: object) -> None:
    """Another thread can take the module lock (no fork kept it)."""
    import threading

    got = []

    def take_and_give_back() -> None:
        taken = module.lock.acquire(timeout=5)  # type: ignore[attr-defined]
        got.append(taken)
        if taken:
            module.lock.release()  # type: ignore[attr-defined]

    probe = threading.Thread(target=take_and_give_back)
    probe.start()
    probe.join(10)
    assert got == [True]


@pytest.mark.skipif(sys.platform != "linux", reason="fork semantics tested on Linux")
def test_a_fork_waits_for_a_token_call_under_way_in_another_thread(softhsm: TokenUnderTest) -> None:
    """No thread is inside a module when the process forks (its own locks, and OpenSSL's inside
    SoftHSM, would stay held in the child, which could hang re-initialising it): the fork waits
    for the module lock every token call holds. Ordering, not timing: the child starts after the
    other thread released it."""
    with keymgr.KeyManager(softhsm.uri()) as km:
        module = token_of(km).module
        thread, _, released = _hold_module_lock(module, 0.3)
        child_started = _fork_child_start()
        thread.join()  # type: ignore[attr-defined]
        assert released and child_started >= released[0]
        _assert_module_free(module)


@pytest.mark.skipif(sys.platform != "linux", reason="fork semantics tested on Linux")
def test_concurrent_forks_each_release_what_they_took(softhsm: TokenUnderTest) -> None:
    """Two threads forking at once while a token call is under way: both forks finish and no
    module lock stays held (a shared record of the locks taken lost one for good)."""
    import threading

    with keymgr.KeyManager(softhsm.uri()) as km:
        module = token_of(km).module
        for _ in range(5):
            holder, _, _ = _hold_module_lock(module, 0.1)
            forkers = [threading.Thread(target=_fork_child_start) for _ in range(2)]
            for forker in forkers:
                forker.start()
            for thread in (*forkers, holder):
                thread.join(20)  # type: ignore[attr-defined]
                assert not thread.is_alive()  # type: ignore[attr-defined]
            _assert_module_free(module)


@pytest.mark.skipif(sys.platform != "linux", reason="fork semantics tested on Linux")
def test_a_fork_waits_at_most_fork_wait_then_forks(softhsm: TokenUnderTest, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A token call longer than FORK_WAIT (a PIN prompt answered under the lock, a hung token)
    delays a fork by FORK_WAIT, never for good: the child starts before the call ends, the
    parent says so, and the lock is the caller's again afterwards."""
    import logging

    from keymgr.hsm import modules

    monkeypatch.setattr(modules, "FORK_WAIT", 0.2)
    with keymgr.KeyManager(softhsm.uri()) as km:
        module = token_of(km).module
        thread, _, released = _hold_module_lock(module, 2.0)
        with caplog.at_level(logging.WARNING, logger="keymgr.hsm"):
            child_started = _fork_child_start()
        assert not released  # forked while the call still ran
        thread.join()  # type: ignore[attr-defined]
        assert released and child_started < released[0]
        assert any("forked without waiting" in r.getMessage() for r in caplog.records)
        _assert_module_free(module)


@pytest.mark.skipif(sys.platform != "linux", reason="fork semantics tested on Linux")
def test_a_ctrl_c_while_a_fork_waits_stops_the_wait_and_is_raised_after_the_fork(softhsm: TokenUnderTest) -> None:
    """CPython swallows an exception raised in a fork hook: a Ctrl-C while a fork waited for a
    token call was lost (and the fork went on waiting). Now it stops the wait, the fork goes
    ahead, and KeyboardInterrupt comes out of os.fork's caller, with no lock left held."""
    import threading
    import time

    with keymgr.KeyManager(softhsm.uri()) as km:
        module = token_of(km).module
        holder, _, released = _hold_module_lock(module, 3.0)
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        started = time.monotonic()
        pid = 0
        with pytest.raises(KeyboardInterrupt):
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            for _ in range(50):  # the interrupt comes as soon as Python code runs after the fork
                time.sleep(0.1)
        waited = time.monotonic() - started
        assert waited < 2.5 and not released  # the fork did not wait out FORK_WAIT (5 s)
        if pid:
            os.waitpid(pid, 0)
        holder.join()  # type: ignore[attr-defined]
        _assert_module_free(module)


def test_lost_session_is_reopened_and_relogged(softhsm: TokenUnderTest, key_name: str) -> None:
    km = keymgr.KeyManager(softhsm.uri())
    km.create_key(key_name, profile="gcm")
    ts = token_of(km)
    # close the session under keymgr's feet, as a token reset would
    ts.run("test", lambda s: s.close())
    record = keyring_of(km)
    record.reload()  # needs a logged-in session again: must recover by itself
    assert km.describe_key(key_name).name == key_name


_LOGIN_ERROR = """
import sys
import keymgr
from keymgr.hsm import open_token
try:
    open_token(sys.argv[1])
except keymgr.KeymgrError as exc:
    print(type(exc).__name__)
else:
    print("logged in")
"""


def test_so_pin_is_not_user_pin(softhsm: TokenUnderTest) -> None:
    """The SO PIN must not log in as the user. In a process of its own: this one is logged in to
    every test token already (a login is per process), so open_token would ask for nothing."""
    uri = f"pkcs11:token=custodian-3?module-path={softhsm.module_path}&pin-value={SO_PIN}"
    done = subprocess.run([sys.executable, "-c", _LOGIN_ERROR, uri], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **softhsm.env}, cwd=str(Path(__file__).resolve().parents[2]))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "PinIncorrectError"
    assert SO_PIN not in done.stdout + done.stderr


def test_protected_path_on_a_token_without_a_pin_pad_is_refused_before_login(softhsm: TokenUnderTest) -> None:
    assert PinSource("protected").read(PinRequest(softhsm.label)) is None  # the PIN pad asks, not keymgr
    # a fresh process: this one may be logged in to the token already (login is per process)
    uri = f"pkcs11:token={softhsm.label}?module-path={softhsm.module_path}&pin-source=protected"
    proc = subprocess.run([sys.executable, "-m", "keymgr", "--token", uri, "key", "list"], capture_output=True,
                          text=True, env={**os.environ, **softhsm.env}, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"keymgr: error: token {softhsm.label!r} has no protected authentication path (PIN pad): give its PIN "
        "(pin-source=file:... or env:VAR, or at a prompt)"]


def test_pin_is_in_no_repr_of_what_holds_it(softhsm: TokenUnderTest) -> None:
    from keymgr.hsm import Pkcs11Uri

    with keymgr.KeyManager(softhsm.uri()) as km:
        ts = open_token(softhsm.uri())
        held = [km, ts, Pkcs11Uri.parse(softhsm.uri()), pin_source_from_uri(None, softhsm.user_pin)]
        for thing in held:
            shown = (repr(thing) + str(thing)).replace(ts.serial, "")  # a hex serial may hold any digits
            assert softhsm.user_pin not in shown, type(thing).__name__
