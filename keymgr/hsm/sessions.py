"""One logged-in session per token per process, safe for threads and ``fork()``.

Why one session and not a pool: every call into a module must be serialised
anyway (SoftHSM runs without locking under python-pkcs11: STACK-FACTS.md 1),
and login state belongs to the application, not the session (STACK-FACTS.md 2:
closing the session that logged in logs every other one out). A single
session, opened and logged in once, used under the module lock, gives the
same throughput with none of the pitfalls. Processes give parallelism.

Recovery:

* a session handle that goes invalid (closed, logged out) is reopened and,
  when the PIN came from a non-interactive source or was given once in this
  process, logged in again; the failed call is retried once;
* a token that disappears raises :class:`~keymgr.errors.TokenRemovedError`;
  the next call looks the token up again by its URI (a new slot id is fine),
  re-initialising the module if the token is not seen at first;
* CKR_GENERAL_ERROR / CKR_DEVICE_ERROR count as removal when the token no
  longer answers C_GenerateRandom (tpm2-pkcs11 reports a vanished TPM so, and
  keeps listing it); the module is then re-initialised and the call retried
  once, which brings back a token that has returned;
* an operation left active by a failed call (CKR_OPERATION_ACTIVE) is cleared
  by reopening the session;
* after ``fork()`` the child re-initialises the module and reopens its session.

Each of these is logged at DEBUG on the ``keymgr.hsm`` logger, a removed token and a refused
login at WARNING (:mod:`keymgr.oplog`); never a PIN.

A wrong PIN is never retried: the error carries the token's own tries-left
state, and keymgr logs in by itself only with a PIN that worked before.
Context-specific logins (CKA_ALWAYS_AUTHENTICATE) ask the PIN source again:
:meth:`TokenSession.context_pin`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import pkcs11
import pkcs11.exceptions as p11x
from pkcs11.constants import TokenFlag

from keymgr import errors
from keymgr.hsm._errors import SESSION_LOST, TOKEN_GONE, code_name, translate
from keymgr.hsm.discovery import FoundToken, find_token, list_tokens
from keymgr.hsm.modules import Module
from keymgr.hsm.pins import Pin, PinCallback, PinRequest, PinSource, pin_source_from_uri, tries_left_note
from keymgr.hsm.uri import Pkcs11Uri
from keymgr.oplog import hsm as log

__all__ = ["TokenSession", "open_token", "tries_left_state", "close_all"]

T = TypeVar("T")

#: Codes with which a module answers when the token's service went away or the module
#: must be re-initialised to see it again (tpm2-pkcs11 after its TPM restarted).
#: python-pkcs11 raises a bare PKCS11Error for CKR_CRYPTOKI_NOT_INITIALIZED (a failed re-initialise),
#: which code_name names; a bare PKCS11Error of another kind counts too.
_MODULE_STALE = frozenset({"CKR_GENERAL_ERROR", "CKR_DEVICE_ERROR", "CKR_CRYPTOKI_NOT_INITIALIZED", "PKCS11Error"})

#: What a session open may answer while another process's login rewrites SoftHSM's token file
#: (STACK-FACTS 23): tried again after a re-initialise
_OPEN_RACES = _MODULE_STALE | {"CKR_USER_PIN_NOT_INITIALIZED", "CKR_TOKEN_NOT_RECOGNIZED"}

_sessions: dict[tuple[str, str, str], TokenSession] = {}
_sessions_lock = threading.Lock()
#: How often reread() re-initialises before it believes the token is gone.
_REREAD_TRIES = 5


def tries_left_state(flags: int) -> str:
    """The token's PIN-counter state from CKF_USER_PIN_* flags."""
    if flags & TokenFlag.USER_PIN_LOCKED:
        return "locked"
    if flags & TokenFlag.USER_PIN_FINAL_TRY:
        return "final-try"
    if flags & TokenFlag.USER_PIN_COUNT_LOW:
        return "count-low"
    return "unknown"


class TokenSession:
    """A token this process has opened (and logged in to, when asked).

    Get one with :func:`open_token`; do not construct directly. ``run`` is the
    only way to reach the python-pkcs11 session, and it holds the module lock.
    """

    def __init__(self, found: FoundToken, uri: Pkcs11Uri, pin_source: PinSource,
                 pin_callback: PinCallback | None, login: bool) -> None:
        self._found = found
        found.module.in_use = True
        self._uri = uri
        self._pin_source = pin_source
        self._pin_callback = pin_callback
        self._want_login = login
        self._pin: Pin | None = None  # kept only to log in again after a lost session
        self._session: pkcs11.Session | None = None
        self._generation = -1
        self._pid = -1
        self._cache: dict[object, object] = {}
        self.label = found.label
        self.serial = found.serial

    def __repr__(self) -> str:
        return f"TokenSession({self.label!r}, serial={self.serial!r}, module={self.module.path!r})"

    @property
    def module(self) -> Module:
        return self._found.module

    @property
    def found(self) -> FoundToken:
        return self._found

    @property
    def logged_in(self) -> bool:
        """Whether this process uses the token logged in (private objects visible)."""
        return self._want_login

    @property
    def cache(self) -> dict[object, object]:
        """Per-session cache for object handles; emptied whenever the session is reopened (one dict
        for this TokenSession's life, never replaced: a caller may keep a reference to it)."""
        return self._cache

    # -- opening and logging in -------------------------------------------------

    def _open_locked(self) -> pkcs11.Session:
        module = self.module
        module.ensure_current()
        if self._session is not None and self._generation == module.generation and self._pid == module.pid:
            return self._session
        self._drop_session()
        reopen = self._generation != -1
        try:
            token = self._found.token
            session = self._login(token) if self._want_login else token.open(rw=True)
        except p11x.PKCS11Error as exc:
            raise translate(exc, operation="open session", token=self.label) from exc
        log.debug("token %r (serial %s): session %s%s", self.label, self.serial, "reopened" if reopen else "opened",
                  " (module re-initialised)" if reopen and module.generation != self._generation else "")
        self._session = session
        self._generation = module.generation
        self._pid = module.pid
        return session

    def _open_with_retries(self) -> pkcs11.Session:
        """:meth:`_open_locked`, tried again a few times after a re-initialise when the token looks
        absent: processes logging in at the same moment (forked children of one parent, a fleet
        starting) rewrite SoftHSM's token file while others read it (STACK-FACTS 23)."""
        session, module = self._session, self._found.module
        if (session is not None and module.pid == os.getpid() and self._pid == module.pid
                and self._generation == module.generation):
            return session  # the per-call path: Module.ensure_current's and _open_locked's tests, inline
        for attempt in range(_REREAD_TRIES):
            try:
                return self._open_locked()
            except errors.TokenError as exc:
                if attempt == _REREAD_TRIES - 1 or not (isinstance(exc, errors.TokenRemovedError)
                                                         or exc.code in _OPEN_RACES):
                    raise
                log.debug("token %r: opening a session failed (%s), attempt %d of %d: re-initialising the module "
                          "(another process's login may be rewriting the token: STACK-FACTS 23)",
                          self.label, exc.code or type(exc).__name__, attempt + 1, _REREAD_TRIES)
                time.sleep(0.02 * (attempt + 1))
                try:
                    self._rediscover(reinitialize=True)
                except errors.TokenRemovedError:
                    continue
        raise AssertionError("unreachable")  # pragma: no cover

    def _unlock_hint(self) -> str:
        """How this kind of token unlocks: a TPM's lockout is its dictionary-attack counter."""
        if "TPM" in self._found.model or "TPM" in self.module.description:
            return ("the TPM forgives one wrong PIN per lockout interval, or its owner clears the "
                    "lockout at once (tpm2_dictionarylockout --clear-lockout)")
        return "the security officer must reset it (SO PIN, or the PUK on a smart card)"

    def _locked_error(self) -> errors.PinLockedError:
        return errors.PinLockedError(
            f"the user PIN of token {self.label!r} is locked; {self._unlock_hint()}", token=self.label)

    @staticmethod
    def _current_flags(token: pkcs11.Token) -> int:
        """The token's flags now (C_GetTokenInfo again): python-pkcs11 keeps those read when the
        token was listed, so a wrong PIN typed since would not show in its PIN-counter flags."""
        try:
            return int(token.slot.get_token().flags)
        except p11x.PKCS11Error:
            return int(token.flags)

    def _login(self, token: pkcs11.Token) -> pkcs11.Session:
        """Open a session and C_Login, once; a wrong PIN is reported, never retried."""
        flags = self._current_flags(token)
        if flags & TokenFlag.USER_PIN_LOCKED:
            raise self._locked_error()
        pin = self._pin
        if pin is not None:
            log.debug("token %r: logging in again with the PIN that worked before", self.label)
        else:
            source = self._pin_source
            if flags & TokenFlag.PROTECTED_AUTHENTICATION_PATH and source.kind == "callback":
                source = PinSource("protected")
            pin = source.read(PinRequest(self.label, "login", tries_left_state(flags)), self._pin_callback)
        if pin is None and not flags & TokenFlag.PROTECTED_AUTHENTICATION_PATH:
            raise errors.ConfigurationError(f"token {self.label!r} has no protected authentication path (PIN pad): "
                                            "give its PIN (pin-source=file:... or env:VAR, or at a prompt)")
        secret: object = pkcs11.PROTECTED_AUTH if pin is None else pin.reveal()
        try:
            session = token.open(rw=True, user_pin=secret)
            log.debug("token %r: logged in", self.label)
        except p11x.UserAlreadyLoggedIn:
            session = token.open(rw=True)  # this process is logged in already: share it
            log.debug("token %r: this process is logged in already; the new session shares that login", self.label)
        except (p11x.PinIncorrect, p11x.PinInvalid, p11x.PinLenRange) as exc:
            if pin is not None:
                pin.wipe()
            self._pin = None
            state = tries_left_state(self._current_flags(token))
            log.warning("token %r: login refused, wrong PIN (PIN counter: %s); not retried", self.label, state)
            if state == "locked":
                raise errors.PinLockedError(
                    f"wrong PIN for token {self.label!r}; the PIN is now locked: {self._unlock_hint()}",
                    token=self.label) from exc
            raise errors.PinIncorrectError(
                f"wrong PIN for token {self.label!r} ({tries_left_note(state)}); keymgr did not retry",
                token=self.label, tries_left=state) from exc
        except p11x.PinLocked as exc:
            log.warning("token %r: login refused, the user PIN is locked", self.label)
            raise self._locked_error() from exc
        finally:
            del secret
        self._pin = pin
        return session

    def _drop_session(self) -> None:
        self._cache.clear()
        session, self._session = self._session, None
        if session is not None and self._pid == self.module.pid:
            with contextlib.suppress(p11x.PKCS11Error):
                session.close()

    def _rediscover(self, *, reinitialize: bool = False) -> None:
        """Find the token again after removal (possibly in another slot).

        ``reinitialize``: C_Finalize + C_Initialize first, for modules that keep
        listing a token whose service went away (tpm2-pkcs11 reads its token
        list at C_Initialize and answers CKR_GENERAL_ERROR afterwards).
        """
        def lookup() -> FoundToken | None:
            try:
                candidates = list_tokens(self.module)
            except errors.TokenError:
                return None
            for candidate in candidates:
                if candidate.serial == self.serial and candidate.label == self.label:
                    return candidate
            return None

        self._session = None
        self._cache.clear()
        found = None if reinitialize else lookup()
        if found is None:
            started = time.monotonic()
            try:
                self.module.reinitialize()
            except errors.ModuleLoadError as exc:
                log.warning("token %r: re-initialising module %s failed: %s", self.label, self.module.path, exc)
                raise self._removed_error("reconnect") from exc
            log.debug("token %r: module %s re-initialised (C_Finalize + C_Initialize) in %.1f ms", self.label,
                      self.module.path, 1000 * (time.monotonic() - started))
            found = lookup()
        if found is None:
            log.debug("token %r (serial %s): not found after a re-initialise", self.label, self.serial)
            raise self._removed_error("reconnect")
        if found.slot_id != self._found.slot_id:
            log.debug("token %r (serial %s): found again in slot %s", self.label, self.serial, found.slot_id)
        self._found = found

    def reread(self) -> None:
        """C_Finalize + C_Initialize, then find the token again: how this process comes to see
        objects other processes wrote. SoftHSM's view can go stale until some later outside
        write (STACK-FACTS 21); keymgr re-reads before failing on a key version it cannot find
        and before destroying anything it believes no one uses. Sessions reopen (and log in
        again) on their next call."""
        with self.module.lock:
            log.debug("token %r: re-reading the token (re-initialise the module; sessions reopen and log in again)",
                      self.label)
            for attempt in range(_REREAD_TRIES):
                try:
                    self._rediscover(reinitialize=True)
                    return
                except errors.TokenRemovedError:
                    # another process's login was rewriting the token file as C_Initialize read it
                    # (STACK-FACTS 23): the token looks absent until the next C_Initialize
                    if attempt == _REREAD_TRIES - 1:
                        log.warning("token %r: not present after %d re-initialisations", self.label, _REREAD_TRIES)
                        raise
                    time.sleep(0.02 * (attempt + 1))

    def _removed_error(self, operation: str, code: str | None = None) -> errors.TokenRemovedError:
        why = f" ({code})" if code else ""
        return errors.TokenRemovedError(
            f"{operation} on token {self.label!r} (serial {self.serial}): the token is not present or "
            f"not answering{why}; nothing was done. Reconnect it: the next call finds it again", code=code)

    def answers(self) -> bool:
        """Whether the token still answers a call that reaches it (C_GenerateRandom on a new
        session): tells a removed token from an operation the token refused. Call it inside
        :meth:`run` (the module lock is held)."""
        try:
            probe_session = self._found.token.open()
            try:
                probe_session.generate_random(64)
            finally:
                probe_session.close()
        except p11x.FunctionNotSupported:
            return True  # no RNG, but it answered
        except (p11x.PKCS11Error, errors.KeymgrError):
            return False
        return True

    def _device_failure(self, exc: BaseException, operation: str) -> errors.KeymgrError:
        """CKR_GENERAL_ERROR / CKR_DEVICE_ERROR: removal when a re-probe fails, else the error itself."""
        self._drop_session()
        if not self.answers():
            return self._removed_error(operation, code_name(exc))
        return translate(exc, operation=operation, token=self.label)

    # -- running calls ---------------------------------------------------------

    def run(self, operation: str, call: Callable[[pkcs11.Session], T]) -> T:
        """Run ``call(session)`` under the module lock, translating errors.

        ``operation`` names the step for error messages ("wrap data key").
        """
        with self._found.module.lock:  # self.module, without the property call: once per token call
            for attempt in (1, 2):
                try:
                    session = self._open_with_retries()
                except errors.TokenError as exc:
                    if not isinstance(exc, errors.TokenRemovedError) and exc.code not in _MODULE_STALE:
                        raise
                    if attempt == 2:
                        log.warning("token %r: %s failed, the token is not present or not answering (%s)",
                                    self.label, operation, exc.code or type(exc).__name__)
                        raise self._removed_error(operation, exc.code) from exc
                    log.debug("token %r: %s: opening a session failed (%s); looking for the token again",
                              self.label, operation, exc.code or type(exc).__name__)
                    self._rediscover(reinitialize=not isinstance(exc, errors.TokenRemovedError))
                    continue
                try:
                    return call(session)
                except SESSION_LOST as exc:
                    # closed, not just forgotten: a handle that still works would stay open and keep
                    # this process logged in (a later SO login then fails: CKR_USER_ANOTHER_ALREADY_LOGGED_IN)
                    self._drop_session()
                    log.debug("token %r: session lost during %s (%s); %s", self.label, operation, code_name(exc),
                              "reopening it and retrying once" if attempt == 1 else "lost again: giving up")
                    if attempt == 2:
                        raise translate(exc, operation=operation, token=self.label) from exc
                except p11x.OperationActive as exc:
                    # an earlier call failed half-way (e.g. a wrong context-specific PIN) and
                    # the module kept its operation: a new session clears it
                    self._drop_session()
                    log.debug("token %r: an operation was left active before %s; reopening the session",
                              self.label, operation)
                    if attempt == 2:
                        raise translate(exc, operation=operation, token=self.label) from exc
                except TOKEN_GONE as exc:
                    self._drop_session()
                    log.warning("token %r: removed during %s (%s)", self.label, operation, code_name(exc))
                    raise translate(exc, operation=operation, token=self.label) from exc
                except (p11x.DeviceError, p11x.GeneralError) as exc:
                    failure = self._device_failure(exc, operation)
                    removed = isinstance(failure, errors.TokenRemovedError)
                    log.log(logging.WARNING if removed and attempt == 2 else logging.DEBUG,
                            "token %r: %s during %s; %s", self.label, code_name(exc), operation,
                            "the token does not answer" if removed else "the token still answers")
                    if attempt == 2 or not removed:
                        raise failure from exc
                    try:  # the token may be back under a module that must re-read it
                        self._rediscover(reinitialize=True)
                    except errors.TokenRemovedError:
                        raise failure from exc
                except p11x.PKCS11Error as exc:
                    raise translate(exc, operation=operation, token=self.label) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def token_flags(self) -> int:
        with self.module.lock:
            try:
                return int(self._found.token.flags)
            except p11x.PKCS11Error as exc:
                raise translate(exc, operation="read token flags", token=self.label) from exc

    def context_pin(self) -> Pin | None:
        """The PIN for one context-specific login (CKA_ALWAYS_AUTHENTICATE), or None for a
        protected authentication path (PIN pad). Asked afresh each time from the token's
        PIN source: a callback (GUI, terminal) is called with ``reason="context-specific"``.
        Call it outside :meth:`run`: a person may take a while to answer.
        The caller wipes the returned :class:`Pin`."""
        flags = self.token_flags()
        if flags & TokenFlag.PROTECTED_AUTHENTICATION_PATH and self._pin_source.kind in ("callback", "protected"):
            return None
        request = PinRequest(self.label, "context-specific", tries_left_state(flags))
        return self._pin_source.read(request, self._pin_callback)

    def close(self) -> None:
        """Close the session (this logs the process out of the token)."""
        with self.module.lock:
            self._drop_session()
            if self._pin is not None:
                self._pin.wipe()
                self._pin = None
        log.debug("token %r: session closed (this process is logged out)", self.label)
        with _sessions_lock:
            for key, value in list(_sessions.items()):
                if value is self:
                    del _sessions[key]


def open_token(uri: Pkcs11Uri | str, *, login: bool = True,
               pin_callback: PinCallback | None = None) -> TokenSession:
    """The process-wide :class:`TokenSession` for the token a URI names.

    Opening the same token twice returns the same object, so the process logs
    in once (STACK-FACTS.md 2).
    """
    if isinstance(uri, str):
        uri = Pkcs11Uri.parse(uri)
    found = find_token(uri)
    key = (found.module.path, found.serial, found.label)
    with _sessions_lock:
        existing = _sessions.get(key)
    if existing is not None:
        if login and not existing._want_login:
            with existing.module.lock:
                existing._want_login = True
                existing._pin_source = pin_source_from_uri(uri.pin_source, uri.pin_value)
                existing._pin_callback = pin_callback
                existing._drop_session()
                try:
                    existing.run("login", lambda s: None)
                except BaseException:
                    existing._want_login = False
                    existing._session = None
                    raise
        return existing
    with _sessions_lock:
        raced = _sessions.get(key)
        if raced is not None:  # another thread opened it meanwhile
            return raced
        ts = TokenSession(found, uri, pin_source_from_uri(uri.pin_source, uri.pin_value), pin_callback, login)
        _sessions[key] = ts
    if login:
        try:
            ts.run("login", lambda s: None)
        except BaseException:
            with _sessions_lock:
                _sessions.pop(key, None)
            raise
    return ts


def close_all() -> None:
    """Close every token session of this process (tests, shutdown)."""
    with _sessions_lock:
        sessions = list(_sessions.values())
    for ts in sessions:
        ts.close()
