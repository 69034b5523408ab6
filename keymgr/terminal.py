"""What keymgr leaves in the terminal: no typed-ahead input handed on to the shell.

Custodians under time pressure type ahead: the next custodian's PIN while
keymgr still checks the previous token. If keymgr then stops on an error or an
interrupt, whatever waits in the terminal's input queue is read by the shell as
a command line, and a PIN lands on screen and in the shell's history. So before
keymgr exits unsuccessfully it discards the pending input of its terminal
(``tcflush(TCIFLUSH)``, as ``getpass`` does when a PIN prompt ends). Input typed
after keymgr exited is the shell's, as it should be.

Only a foreground process touches the terminal: ``tcflush`` from a background
job would stop it with SIGTTOU, and its terminal input is not its own anyway.

Two more places discard it: before a prompt is
asked *again* (a slip at a custodian prompt: what was typed ahead for the next
prompt, perhaps a PIN, would be taken as the answer and shown back in the error),
and right before every safety confirmation (destroy's type-the-name, approve's
[y/N], a log restart): a confirmation must answer the warning the operator just
read, not be a pasted next line that was waiting before it was printed
(:func:`confirmation_input`).

Public because a program that asks its own questions around keymgr (the ``keymgr``
command is one such program, and uses only keymgr's public API) needs the same
discipline before a confirmation of its own.
"""

from __future__ import annotations

import contextlib
import os
import sys

__all__ = ["discard_typed_ahead", "confirmation_input"]


def confirmation_input() -> None:
    """Call right before a confirmation prompt (after its warning is printed): drops what was
    typed or pasted before, so only what the operator types now can confirm."""
    discard_typed_ahead()


def discard_typed_ahead() -> None:
    """Drop what was typed into standard input's terminal and not read yet (no-op off a terminal)."""
    try:
        import termios
    except ImportError:  # not a POSIX system: nothing to flush this way
        return
    with contextlib.suppress(OSError, ValueError, AttributeError):
        fd = sys.stdin.fileno()
        if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
            termios.tcflush(fd, termios.TCIFLUSH)
