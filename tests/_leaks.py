"""The suite's leak check: what a test leaves in SoftHSM and in keymgr after it ends.

Run by the autouse fixture ``_no_leaks`` in tests/conftest.py around every test.

Why handles and not a listing: every ``C_FindObjects`` costs 12-30 µs per object in the
token (STACK-FACTS 24) and the shared tokens hold thousands of objects by the end of a
run, so listing them twice per test would add minutes. SoftHSM instead numbers sessions
and objects from one counter per C_Initialize (its HandleManager): every session opened
and every object created (or first found) during a test gets a handle above the one
``mark()`` read before it. After the test only that window is read, handle by handle
(``C_GetAttributeValue`` / ``C_GetSessionInfo``, ~15 µs each): the cost follows what the
test did, not how full the tokens are.

What fails a test (``LeakReport.problems``):

* a **session object** (CKA_TOKEN false) made during the test still exists: data keys,
  imported vector keys, unwrapped keys must be destroyed by whoever made them;
* a **PKCS#11 session** opened during the test is still open and is not the one session
  keymgr keeps per token (keymgr.hsm.sessions);
* a **token object** that appeared during the test names nothing unique to a test. Tests
  share tokens, so objects may stay when their names cannot collide: a keyring object
  (``NAME/vN``, ``keymgr/f/NAME/...``, ``keymgr/s/NAME/...``, ``keymgr-index/NAME``) of a key
  whose name holds a ``key_name`` or a random part (8+ hex digits); one of keymgr's per-token
  singletons (MAC keys, the custody register, the keyring's change counter) or an audit-log
  register (one per log file, and the suite's logs are per test or per run). Anything else
  outside the keyring, which nothing will ever clean up, the test declares with
  ``@pytest.mark.leaves_objects("label-prefix")``;
* a **KeyManager** the test opened is still open and reachable once the test and its fixtures
  are done (its caches hold data keys, its audit log stays open).

Objects merely seen for the first time are not taken for objects made: SoftHSM numbers
every object again after a re-initialise (the window then starts at handle 1), and objects
a child process made get their first handle here whenever this process first finds them.
So a token object is judged only when it is unknown (no earlier test saw it: identities
are remembered) and some token object file appeared on disk during the test
(``TokenFiles``; one stat per token directory, a listing only when one changed).

Objects made by module- and session-scoped fixtures (between two tests' windows) are
remembered as known, not judged: their fixtures own them. Helpers that make objects once
per run for whichever test asks first (tests/custody_helpers.party) have their label
prefix allowed for the whole run (tests/conftest.py).

A test that must leave a PKCS#11 session open because of a bug elsewhere says so with
``@pytest.mark.known_session_leak("why")``; the check then fails it when the leak stops.

What it cannot see: an object a child process made and destroyed, or made on a token this
process is not logged in to (its labels are encrypted); PKCS#11 sessions of child
processes; sessions and objects on the TPM (its module numbers handles its own way).
A child's object first found by a later test is judged with that test.
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

CKR_OK = 0
CKR_OBJECT_HANDLE_INVALID = 0x82
CKR_ATTRIBUTE_TYPE_INVALID = 0x12
CKR_WRONG_TOKEN = -1  # ours: the object's attributes did not decrypt under this session's token
CKA_CLASS, CKA_TOKEN, CKA_LABEL, CKA_APPLICATION = 0x0, 0x1, 0x3, 0x10
_UNAVAILABLE = ctypes.c_ulong(-1).value
CKF_SERIAL_SESSION = 0x4

#: labels keymgr gives one object per token, made by whichever test needs it first
SINGLETON_LABELS = frozenset({"keymgr/meta-mac", "keymgr/audit-mac", "keymgr/ceremony-signer", "keymgr/transport",
                              "keymgr-custodian"})
#: a label of keymgr's keyring (version objects, facts, snapshots) or of a blind index: the key's name
_KEYRING_LABEL = re.compile(r"^keymgr/[fs]/(?P<fact>.+)/[^/]+$|^(?P<version>.+)/v\d+$|^keymgr-index/(?P<index>.+)$")
#: a random part in a key name (``key_name`` gives ``k-`` and 10 hex digits; uuid4().hex[:8] elsewhere)
_UNIQUE = re.compile(r"[0-9a-f]{8,}")
#: registers (data objects named by CKA_APPLICATION) keymgr keeps: the audit log's, one per log file or
#: chain (the suite's logs live in each test's tmp_path or the run's state directory), and the
#: keyring's change counter, one per token
KEYMGR_REGISTERS = ("keymgr-audit/", "keymgr-audit-log/", "keymgr-keyring-changes")
#: keymgr's custody register: one per token, written anew under the next generation's label
SINGLETON_PREFIXES = ("keymgr/custody/register/",)


class _Attr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_ulong), ("value", ctypes.c_void_p), ("length", ctypes.c_ulong)]


def _text(buffer: ctypes.Array[ctypes.c_char], length: int) -> str | None:
    """The attribute as text; None when it is not UTF-8: SoftHSM decrypts a private object's
    attributes with the key of the token the *session* belongs to, so a read through another
    token's session gives bytes that are almost never valid UTF-8."""
    if length == _UNAVAILABLE:
        return ""
    try:
        return buffer.raw[:length].decode("utf-8")
    except UnicodeDecodeError:
        return None


class _SessionInfo(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_ulong), ("state", ctypes.c_ulong), ("flags", ctypes.c_ulong),
                ("device_error", ctypes.c_ulong)]


@dataclass(frozen=True)
class Found:
    """One live handle in the window: an object (with what the leak rules need) or a session."""

    handle: int
    kind: str  # "session object", "token object" or "session"
    label: str = ""
    object_class: int = -1
    application: str = ""  # CKA_APPLICATION of a data object (a register's name)
    token: str = ""  # the label of the token it was read through

    def identity(self) -> tuple[int, str]:
        """What stays the same when SoftHSM numbers the object again after a re-initialise
        (a register's label is its value, so a register is known by its name). Not the token:
        a public object reads through a session of any token, so ``token`` may name another."""
        return self.object_class, self.application or self.label


@dataclass
class Mark:
    """Where a test started: SoftHSM's handle counter and module generation."""

    handle: int
    generation: int


@dataclass
class LeakReport:
    problems: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.problems)


class SoftHsmWindow:
    """Reads the handles SoftHSM gave out since a mark, through the module python-pkcs11 loaded."""

    def __init__(self, module_path: str) -> None:
        self.path = os.path.realpath(module_path)  # as keymgr.hsm.modules registers it
        self._lib = ctypes.CDLL(self.path)  # the same dlopen() handle, so the same SoftHSM state

    def _module(self) -> object | None:
        from keymgr.hsm.modules import loaded_modules

        return next((m for m in loaded_modules() if m.path == self.path), None)

    def _slot(self) -> int | None:
        count = ctypes.c_ulong(0)
        if self._lib.C_GetSlotList(ctypes.c_ubyte(1), None, ctypes.byref(count)) != CKR_OK or not count.value:
            return None
        slots = (ctypes.c_ulong * count.value)()
        if self._lib.C_GetSlotList(ctypes.c_ubyte(1), slots, ctypes.byref(count)) != CKR_OK:
            return None
        return int(slots[0])

    def mark(self) -> Mark | None:
        """The next handle SoftHSM will give out (a session opened and closed at once: ~70 µs)."""
        module = self._module()
        if module is None:
            return Mark(0, 0)  # not loaded yet: its first handle will be 1, its generation 0
        with module.lock:  # type: ignore[attr-defined]
            slot = self._slot()
            if slot is None:
                return None
            handle = ctypes.c_ulong(0)
            if self._lib.C_OpenSession(ctypes.c_ulong(slot), ctypes.c_ulong(CKF_SERIAL_SESSION), None, None,
                                       ctypes.byref(handle)) != CKR_OK:
                return None
            self._lib.C_CloseSession(handle)
            return Mark(handle.value, module.generation)  # type: ignore[attr-defined]

    def _keymgr_sessions(self) -> dict[int, str]:
        """Handles of the sessions keymgr keeps (one per token per process), by token label."""
        from keymgr.hsm import sessions

        out = {}
        for ts in list(sessions._sessions.values()):
            live = ts._session
            if live is not None and ts.module.path == self.path and ts._pid == ts.module.pid:
                out[int(live.handle)] = ts.label  # type: ignore[attr-defined]
        return out

    def _read(self, session: int, handle: int) -> tuple[int, Found | None]:
        on_token, cls = ctypes.c_ubyte(0), ctypes.c_ulong(0)
        label, application = ctypes.create_string_buffer(1024), ctypes.create_string_buffer(256)
        template = (_Attr * 4)(_Attr(CKA_TOKEN, ctypes.cast(ctypes.byref(on_token), ctypes.c_void_p), 1),
                               _Attr(CKA_CLASS, ctypes.cast(ctypes.byref(cls), ctypes.c_void_p), 8),
                               _Attr(CKA_LABEL, ctypes.cast(label, ctypes.c_void_p), 1024),
                               _Attr(CKA_APPLICATION, ctypes.cast(application, ctypes.c_void_p), 256))
        rv = self._lib.C_GetAttributeValue(ctypes.c_ulong(session), ctypes.c_ulong(handle), template,
                                           ctypes.c_ulong(4))
        if rv not in (CKR_OK, CKR_ATTRIBUTE_TYPE_INVALID):  # only data objects have CKA_APPLICATION
            return rv, None
        kind = "token object" if on_token.value else "session object"
        text, app = _text(label, template[2].length), _text(application, template[3].length)
        if text is None or app is None:
            return CKR_WRONG_TOKEN, None
        return rv, Found(handle, kind, text, cls.value, app)

    def live_since(self, start: Mark, end: Mark) -> list[Found]:
        """Every object and session alive now with a handle in the window: all handles when
        SoftHSM was re-initialised meanwhile (its numbering started again at 1)."""
        module = self._module()
        if module is None:
            return []
        whole = end.generation == start.generation and end.handle >= start.handle
        low = start.handle if whole else 0
        found: list[Found] = []
        with module.lock:  # type: ignore[attr-defined]
            keymgr_sessions = self._keymgr_sessions()
            readers = list(keymgr_sessions) or [end.handle]
            for handle in range(low + 1, end.handle):
                found.extend(self._one(handle, readers, keymgr_sessions))
        return found

    def _one(self, handle: int, readers: list[int], keymgr_sessions: dict[int, str]) -> Iterable[Found]:
        info = _SessionInfo()
        if self._lib.C_GetSessionInfo(ctypes.c_ulong(handle), ctypes.byref(info)) == CKR_OK:
            if handle not in keymgr_sessions:
                yield Found(handle, "session")
            return
        for reader in readers:  # an object is read through a session of its own token (labels are encrypted)
            rv, obj = self._read(reader, handle)
            if obj is not None:
                yield replace(obj, token=keymgr_sessions.get(reader, "?"))
                return
            if rv == CKR_OBJECT_HANDLE_INVALID:
                return  # no such object (destroyed): the same answer through every session


class TokenFiles:
    """Which SoftHSM token directories got new object files (one file per token object), so that
    objects merely seen for the first time are not taken for objects made: SoftHSM numbers every
    object again after a re-initialise, and objects child processes made get their first handle
    here whenever this process first finds them. A directory listing only when its mtime moved."""

    def __init__(self, tokendir: Path) -> None:
        self.tokendir = tokendir
        self._seen: dict[Path, tuple[int, frozenset[str]]] = {}

    def _listing(self, directory: Path) -> tuple[int, frozenset[str]]:
        mtime = directory.stat().st_mtime_ns
        cached = self._seen.get(directory)
        if cached is not None and cached[0] == mtime:
            return cached
        names = frozenset(n for n in os.listdir(directory) if n.endswith(".object") and n != "token.object")
        self._seen[directory] = (mtime, names)
        return mtime, names

    def start(self) -> dict[Path, frozenset[str]]:
        return {d: self._listing(d)[1] for d in self.tokendir.iterdir() if d.is_dir()}

    def made_since(self, start: dict[Path, frozenset[str]]) -> int:
        """How many token objects were created (and still exist) since ``start``, by any process."""
        made = 0
        for directory in self.tokendir.iterdir():
            if directory.is_dir():
                made += len(self._listing(directory)[1] - start.get(directory, frozenset()))
        return made


class KeyManagerWatch:
    """Remembers the KeyManagers made while a test runs (KeyManager.__init__ wrapped once)."""

    def __init__(self) -> None:
        self.recording = False
        self.made: list[weakref.ref[object]] = []

    def install(self) -> None:
        import keymgr

        original = keymgr.KeyManager.__init__
        watch = self

        def __init__(self: object, *args: object, **kwargs: object) -> None:
            original(self, *args, **kwargs)  # type: ignore[arg-type]
            if watch.recording:
                watch.made.append(weakref.ref(self))

        keymgr.KeyManager.__init__ = __init__  # type: ignore[method-assign]

    def start(self) -> None:
        self.made.clear()
        self.recording = True

    def still_open(self) -> list[str]:
        """The KeyManagers made during the test that are still open and still reachable. A
        KeyManager is a reference cycle (its usage meter calls back into it), so one dropped
        unclosed (as in-process CLI runs drop theirs) lives until a collection: one runs, only
        when some manager is still open, the young generations first (~1 ms), then all."""
        self.recording = False
        for generation in (1, 2):
            if not any(_is_open(ref()) for ref in self.made):
                break
            gc.collect(generation)
        out = [repr(km) for km in (ref() for ref in self.made) if _is_open(km)]
        self.made.clear()
        return out


def _is_open(km: object | None) -> bool:
    return km is not None and getattr(km, "_ts", None) is not None


def owned(item: Found, names: Iterable[str], prefixes: Iterable[str]) -> bool:
    """Whether a token object left behind belongs to the test (see the module docstring)."""
    if item.application.startswith(KEYMGR_REGISTERS):
        return True
    label = item.label
    if label in SINGLETON_LABELS or label.startswith(SINGLETON_PREFIXES) or any(label.startswith(p) for p in prefixes):
        return True
    match = _KEYRING_LABEL.match(label)
    if match is None:
        return False
    key = match.group("fact") or match.group("version") or match.group("index")
    return _UNIQUE.search(key) is not None or any(name in key for name in names)


def judge(found: list[Found], known: set[tuple[int, str]], made: int, names: Iterable[str],
          prefixes: Iterable[str], open_managers: list[str], known_session_leak: str | None = None,
          strict: bool = True) -> LeakReport:
    """The problems in what a test left. ``known``: identities of the token objects seen by earlier
    tests (updated here); ``made``: how many token object files appeared during the test.
    ``known_session_leak``: the reason of a ``@pytest.mark.known_session_leak`` (a bug outside the
    test that leaves a PKCS#11 session open): that leak is expected, and its absence is reported,
    so the marker goes once the bug is fixed (like a strict xfail, for the leak only); with
    ``strict=False`` the leak may or may not happen (it depends on what ran before)."""
    names, prefixes = list(names), list(prefixes)
    report = LeakReport()
    sessions = [item for item in found if item.kind == "session"]
    if known_session_leak is not None:
        found = [item for item in found if item.kind != "session"]
        if not sessions and strict:
            report.problems.append(f"the known session leak ({known_session_leak}) no longer happens: "
                                   "remove @pytest.mark.known_session_leak")
    for item in found:
        if item.kind == "token object":
            new = item.identity() not in known
            known.add(item.identity())
            if not new or not made:  # seen before, or no object was made: numbered again, not made
                continue
        if item.kind == "session":
            report.problems.append(f"PKCS#11 session {item.handle} opened by the test is still open")
        elif item.kind == "session object":
            report.problems.append(f"session object {item.label!r} (class {item.object_class}) made by the test "
                                   "still exists: destroy it")
        elif not owned(item, names, prefixes):
            application = f", application {item.application!r}" if item.application else ""
            report.problems.append(
                f"token object {item.label!r} (class {item.object_class}{application}, read via token {item.token!r}) "
                "appeared during the test and names nothing unique to a test (a key_name, a keymgr singleton, "
                "or a @pytest.mark.leaves_objects prefix)")
    report.problems.extend(f"{km} opened by the test was not closed" for km in open_managers)
    return report
