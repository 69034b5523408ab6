"""keymgr.interrupts: signals held over a commit, and delivered once it is recorded.

In-process (pytest's main thread, whose SIGINT handler is Python's own) and in a child for
SIGTERM's default action. The ceremonies that use this are tested end to end in
tests/custody/test_interrupt_ceremonies.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from keymgr import interrupts

REPO = Path(__file__).resolve().parent.parent


def _interrupt_self(signum: int = signal.SIGINT) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.01)  # Python runs the handler at its next instruction: this is one


def test_deferred_signals_hold_an_interrupt_until_the_block_ends() -> None:
    reached = []
    with pytest.raises(KeyboardInterrupt) as caught:
        with interrupts.deferred_signals():
            _interrupt_self()
            reached.append("after the signal")
        reached.append("after the block")
    assert reached == ["after the signal"]
    assert not getattr(caught.value, "keymgr_completed", False)  # a plain hold: nothing was committed
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_commit_holds_signals_until_the_outermost_scope_ends() -> None:
    done = []
    with pytest.raises(KeyboardInterrupt) as caught, interrupts.commit_scope():  # the CLI command
        with interrupts.commit_scope():  # the library call
            interrupts.hold_signals()
            _interrupt_self()
            done.append("commit")
        assert interrupts.commit_begun()
        _interrupt_self()  # a second one is held too; the first is delivered
        done.append("recorded")
    assert done == ["commit", "recorded"] and caught.value.keymgr_completed  # type: ignore[attr-defined]
    assert not interrupts.commit_begun() and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_before_the_commit_an_interrupt_raises_at_once() -> None:
    with pytest.raises(KeyboardInterrupt), interrupts.commit_scope():
        _interrupt_self()
        pytest.fail("the interrupt was held before any commit began")
    with interrupts.commit_scope():
        pass  # a scope without a commit holds nothing and delivers nothing
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_holding_outside_a_scope_or_off_the_main_thread_does_nothing() -> None:
    interrupts.hold_signals()
    assert not interrupts.commit_begun()
    seen: list[object] = []

    def worker() -> None:
        with interrupts.commit_scope(), interrupts.deferred_signals():
            interrupts.hold_signals()
            seen.append(interrupts.commit_begun())

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [False] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


CHILD = """
import os, signal, sys, time
from keymgr import interrupts
signal.signal(signal.SIGINT, signal.SIG_IGN)   # as nohup or a background job leaves it
with interrupts.commit_scope():
    interrupts.hold_signals()
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)       # default action: held, then dies of it
    time.sleep(0.01)
    print("committed and recorded", flush=True)
print("not reached", flush=True)
"""


def test_sigterm_with_its_default_action_ends_the_process_after_the_commit() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert done.stdout == "committed and recorded\n"  # the ignored SIGINT stayed ignored
