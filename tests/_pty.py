"""keymgr at a real terminal for the tests: a pty driven by pexpect, alone or under an interactive bash.

``spawn_keymgr`` runs ``python -m keymgr`` (this checkout's keymgr) as the pty's only
process. ``Shell`` runs ``bash`` in the pty and types command lines into it, as a
custodian does: what keymgr leaves unread in the terminal then reaches the shell,
so a test can see whether typed-ahead input leaked, and the status the shell saw
(``$?``: 130 after an interrupt, whether keymgr exited 130 or died of SIGINT).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import uuid
from pathlib import Path

import pexpect

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["COLUMNS"] = "200"
    return env


def spawn_keymgr(args: list[str], cwd: Path) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "keymgr", *args], cwd=str(cwd), env=_env(), encoding="utf-8",
                         timeout=60, dimensions=(50, 200))


def keymgr_command(args: list[str]) -> str:
    """A shell command line that runs this checkout's keymgr."""
    return shlex.join([sys.executable, "-m", "keymgr", *args])


class Shell:
    """An interactive ``bash`` (no rc files, no history file) in a pty."""

    def __init__(self, cwd: Path) -> None:
        self.prompt = f"SHELL-{uuid.uuid4().hex[:8]}$ "
        env = _env()
        env.update({"PS1": self.prompt, "HISTFILE": "/dev/null", "TERM": "dumb"})
        self.child = pexpect.spawn("bash", ["--norc", "--noprofile", "-i"], cwd=str(cwd), env=env,
                                   encoding="utf-8", timeout=60, dimensions=(50, 200))
        self.child.expect_exact(self.prompt)
        self.seen = ""

    def type(self, text: str) -> None:
        """Type ``text`` in one write, as fast typing reaches the terminal before anyone reads it."""
        self.child.send(text)

    def wait_prompt(self) -> str:
        """Everything the terminal showed until the shell's next prompt."""
        self.child.expect_exact(self.prompt)
        shown = str(self.child.before)
        self.seen += shown
        return shown

    def status(self) -> int:
        """The exit status of the last command, as the shell saw it."""
        self.type("echo status=$?\n")
        shown = self.wait_prompt()
        found = re.search(r"^status=(\d+)\s*$", shown, re.MULTILINE)
        assert found, shown
        return int(found.group(1))

    def close(self) -> None:
        """End the shell (and, through the terminal's hangup, a keymgr a failed test left waiting)."""
        self.child.close(force=True)
