"""Run the ``keymgr`` command with every token call of its main thread counted, and a signal sent
to itself right after call number K: how tests/custody/test_interrupt_ceremonies.py puts an interrupt at
every step of a ceremony.

``python -m tests._interrupt_driver KEYMGR-ARGS...`` with, in the environment:

* ``KEYMGR_TEST_STEPS``: a file that receives one line per token call of the main thread,
  ``<kind>\t<occurrence>``, written as it returns: the kind is the token's role (``custodian``
  for the custodians' tokens, ``target`` for keymgr's own) and the operation with quoted names blanked; the
  occurrence counts calls of that kind (numbers of some kinds grow with what the token holds,
  such as one MAC check per fact read, so a point is named by kind and occurrence);
* ``KEYMGR_TEST_SIGNAL_AT``: ``<kind>\t<occurrence>\t<INT|TERM|KILL>``: that signal is sent to
  this process the moment that call returned, as a Ctrl-C (a ``kill``) arriving then would.
  The token did the call's work; Python raises the interrupt at its next instruction, before
  the answer is used.

Every PKCS#11 call keymgr makes goes through :meth:`keymgr.hsm.sessions.TokenSession.run`
(tests/faults.py uses the same choke point); this wraps it, on real tokens, mocking nothing.
Calls of other threads (the keyring's background refresh) are not counted: signals reach
only the main thread, and their timing would make the numbering differ from run to run.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from keymgr.hsm.sessions import TokenSession

_real_run = TokenSession.run


def kind(token_label: str, operation: str) -> str:
    role = "custodian" if token_label.startswith("custodian-") else "target"
    return role + ": " + re.sub(r"'[^']*'", "'…'", operation)


def _plan() -> tuple[str, int, int]:
    raw = os.environ.get("KEYMGR_TEST_SIGNAL_AT", "")
    if not raw:
        return "", 0, signal.SIGINT
    at, occurrence, signame = raw.split("\t")
    return at, int(occurrence), {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL}.get(signame, signal.SIGINT)


def install() -> None:
    steps_path = os.environ.get("KEYMGR_TEST_STEPS")
    steps = open(steps_path, "a", buffering=1) if steps_path else None  # noqa: SIM115 - open for the run
    at, occurrence, signum = _plan()
    main = threading.main_thread()
    seen: dict[str, int] = {}

    def run(self: TokenSession, operation: str, call: Callable[[Any], Any]) -> Any:
        if threading.current_thread() is not main:
            return _real_run(self, operation, call)
        result = _real_run(self, operation, call)
        this = kind(self.label, operation)
        seen[this] = seen.get(this, 0) + 1
        if steps is not None:
            steps.write(f"{this}\t{seen[this]}\n")
        if this == at and seen[this] == occurrence:
            os.kill(os.getpid(), signum)
        return result

    TokenSession.run = run  # type: ignore[method-assign]


def _child(request: dict[str, Any]) -> None:
    """In a forked child of :func:`serve`: become ``keymgr ARGS`` and end as that program ends
    (its ``atexit`` handlers run: the audit log is flushed, a signal's death is died)."""
    code = 1
    try:
        for fd, path in ((1, request["out"]), (2, request["err"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(target, fd)
            os.close(target)
        os.chdir(request["cwd"])
        os.environ.update(request["env"])
        install()
        from keymgr.__main__ import main

        sys.argv = ["keymgr", *request["args"]]
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except BaseException:  # noqa: BLE001 - shown as the program would show it
        import traceback

        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:
    """A fork server (``--serve``): keymgr's modules imported once, then one forked child per JSON
    request on stdin (args, env, cwd, out, err files), answered with its wait status. Forking
    after the imports and before any token is opened spares each run Python's start-up and
    imports (about 0.5 s), which is most of a short ceremony; each child is still a process of
    its own that opens the token, logs in and runs ``keymgr`` from its ``main``."""
    import keymgr.__main__  # noqa: F401
    import keymgr.audit.verify  # noqa: F401
    import keymgr.cli  # noqa: F401
    import keymgr.custody.ceremony  # noqa: F401
    import keymgr.lifecycle.shred  # noqa: F401
    import keymgr.manager  # noqa: F401
    from keymgr.hsm.modules import loaded_modules

    assert not list(loaded_modules()), "a PKCS#11 module was loaded before the fork"
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": status}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        install()
        from keymgr.__main__ import main

        sys.argv = ["keymgr", *sys.argv[1:]]
        main()
