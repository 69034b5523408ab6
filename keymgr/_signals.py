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

What remains: a signal in the first few tens of milliseconds, before
Python has run any of keymgr (interpreter start-up, ``site`` and its ``.pth``
files), is Python's own business. Before Python sets its handler it ends the
process silently; during ``site`` it prints Python's traceback.

Nothing here runs on import: a library must not take over its host's signals.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
from types import FrameType
from typing import NoReturn

__all__ = ["INTERRUPTED", "TERMINATED", "Terminated", "exit_code", "exiting", "install", "interrupt_behind",
           "report"]

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


def exit_code(exc: KeyboardInterrupt) -> int:
    return TERMINATED if isinstance(exc, Terminated) else INTERRUPTED


def report(exc: KeyboardInterrupt) -> NoReturn:
    """One line on stderr (after the terminal's ``^C``), and exit 130 or 143."""
    terminated = isinstance(exc, Terminated)
    try:
        lead = "\n" if sys.stderr.isatty() else ""
        sys.stderr.write(f"{lead}keymgr: {'terminated' if terminated else 'interrupted'}\n")
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
