"""How a keymgr program ends on SIGINT or SIGTERM: one line, status 130 or 143, never a traceback.

SIGINT raises :class:`KeyboardInterrupt` (Python's default) and, once a
program's ``main`` called :func:`install`, SIGTERM raises :class:`Terminated`
(a ``KeyboardInterrupt`` too), in the main thread, so that both unwind through
every ``finally`` and context manager: temporary files are removed, the audit
log is flushed. Only the first signal raises (every interrupt ends the
program); later ones are ignored, so a second Ctrl-C cannot cut that cleanup
short and leave a traceback behind (SIGKILL still ends everything).

The CLI reports the exception with :func:`report`: one line on stderr, then
``sys.exit(130)`` (143 for SIGTERM). In a program that called :func:`install`,
the process then dies *of the signal* once the ``atexit`` handlers have run:
the shell still shows status 130 / 143 (128 + the signal's number), and a
script running keymgr in a loop stops too, where a child that merely exits
130 would let bash go on to the next round (the "wait and cooperative exit"
convention).

**Commits.** A change that must be whole (a restore, a rotation, a destroy, a policy
change) is prepared so that an interrupt before its commit write rolls it back, and
holds signals from the commit write until it is recorded (audit entry, signed
transcript, the lines that tell the operator): :func:`commit_scope` marks the block
in which a commit may happen (the CLI command, :class:`keymgr.KeyManager`'s audited
operation, the library function: scopes nest), :func:`hold_signals` is called right
before the commit write, and a SIGINT or SIGTERM arriving from then on is held until
the *outermost* scope ends, then delivered as it would have been (the CLI says the
change was completed first). :func:`deferred_signals` holds them for one block (a
rollback, an audit entry). Only the main thread receives signals, so elsewhere these
do nothing. SIGKILL cannot be held: docs/ceremonies.md says what each command leaves
behind and how a rerun finishes or clears it.

What remains: a signal in the first few tens of milliseconds, before
Python has run any of keymgr (interpreter start-up, ``site`` and its ``.pth``
files), is Python's own business. Before Python sets its handler it ends the
process silently; during ``site`` it prints Python's traceback.

Nothing here runs on import: a library must not take over its host's signals.

Public because a program built on keymgr (the ``keymgr`` command is one, using only the
public API) must share the library's commit scopes: its own command is the outermost
scope, and only it can say, once the change is recorded, that the interrupt came after
a completed change.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, NoReturn

__all__ = ["INTERRUPTED", "TERMINATED", "Terminated", "commit_begun", "commit_scope", "deferred_signals", "exit_code",
           "exiting",
           "hold_signals", "install", "interrupt_behind", "report"]

#: the exit codes: 128 + SIGINT, 128 + SIGTERM
INTERRUPTED = 128 + signal.SIGINT
TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt so that the same cleanup runs and the same code handles it."""


_received: list[int] = []
_installed: list[bool] = []
_reported: list[int] = []


def _handler(signum: int, frame: FrameType | None) -> None:
    if _received:
        return  # the first signal's cleanup is under way: let it finish
    _received.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def install() -> None:
    """For a program's ``main``: SIGINT and SIGTERM raise in the main thread, the first one only.
    A signal the parent set to be ignored (``nohup``, a background job's SIGINT) stays ignored."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _handler)
    if not _installed:
        _installed.append(True)
        atexit.register(_at_exit)  # registered first, so it runs after every later handler


def exiting() -> None:
    """The program is ending: signals arriving from now on (while ``atexit`` handlers flush the
    audit log) are ignored rather than raised where nothing would catch them."""
    if _installed:
        _received.append(0)


def interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The interrupt an error was raised while handling (a cleanup that failed as the interrupt
    unwound through it, a library that turned it into another error), or, in a program that
    called :func:`install`, the one it received: the program ends as interrupted either way."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    received = [signum for signum in _received if signum]
    if received:
        return Terminated() if received[0] == signal.SIGTERM else KeyboardInterrupt()
    return None


# -- holding signals over a commit -------------------------------------------------------

_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_hold_depth: list[int] = [0]  # nesting of holds (deferred_signals blocks, a begun commit)
_saved: dict[int, Any] = {}  # the handlers a hold replaced, put back when the last hold ends
_held: list[int] = []  # signals that arrived while held, in order
_scopes: list[int] = [0, 0]  # open commit scopes; 1 while a commit holds signals until the outermost ends


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _hold_handler(signum: int, frame: FrameType | None) -> None:
    _held.append(signum)


def _hold() -> None:
    if _hold_depth[0] == 0:
        for signum in _HELD_SIGNALS:
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN or previous is None:
                continue  # ignored by the parent (nohup), or not settable from Python: leave it
            _saved[signum] = previous
            signal.signal(signum, _hold_handler)
    _hold_depth[0] += 1


def _release(*, commit: bool = False) -> None:
    _hold_depth[0] -= 1
    if _hold_depth[0]:
        return
    previous = dict(_saved)
    _saved.clear()
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    if not _held:
        return
    signum = _held[0]
    _held.clear()
    _deliver(signum, previous.get(signum, signal.SIG_DFL), commit=commit)


def _deliver(signum: int, handler: Any, *, commit: bool) -> None:
    """What the signal would have done when it arrived: raise (Python's or :func:`install`'s
    handler), run another program's handler, or end the process (the default action)."""
    if callable(handler):
        call: Callable[[int, FrameType | None], Any] = handler
        try:
            call(signum, sys._getframe())
        except KeyboardInterrupt as exc:
            if commit:
                exc.keymgr_completed = True  # type: ignore[attr-defined]  # report() says so
            raise
        return
    if handler == signal.SIG_DFL:
        signal.raise_signal(signum)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM during the block (on the main thread) and deliver the first one
    that arrived once it ends: for a rollback or an audit entry that must not be cut in half."""
    if not _on_main_thread():
        yield
        return
    _hold()
    try:
        yield
    finally:
        _release()


@contextlib.contextmanager
def commit_scope() -> Iterator[None]:
    """A block in which a commit may begin (:func:`hold_signals`); a begun commit holds signals
    until the outermost open scope ends, so that the caller's own recording (audit entry,
    transcript file, the report) is done whole too. Scopes nest; elsewhere than on the main
    thread this does nothing."""
    if not _on_main_thread():
        yield
        return
    _scopes[0] += 1
    try:
        yield
    finally:
        _scopes[0] -= 1
        if _scopes[0] == 0 and _scopes[1]:
            _scopes[1] = 0
            _release(commit=True)


def hold_signals() -> None:
    """Called right before a commit write, inside a :func:`commit_scope`: from here until the
    outermost scope ends, SIGINT and SIGTERM are held, then delivered. Outside a scope, or off
    the main thread, nothing is held (there is no end to hold them to)."""
    if _on_main_thread() and _scopes[0] and not _scopes[1]:
        _scopes[1] = 1
        _hold()


def commit_begun() -> bool:
    """Whether a commit holds signals now (tests, and code that must not prompt meanwhile)."""
    return bool(_scopes[1])


def exit_code(exc: KeyboardInterrupt) -> int:
    return TERMINATED if isinstance(exc, Terminated) else INTERRUPTED


def report(exc: KeyboardInterrupt) -> NoReturn:
    """One line on stderr (after the terminal's ``^C``), and exit 130 or 143."""
    terminated = isinstance(exc, Terminated)
    try:
        lead = "\n" if sys.stderr.isatty() else ""
        what = "terminated" if terminated else "interrupted"
        if getattr(exc, "keymgr_completed", False):
            what += " once the change under way was completed and recorded"
        sys.stderr.write(f"{lead}keymgr: {what}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass  # stderr gone: the exit status still says it
    if _installed:
        _reported.append(signal.SIGTERM if terminated else signal.SIGINT)
    sys.exit(exit_code(exc))


def _at_exit() -> None:
    """The last ``atexit`` handler: die of the signal that ended the program, or, if none did,
    ignore signals for the rest of the shutdown, when Python has put back the default action
    and a signal would end a finished run silently, its status saying it was cut short."""
    if not _reported:
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is _handler:
                signal.signal(signum, signal.SIG_IGN)
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
    signal.signal(_reported[0], signal.SIG_DFL)
    os.kill(os.getpid(), _reported[0])  # does not return; if it did, the exit status is 130 / 143 anyway
