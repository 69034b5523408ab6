"""The suite's "crash" SoftHSM token, for tests that SIGKILL processes in the middle of token calls.

SoftHSM rewrites its ``token.object`` in place (on every C_Login, STACK-FACTS 23): a SIGKILL in
those microseconds leaves the file short, and from then on SoftHSM lists the slot as empty, so
every later use of the token answers "no token matches". That is SoftHSM's crash safety, not
keymgr's (a network HSM keeps its token state itself), and a test about keymgr's own crash
safety must not fail, nor make the next test fail, because of it. So the token's file is kept as
it was right after initialisation (before any kill), and ``mend()`` puts it back whenever a kill
has left it short. Key and data objects live in files of their own and are never touched here.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import TokenUnderTest, softhsm_token

LABEL = "crash"


class CrashToken:
    """The "crash" token and a good copy of its token file."""

    def __init__(self) -> None:
        self.token: TokenUnderTest = softhsm_token(LABEL)
        self.path = _token_file(self.token)
        self.good = self.path.read_bytes()
        self.mended = 0

    def mend(self) -> bool:
        """Put the token file back if a kill left it short; True when it had to."""
        try:
            if self.path.stat().st_size >= len(self.good):
                return False
        except FileNotFoundError:
            pass
        spare = self.path.with_name("token.object.mend")
        spare.write_bytes(self.good)
        os.replace(spare, self.path)
        self.mended += 1
        return True


_kept: list[CrashToken] = []


def crash_token() -> CrashToken:
    """The one CrashToken of this run (its good copy is taken on first use, before any kill)."""
    if not _kept:
        _kept.append(CrashToken())
    kept = _kept[0]
    kept.mend()
    return kept


def _token_file(token: TokenUnderTest) -> Path:
    conf = Path(token.env["SOFTHSM2_CONF"]).read_text()
    tokendir = next(line.split("=", 1)[1].strip() for line in conf.splitlines()
                    if line.strip().startswith("directories.tokendir"))
    padded = token.label.encode().ljust(32, b" ")
    for entry in sorted(Path(tokendir).iterdir()):
        candidate = entry / "token.object"
        if candidate.is_file() and padded in candidate.read_bytes():
            return candidate
    raise RuntimeError(f"no SoftHSM token file labelled {token.label!r} under {tokendir}")
