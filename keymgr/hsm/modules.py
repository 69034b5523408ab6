"""PKCS#11 modules: find, load, serialise and re-initialise after ``fork()``.

Three measured facts shape this module (``shared/STACK-FACTS.md``):

1. python-pkcs11 calls ``C_Initialize(NULL)``, so modules such as SoftHSM run
   *without* internal locking while python-pkcs11 releases the GIL: two
   threads calling one module at once can crash the process. Every call into
   a module therefore runs under that module's own process-wide lock
   (:meth:`Module.lock`). Parallelism comes from processes.
2. python-pkcs11 keeps one instance per library path, so several modules can
   be loaded side by side.
3. PKCS#11 state does not survive ``fork()``: a child must call
   ``C_Initialize`` again (PKCS#11 v2.40 section 6.7.7). :func:`os.register_at_fork`
   marks every module stale in the child; the next call re-initialises it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pkcs11
import pkcs11.exceptions as p11x

from keymgr import errors
from keymgr.hsm._errors import code_name
from keymgr.oplog import hsm as log

__all__ = ["Module", "load_module", "resolve_module_name", "loaded_modules", "use_softhsm_config",
           "DEFAULT_MODULE_DIRS", "SOFTHSM_CONF_ATTR"]

#: keymgr's vendor query attribute (RFC 7512 section 2.3, ``pk11-v-qattr``) naming the
#: ``softhsm2.conf`` a SoftHSM token lives under: SoftHSM reads its token directory from
#: ``SOFTHSM2_CONF`` once, when loaded, so a URI for a token outside the system directory
#: (the local token of ``keymgr init``) must say where it is to work in a fresh process.
SOFTHSM_CONF_ATTR = "softhsm2-conf"

#: Where p11-kit keeps module registrations and where Debian installs modules.
P11KIT_CONFIG_DIRS = (Path("/etc/pkcs11/modules"), Path("/usr/share/p11-kit/modules"))
DEFAULT_MODULE_DIRS = (
    Path("/usr/lib/x86_64-linux-gnu/pkcs11"),
    Path("/usr/lib/aarch64-linux-gnu/pkcs11"),
    Path("/usr/lib/pkcs11"),
    Path("/usr/lib/softhsm"),
    Path("/usr/lib/x86_64-linux-gnu"),
    Path("/usr/lib/aarch64-linux-gnu"),
    Path("/usr/local/lib"),
)


@dataclass(eq=False)
class Module:
    """One loaded PKCS#11 module and the lock that serialises calls into it."""

    path: str
    lib: Any  # a pkcs11.lib (Cython, untyped)
    lock: threading.RLock = field(default_factory=threading.RLock)
    pid: int = field(default_factory=os.getpid)
    #: Bumped whenever the module is re-initialised: sessions opened under an
    #: older generation are dead and must be reopened.
    generation: int = 0
    #: Set once a TokenSession of this process uses the module: from then on, re-initialising it
    #: to look for a token again would log every such session out.
    in_use: bool = False

    @property
    def description(self) -> str:
        return f"{self.lib.manufacturer_id.strip()} {self.lib.library_description.strip()}".strip()

    def ensure_current(self) -> None:
        """Re-initialise the module in a forked child before its first call."""
        if self.pid == os.getpid():
            return
        with self.lock:
            if self.pid == os.getpid():
                return
            try:
                self.lib.reinitialize()
            except p11x.PKCS11Error:
                # C_Finalize on the parent's state can fail in the child; what
                # matters is that C_Initialize now succeeds.
                try:
                    self.lib.initialize()
                except p11x.PKCS11Error as exc:
                    raise errors.ModuleLoadError(
                        f"cannot re-initialise PKCS#11 module {self.path} after fork"
                    ) from exc
            self.pid = os.getpid()
            self.generation += 1
            log.debug("module %s re-initialised in forked child %d", self.path, self.pid)

    def reinitialize(self) -> None:
        """C_Finalize + C_Initialize: how a module re-reads its slots after a token
        was removed and came back (some modules cache the slot list)."""
        with self.lock:
            try:
                self.lib.reinitialize()
            except p11x.PKCS11Error as exc:
                raise errors.ModuleLoadError(f"cannot re-initialise PKCS#11 module {self.path}") from exc
            self.generation += 1


_modules: dict[str, Module] = {}
_registry_lock = threading.RLock()  # reentrant: a fork from a signal handler may come while it is held

#: Longest a fork waits for other threads' token calls and module loads to finish; then it forks
#: anyway (as before this wait existed) and says so on the ``keymgr.hsm`` logger.
FORK_WAIT = 5.0
#: One fork at a time (a fork from a signal handler nests in its thread's own fork: reentrant).
_fork_gate = threading.RLock()


class _ForkState(threading.local):
    def __init__(self) -> None:
        self.taken: list[list[Any]] = []  # the locks each fork under way in this thread took
        self.late = False  # a fork that did not get every lock within FORK_WAIT
        self.interrupted: BaseException | None = None  # what interrupted a fork's wait (Ctrl-C)


_fork_state = _ForkState()


def _before_fork() -> None:
    """No other thread inside a module, nor loading one, while the process is copied: a child
    forked in the middle of another thread's token call inherits the module's own locks (and
    OpenSSL's, inside SoftHSM) held, and can hang for good re-initialising it (an outside review:
    2 in ~100 forks beside a thread refreshing the keyring; 31 of 70 beside a module load). So a
    fork takes the fork gate, the registry lock and every module lock first, each with what is
    left of :data:`FORK_WAIT`: a token call that takes longer (a PIN prompt answered under the
    module lock, a hung token) delays the fork by that much, never deadlocks it. The locks taken
    are kept per fork, in the forking thread, so concurrent and nested forks release exactly
    their own (a shared list lost a lock for good: the third review). A Ctrl-C while the fork
    waits stops the waiting (CPython would swallow it in a fork hook): the fork goes ahead as if
    late, and the interrupt is raised again once the fork is done."""
    taken: list[Any] = []
    nested = bool(_fork_state.taken)  # a fork from a signal handler that came while this thread's fork waited
    _fork_state.taken.append(taken)
    # nested: no wait. The outer fork's other hooks (those registered after this one run before it)
    # may already hold their locks, some not reentrant (concurrent.futures'): the nested fork's own
    # run of them would wait for good on the outer fork, which waits for it
    deadline = time.monotonic() + (0.0 if nested else FORK_WAIT)

    def take(lock: Any) -> bool:
        held_before = lock._is_owned()  # noqa: SLF001 - RLock's own test, as threading.Condition uses it
        try:
            if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                _fork_state.late = True
                return False
            taken.append(lock)
            return True
        except BaseException as exc:  # an interrupt in the wait (not taken) or just after it (maybe not recorded)
            _fork_state.interrupted = exc
            if not held_before and lock._is_owned() and (not taken or taken[-1] is not lock):  # noqa: SLF001
                taken.append(lock)
            return False

    if take(_fork_gate) and take(_registry_lock):  # the modules listed once no load is under way
        for path in sorted(_modules):
            if not take(_modules[path].lock):
                return


def _after_fork_in_parent() -> None:
    state = _fork_state
    if not state.taken:
        return
    for lock in reversed(state.taken.pop()):
        lock.release()
    if state.taken:  # a fork nested in this thread's own (a signal handler's): the outer one reports
        return
    late, interrupted = state.late, state.interrupted
    state.late, state.interrupted = False, None
    if late or interrupted is not None:
        log.warning("fork: %s; forked without waiting for another thread's token call or module load (the child "
                    "may hang re-initialising the module)",
                    "interrupted" if interrupted is not None else f"still running after {FORK_WAIT:.0f} s")
    if interrupted is not None:
        _raise_after_hooks(interrupted)


def _raise_after_hooks(exc: BaseException) -> None:
    """Raise ``exc``'s type in the main thread once the fork hooks are done: CPython swallows an
    exception raised in a fork hook, so a Ctrl-C (or keymgr's SIGTERM) that came while a fork
    waited would be lost, and a program that ignores a second signal could not be stopped.
    Raised asynchronously (``PyThreadState_SetAsyncExc``), as the signal's own handler did (not
    by sending the signal again, which that handler may now ignore), from a timer 50 ms later:
    raised at once, it would land in this hook or a later one (another library's lock release)
    and be swallowed there too. The interrupt so arrives 50 ms late, as if it had been sent then."""
    if threading.current_thread() is not threading.main_thread():
        return  # signals raise in the main thread only: nothing of theirs to give back here
    main = ctypes.c_ulong(threading.get_ident())
    raise_it = ctypes.pythonapi.PyThreadState_SetAsyncExc
    timer = threading.Timer(0.05, lambda: raise_it(main, ctypes.py_object(type(exc))))
    timer.daemon = True
    timer.start()


def _after_fork_in_child() -> None:
    # Locks copied from the parent are held: by this fork, or by threads that do not exist here.
    global _registry_lock, _fork_gate, _fork_state
    _registry_lock = threading.RLock()
    _fork_gate = threading.RLock()
    _fork_state = _ForkState()
    for module in _modules.values():
        module.lock = threading.RLock()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


def resolve_module_name(name: str) -> str:
    """Find the library for an RFC 7512 ``module-name`` (e.g. ``softhsm2``).

    Looks first at p11-kit's module registrations (``NAME.module``), then for
    ``libNAME.so`` / ``NAME.so`` in the usual library directories.
    """
    if "/" in name or not name:
        raise errors.ConfigurationError(f"module-name must be a bare name, not a path: {name!r}")
    for directory in P11KIT_CONFIG_DIRS:
        config = directory / f"{name}.module"
        if config.is_file():
            for line in config.read_text(errors="replace").splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "module" and value.strip():
                    return _absolute_module_path(value.strip())
    for directory in DEFAULT_MODULE_DIRS:
        for candidate in (f"lib{name}.so", f"{name}.so", name):
            path = directory / candidate
            if path.is_file():
                return str(path)
    raise errors.ModuleLoadError(f"no PKCS#11 module named {name!r} (looked in p11-kit registrations and library dirs)")


def _absolute_module_path(value: str) -> str:
    if value.startswith("/"):
        return value
    for directory in DEFAULT_MODULE_DIRS:
        if (directory / value).is_file():
            return str(directory / value)
    raise errors.ModuleLoadError(f"p11-kit names module {value!r}, which is not installed")


def _load_failure(path: str, exc: BaseException) -> str:
    """Why loading ``path`` failed, in words an operator can act on. python-pkcs11 loads the
    library and calls C_Initialize in one step: a PKCS#11 error here is the module's own
    C_Initialize refusing, most often because the service behind it is down."""
    if isinstance(exc, p11x.PKCS11Error) and "while loading" in str(exc):  # dlopen refused it
        return f"cannot load PKCS#11 module {path}: not a loadable PKCS#11 library ({str(exc).split(': ')[-1]})"
    if isinstance(exc, p11x.PKCS11Error):
        service = (" (for tpm2-pkcs11: the TPM, its resource manager tpm2-abrmd, or the D-Bus it is reached "
                   "through; see the module's messages above)" if "tpm2" in os.path.basename(path) else "")
        return (f"PKCS#11 module {path} loaded, but its C_Initialize failed ({code_name(exc)}): the module "
                f"could not reach its token or the service behind it{service}")
    return f"cannot load PKCS#11 module {path}: {type(exc).__name__}: {exc}"


def load_module(path: str) -> Module:
    """Load (once per process) the PKCS#11 module at ``path``."""
    real = os.path.realpath(path)
    with _registry_lock:
        module = _modules.get(real)
        if module is not None:
            module.ensure_current()
            return module
        if not os.path.isfile(real):
            raise errors.ModuleLoadError(f"PKCS#11 module not found: {path}")
        try:
            lib = pkcs11.lib(real)
        except (p11x.PKCS11Error, OSError, RuntimeError) as exc:
            raise errors.ModuleLoadError(_load_failure(path, exc)) from exc
        module = Module(path=real, lib=lib)
        _modules[real] = module
        if log.isEnabledFor(logging.DEBUG):  # description reads the module's info
            log.debug("module %s loaded (%s)", real, module.description)
        return module


def use_softhsm_config(conf: str) -> None:
    """Point SoftHSM at ``conf`` before it is loaded in this process.

    SoftHSM reads ``SOFTHSM2_CONF`` at C_Initialize only, so once it is loaded with another
    configuration the tokens of ``conf`` stay invisible: that is an error, not a silent miss."""
    wanted = os.path.abspath(conf)
    if not os.path.isfile(wanted):
        raise errors.ConfigurationError(f"no SoftHSM configuration at {wanted} (the {SOFTHSM_CONF_ATTR}= of the "
                                        "token URI); was `keymgr init` run with another KEYMGR_HOME?")
    current = os.environ.get("SOFTHSM2_CONF")
    if current is not None and os.path.abspath(current) == wanted:
        return
    if any("softhsm" in m.path for m in loaded_modules()):
        raise errors.ConfigurationError(
            "SoftHSM was already loaded in this process with another SOFTHSM2_CONF; "
            "open the local token before any other SoftHSM token, or pass a token URI")
    os.environ["SOFTHSM2_CONF"] = wanted


def loaded_modules() -> list[Module]:
    """Every module this process has loaded so far."""
    with _registry_lock:
        return list(_modules.values())
