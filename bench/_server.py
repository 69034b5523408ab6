"""Children that answer commands: the line protocol bench/keyring_fleet.py and
bench/audit_append.py share.

A child process prints one JSON object per line on stdout (``{"ready": ...}`` first, then one
``{"value": ...}`` per command read from stdin) and stops at ``quit``; anything else it prints
(progress, warnings) goes to stderr. The parent keeps each child in a :class:`Server`, so two
keymgr trees can take turns on the same machine in the same minute.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import IO, Any

__all__ = ["Server", "add_token", "read_json", "reply"]


def reply(data: Any) -> None:
    """The child's side: one JSON line to the parent."""
    print(json.dumps(data), flush=True)


def read_json(stream: IO[str], what: str) -> Any:
    """The parent's side: the next JSON line of a child (other lines are skipped)."""
    for line in stream:
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    sys.exit(f"bench child {what} ended without an answer (its stderr is above)")


class Server:
    """A child answering one JSON line per command, ``ready`` its first answer."""

    def __init__(self, argv: list[str], *, what: str, env: dict[str, str], cwd: str) -> None:
        self.what = what
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=cwd)
        self.ready: dict[str, Any] = self.answer()

    def answer(self) -> Any:
        assert self.proc.stdout is not None
        return read_json(self.proc.stdout, self.what)

    def ask(self, command: str) -> Any:
        self.send(command)
        return self.answer()["value"]

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def close(self, *, final_answer: bool = False) -> Any:
        """Send ``quit``; with ``final_answer``, the one answer the child gives after it."""
        self.send("quit")
        answer = self.answer() if final_answer else None
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        if self.proc.wait(timeout=120) != 0:
            sys.exit(f"bench: the {self.what} child failed")
        return answer


def add_token(uri: str, label: str) -> str:
    """One more fresh token in the SoftHSM directory of the current ``SOFTHSM2_CONF``."""
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", "bench-so",
                    "--pin", "bench-pin"], check=True, capture_output=True)
    return uri.replace("token=bench?", f"token={label}?", 1)
