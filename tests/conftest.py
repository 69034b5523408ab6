"""Real tokens for the test suite: fresh SoftHSM2 tokens per run, and a software TPM.

One SoftHSM configuration per test run lives in a temporary directory
(``SOFTHSM2_CONF`` is set before SoftHSM is first loaded), with every token
the suite needs initialised up front by ``softhsm2-util``: SoftHSM reads its
token directory when the module is initialised, so tokens made later would be
invisible without re-initialising the module.

Token-parameterised tests take the ``token`` fixture, which runs them on
SoftHSM and on the TPM; a test that needs a capability the token lacks is
skipped *by capability* with the reason: ``@pytest.mark.requires("aes-gcm")``
on a test that takes ``token``, ``softhsm`` or ``tpm`` (a marker on any other
test is a usage error), or ``requires(tok, "aes-gcm")`` for a token the test
makes itself. Never by accident: if the TPM cannot be set up and
``KEYMGR_REQUIRE_TPM=1`` (as in CI), the run fails instead of skipping.

After every test the autouse ``_no_leaks`` fixture checks that it left no
session objects, PKCS#11 sessions or open KeyManagers, and no token object
that names nothing it owns (tests/_leaks.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests._leaks import KeyManagerWatch, Mark, SoftHsmWindow, TokenFiles, judge

#: "crash" is for tests that SIGKILL processes in the middle of token calls: SoftHSM can be left with
#: a half-written object there (a find over every object then fails), which must not reach other tests;
#: "interrupt-A" / "interrupt-B" are tests/custody/test_interrupt_ceremonies.py's own (it interrupts ~100 child
#: processes, each of which reads every fact of its token: the shared tokens' keys would make that slow)
SOFTHSM_TOKENS = ("keymgr-A", "keymgr-B", "custodian-1", "custodian-2", "custodian-3", "lockout", "hygiene", "crash",
                  "interrupt-A", "interrupt-B", "mac-swap")
USER_PIN = "1234"
SO_PIN = "5678"


@dataclass(frozen=True)
class TokenUnderTest:
    """A real token the suite runs against."""

    kind: str  # "softhsm" or "tpm"
    module_path: str
    label: str
    user_pin: str
    so_pin: str
    env: dict[str, str] = field(default_factory=dict)

    def uri(self, *, pin: bool = True, extra: str = "") -> str:
        query = f"module-path={self.module_path}"
        if pin:
            query += f"&pin-value={self.user_pin}"
        return f"pkcs11:token={self.label}{extra}?{query}"

    def __str__(self) -> str:
        return self.kind


def _softhsm_module() -> str:
    from keymgr.hsm.discovery import SOFTHSM_CANDIDATES

    for candidate in SOFTHSM_CANDIDATES:
        if os.path.isfile(candidate):
            return candidate
    raise RuntimeError("SoftHSM2 is not installed: run scripts/setup.sh --dev")


_RUN_DIR = Path(tempfile.mkdtemp(prefix="keymgr-tests-"))


def pytest_configure(config: pytest.Config) -> None:
    # A suite started in the background by a shell without job control (`cmd &` in a script, as a
    # CI runner may) inherits SIGINT ignored, and so would every keymgr the tests start: keymgr
    # rightly keeps a signal its parent ignores ignored, and the Ctrl-C tests would wait forever.
    # The tests stand for a custodian at a terminal, where SIGINT is live.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    conf = _RUN_DIR / "softhsm2.conf"
    tokens = _RUN_DIR / "tokens"
    tokens.mkdir()
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    # the default audit logs of URI-named tokens (per user, under XDG_STATE_HOME) stay in this run
    os.environ["XDG_STATE_HOME"] = str(_RUN_DIR / "state")
    # the suite's URIs carry pin-value= on purpose (throwaway tokens): no warning in every CLI run;
    # tests/test_cli_safety.py checks the warning with this unset
    os.environ["KEYMGR_ALLOW_PIN_VALUE"] = "1"
    for label in SOFTHSM_TOKENS:
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", SO_PIN,
                        "--pin", USER_PIN], check=True, capture_output=True)


def _finalize_modules() -> None:
    """Log out and C_Finalize every module while its token still runs: finalizing the
    TPM module after its daemons are gone makes tpm2-pkcs11 print errors at exit."""
    from keymgr.hsm import close_all
    from keymgr.hsm.modules import loaded_modules

    with contextlib.suppress(Exception):  # best effort at shutdown
        close_all()
    for module in loaded_modules():
        try:
            with module.lock:
                module.lib.finalize()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass


def pytest_unconfigure(config: pytest.Config) -> None:
    if "dir" in _tpm_state:
        from tests.tokens.tpm import reset_tpm

        _finalize_modules()
        reset_tpm(_tpm_state["dir"])  # type: ignore[arg-type]
    shutil.rmtree(_RUN_DIR, ignore_errors=True)


def softhsm_token(label: str = "keymgr-A") -> TokenUnderTest:
    return TokenUnderTest("softhsm", _softhsm_module(), label, USER_PIN, SO_PIN,
                          {"SOFTHSM2_CONF": os.environ["SOFTHSM2_CONF"]})


_tpm_state: dict[str, object] = {}


def tpm_token() -> TokenUnderTest:
    """The software TPM token, set up once per run (see scripts/tpm2-token.sh)."""
    if "token" in _tpm_state:
        return _tpm_state["token"]  # type: ignore[return-value]
    if "error" in _tpm_state:
        _tpm_unavailable(str(_tpm_state["error"]))
    from tests.tokens.tpm import ensure_tpm_token

    state_dir = Path(os.environ.get("KEYMGR_TPM_DIR", str(_RUN_DIR / "tpm")))
    try:
        tpm = ensure_tpm_token(state_dir)
    except Exception as exc:  # noqa: BLE001 - reported below, never swallowed
        _tpm_state["error"] = f"{type(exc).__name__}: {exc}"
        _tpm_unavailable(str(_tpm_state["error"]))
    if tpm is None:
        _tpm_state["error"] = "the TPM token could not be set up on this machine"
        _tpm_unavailable(str(_tpm_state["error"]))
    os.environ.update(tpm.env)
    token = TokenUnderTest("tpm", tpm.module_path, tpm.token_label, tpm.user_pin, tpm.so_pin, dict(tpm.env))
    _tpm_state["token"] = token
    _tpm_state["dir"] = state_dir
    return token


def tpm_state_dir() -> Path:
    """The TPM token's state directory, for tests that stop, start or unlock it (tests/tokens/tpm.py)."""
    tpm_token()
    return Path(str(_tpm_state["dir"]))


def _tpm_unavailable(reason: str) -> None:
    if os.environ.get("KEYMGR_REQUIRE_TPM") == "1":
        pytest.fail(f"KEYMGR_REQUIRE_TPM=1 but the TPM token is unavailable: {reason}")
    pytest.skip(f"TPM token unavailable (set KEYMGR_REQUIRE_TPM=1 to make this fail): {reason}")


#: the fixtures a ``@pytest.mark.requires(...)`` applies to
TOKEN_FIXTURES = ("token", "softhsm", "tpm")


def _with_capabilities(request: pytest.FixtureRequest, tok: TokenUnderTest) -> TokenUnderTest:
    """Apply the test's ``@pytest.mark.requires(...)`` to the token it gets: skip with the probed reason."""
    for marker in request.node.iter_markers("requires"):
        requires(tok, *marker.args)
    return tok


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A ``requires`` marker on a test without a token fixture would never skip: refuse it."""
    for item in items:
        marker = item.get_closest_marker("requires")
        if marker is None:
            continue
        if not marker.args or not all(isinstance(a, str) for a in marker.args):
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.requires takes capability names")
        if not set(TOKEN_FIXTURES) & set(getattr(item, "fixturenames", ())):
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.requires needs one of the fixtures "
                                    f"{', '.join(TOKEN_FIXTURES)} (or call requires(tok, ...) on a token it makes)")


@pytest.fixture(params=["softhsm", "tpm"])
def token(request: pytest.FixtureRequest) -> TokenUnderTest:
    """Each real token kind in turn (``@pytest.mark.requires(...)`` skips a kind by probed capability)."""
    return _with_capabilities(request, softhsm_token() if request.param == "softhsm" else tpm_token())


@pytest.fixture
def softhsm(request: pytest.FixtureRequest) -> TokenUnderTest:
    return _with_capabilities(request, softhsm_token())


@pytest.fixture
def tpm(request: pytest.FixtureRequest) -> TokenUnderTest:
    return _with_capabilities(request, tpm_token())


def requires(tok: TokenUnderTest, *capabilities: str) -> None:
    """Skip (with the reason) when the token lacks a capability, as probed on the token itself."""
    from keymgr.hsm import open_token, probe

    caps = probe(open_token(tok.uri()))
    missing = [c for c in capabilities if not caps.has(c)]
    if missing:
        pytest.skip(f"{tok.kind} token lacks {', '.join(missing)} (probed)")


@pytest.fixture
def key_name(request: pytest.FixtureRequest) -> str:
    """A key name no other test uses (tests share the run's tokens); the leak check lets the
    test leave keyring objects whose key names contain it."""
    name = f"k-{uuid.uuid4().hex[:10]}"
    request.node.stash.setdefault(_OWNED_NAMES, []).append(name)
    return name


_OWNED_NAMES = pytest.StashKey[list[str]]()
_LEAKS: dict[str, object] = {}
_KNOWN_OBJECTS: set[tuple[int, str]] = set()
#: key names handed out by ``key_name`` and label prefixes declared with ``leaves_objects``, by every
#: test so far: SoftHSM may number an object again (after a re-initialise) in a later test
_RUN_OWNED: tuple[set[str], set[str]] = (set(), {"custody-"})  # tests/custody_helpers.party(): once per run
_LEAK_CHECK_SECONDS = [0.0, 0]


def _leak_watchers() -> tuple[SoftHsmWindow, TokenFiles, KeyManagerWatch]:
    if not _LEAKS:
        _LEAKS["window"] = SoftHsmWindow(_softhsm_module())
        _LEAKS["files"] = TokenFiles(_RUN_DIR / "tokens")
        _LEAKS["managers"] = watch = KeyManagerWatch()
        watch.install()
    return _LEAKS["window"], _LEAKS["files"], _LEAKS["managers"]  # type: ignore[return-value]


@pytest.fixture(autouse=True)
def _no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test (and its fixtures' teardown): no session objects, PKCS#11 sessions or open
    KeyManagers left by it, and no token object it made that names nothing it owns (tests/_leaks.py)."""
    began = time.perf_counter()
    window, files, managers = _leak_watchers()
    start, listing = window.mark(), files.start()
    previous = _LEAKS.get("end")
    if isinstance(previous, Mark) and start is not None and start.generation == previous.generation:
        # objects made since the last test by module- and session-scoped fixtures: theirs, not a test's
        _KNOWN_OBJECTS.update(item.identity() for item in window.live_since(previous, start))
    managers.start()
    paused = time.perf_counter()
    yield
    resumed = time.perf_counter()
    open_managers = managers.still_open()
    end = window.mark()
    found = [] if start is None or end is None else window.live_since(start, end)
    _LEAKS["end"] = end
    marker = request.node.get_closest_marker("leaves_objects")
    _RUN_OWNED[0].update(request.node.stash.get(_OWNED_NAMES, []))
    _RUN_OWNED[1].update(marker.args if marker else ())
    known_leak = request.node.get_closest_marker("known_session_leak")
    report = judge(found, _KNOWN_OBJECTS, files.made_since(listing), *_RUN_OWNED, open_managers,
                   known_leak.args[0] if known_leak else None,
                   strict=known_leak.kwargs.get("strict", True) if known_leak else True)
    _LEAK_CHECK_SECONDS[0] += (paused - began) + (time.perf_counter() - resumed)
    _LEAK_CHECK_SECONDS[1] += 1
    if report:
        pytest.fail("leak check (tests/_leaks.py):\n  " + "\n  ".join(report.problems), pytrace=False)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    seconds, tests = _LEAK_CHECK_SECONDS
    if tests:
        terminalreporter.write_line(f"leak check: {tests} tests, {seconds:.2f} s in all "
                                    f"({1000 * seconds / tests:.2f} ms per test)")


@pytest.fixture
def km_a(softhsm: TokenUnderTest) -> Iterator[object]:
    """A KeyManager on SoftHSM token keymgr-A (HSM A of the two-site tests)."""
    import keymgr

    with keymgr.KeyManager(softhsm.uri()) as manager:
        yield manager


@pytest.fixture
def km_b() -> Iterator[object]:
    """A KeyManager on SoftHSM token keymgr-B (the second HSM: another site, a restore target)."""
    import keymgr

    with keymgr.KeyManager(softhsm_token("keymgr-B").uri()) as manager:
        yield manager


@pytest.fixture
def km(token: TokenUnderTest) -> Iterator[object]:
    """A KeyManager on each token kind that can hold a keyring."""
    import keymgr

    requires(token, "aes-keygen", "hmac-sha256", "data-objects")
    with keymgr.KeyManager(token.uri()) as manager:
        yield manager
